"""The `mlora` command line: engines, jobs, configs, and trying trained adapters.

Training runs in an engine process (engine/server/process.py) that outlives the terminal; these
commands start it, watch it and steer it over its Unix socket (mlora_tui/launcher.py,
mlora_tui/client.py): `run` starts one (or attaches to the one already running for the
config) and shows its progress, `attach` watches a running one, `ps` lists them, `jobs ...`
steers their jobs, `stop` stops one gracefully, and `serve` is the engine process itself.

This module only puts the commands together; each group lives in mlora_tui/commands/
(run: run, attach, serve; engines: ps, stop, jobs; configs: validate, convert, gen;
generate, evaluate). Exit codes are engine.core.jobs's. Nothing here imports torch: only ``serve``,
``generate`` and ``evaluate`` do, inside the command, so ``mlora --help`` starts fast.
"""

from __future__ import annotations

import typer

from engine.core.jobs import EXIT_CODES_HELP
from mlora_tui.commands import configs, engines, evaluate, export, generate, run, sweeps

app = typer.Typer(
    name="mlora",
    help="Train many LoRA adapters at once on one shared base model.\n\n"
         "Start with [bold]mlora validate CONFIG[/bold], then [bold]mlora run CONFIG[/bold]. "
         "Training runs in an engine process that survives the terminal: "
         "[bold]mlora attach[/bold], [bold]mlora ps[/bold], [bold]mlora jobs[/bold] and "
         "[bold]mlora stop[/bold] reach it again.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.add_typer(engines.jobs_app, name="jobs")
app.add_typer(sweeps.sweep_app, name="sweep")

# In the order `mlora --help` lists them.
app.command(help=run.RUN_HELP)(run.run)
app.command(help=run.ATTACH_HELP)(run.attach)
app.command(help=engines.PS_HELP)(engines.ps)
app.command(help=engines.STOP_HELP)(engines.stop)
app.command(help=run.SERVE_HELP)(run.serve)
app.command(help=configs.VALIDATE_HELP)(configs.validate)
app.command(help=configs.CONVERT_HELP)(configs.convert)
app.command("gen", help=configs.GEN_HELP)(configs.gen)
app.command(help=generate.GENERATE_HELP)(generate.generate)
app.command(help=evaluate.EVALUATE_HELP)(evaluate.evaluate)
app.command(help=export.EXPORT_HELP)(export.export)


def main() -> None:
    """Entry point of the `mlora` console script."""
    app()


if __name__ == "__main__":
    main()
