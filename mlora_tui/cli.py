"""The `mlora` command line: run, validate and convert configs, and try trained adapters.

People read stderr (progress bars, messages), programs read stdout (``--json`` events,
generated text, converted TOML). A user mistake (``engine.errors.UserError``: config, data,
adapter folder) prints its message on stderr and exits with code 2, never a traceback.

Nothing here imports torch at module level: ``mlora --help``, ``validate`` and ``convert``
use only the torch-free ``engine.errors``, ``engine.config``, ``engine.data`` and
``engine.convert``, and start fast; ``run`` and ``generate`` import the engine inside the
command.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, NoReturn, Optional

import typer
from rich.console import Console
from rich.text import Text

from engine.errors import UserError

if TYPE_CHECKING:
    from engine.config import AdapterConfig, RunConfig
    from mlora_tui.progress import RunSummary

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130   # 128 + SIGINT, what shells report for Ctrl-C

app = typer.Typer(
    name="mlora",
    help="Train many LoRA adapters at once on one shared base model.\n\n"
         "Start with [bold]mlora validate CONFIG[/bold], then [bold]mlora run CONFIG[/bold].",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

stderr = Console(stderr=True, highlight=False)


def _fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print ``message`` (plain text: brackets in it are not markup) on stderr and exit."""
    stderr.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    raise typer.Exit(code)


def _load_config(path: Path) -> "RunConfig":
    from engine.config import load_config

    try:
        return load_config(path)
    except UserError as e:
        _fail(str(e))


# -- run ----------------------------------------------------------------------------------

# Help texts: one line per paragraph, so Rich wraps them to the terminal's width.
RUN_HELP = "\n\n".join([
    "Train every adapter in CONFIG together until all jobs finish.",
    "Progress goes to stderr: one bar per adapter, with state changes and warnings above the "
    "bars. With [bold]--json[/bold], stdout gets every engine event as one JSON object a line "
    "(the same lines as OUTPUT_DIR/metrics.jsonl) and no bars are drawn.",
    "Ctrl-C stops after the current step and saves a checkpoint of every unfinished job; a "
    "second Ctrl-C aborts at once.",
    "[bold]Exit codes[/bold]: 0 every job finished (or --max-steps was reached) with no "
    "failure; 1 some job failed; 2 usage, config or data error; 130 interrupted with Ctrl-C.",
])
VALIDATE_HELP = "\n\n".join([
    "Check CONFIG and its data files without loading a model; print what it would train.",
    "[bold]Exit codes[/bold]: 0 the config is valid; 2 it is not (the message names the file, "
    "the table, the field and what was expected).",
])
CONVERT_HELP = "\n\n".join([
    "Turn an m-LoRA JSON config into an mlora-tui TOML config.",
    "[bold]Exit codes[/bold]: 0 converted; 2 the file is missing or not an m-LoRA config.",
])
GENERATE_HELP = "\n\n".join([
    "Generate a reply to PROMPT with a trained adapter; prints only the generated text.",
    "The prompt is formatted with the adapter's prompt template, the way training formatted "
    "an instruction with no input. The base model is the one the adapter was trained on.",
    "[bold]Exit codes[/bold]: 0 generated; 2 bad adapter folder, base model or option.",
])


@app.command(help=RUN_HELP)
def run(
    config: Annotated[Path, typer.Argument(help="The run's TOML config.", show_default=False)],
    json_lines: Annotated[bool, typer.Option(
        "--json", help="Print every event as a JSON line on stdout instead of progress bars.")] = False,
    max_steps: Annotated[Optional[int], typer.Option(
        min=1, help="Stop after this many batched steps (a quick try); each unfinished job "
                    "saves a checkpoint of where it got to.",
        show_default=False)] = None,
) -> None:
    from mlora_tui.progress import RunProgress, RunSummary

    run_config = _load_config(config)
    _check_data_files(run_config.adapters)
    summary = RunSummary()
    if json_lines:
        def show(event: dict) -> None:
            sys.stdout.write(json.dumps(event, default=str) + "\n")
            sys.stdout.flush()
        code = _train(run_config, [summary.handle, show], max_steps, summary,
                      lambda message: stderr.print(Text(message), soft_wrap=True))
    else:
        with RunProgress(stderr) as progress:
            code = _train(run_config, [summary.handle, progress.handle], max_steps, summary,
                          progress.print)
    summary.render(stderr)
    raise typer.Exit(code)


def _train(run_config: "RunConfig", sinks: list[Callable[[dict], None]],
           max_steps: Optional[int], summary: "RunSummary", say: Callable[[str], None]) -> int:
    """Build the engine and train; returns the exit code."""
    def on_event(event: dict) -> None:
        for sink in sinks:
            sink(event)

    say(f"Loading the base model {run_config.model.base_model} ...")
    try:
        from engine.trainer import Engine

        engine = Engine(run_config, on_event=on_event)
        with _GracefulInterrupt(engine, say) as interrupt:
            engine.run(max_steps=max_steps)
    except UserError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        # Ctrl-C while the model loads, or a second Ctrl-C: nothing more is saved.
        say("Aborted; adapters and checkpoints written before now are intact.")
        return EXIT_INTERRUPTED
    if interrupt.requested:
        say("Stopped by Ctrl-C; unfinished jobs saved checkpoints (see the summary).")
        return EXIT_INTERRUPTED
    return EXIT_JOB_FAILED if summary.any_failed else EXIT_OK


class _GracefulInterrupt:
    """While active, the first Ctrl-C asks the engine to stop after its current step and save
    checkpoints; the second raises KeyboardInterrupt to abort at once."""

    def __init__(self, engine, say: Callable[[str], None]):
        self.engine = engine
        self.say = say
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_GracefulInterrupt":
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc_info) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.engine.request_stop()
        self.say("Ctrl-C: stopping after the current step and saving checkpoints; "
                 "press Ctrl-C again to abort now.")


def _check_data_files(adapters: list["AdapterConfig"]) -> list[tuple[int, str]]:
    """Read and check each adapter's data file before any model loads: (rows, kind) each."""
    from engine.data import load_data_file

    counts = []
    for adapter in adapters:
        try:
            data = load_data_file(adapter.data)
        except UserError as e:
            _fail(f"{e} (data of adapter {adapter.name!r})")
        counts.append((len(data.rows), data.kind))
    return counts


# -- validate -----------------------------------------------------------------------------

@app.command(help=VALIDATE_HELP)
def validate(
    config: Annotated[Path, typer.Argument(help="The TOML config to check.", show_default=False)],
) -> None:
    run_config = _load_config(config)
    data = _check_data_files(run_config.adapters)
    out = Console(highlight=False, soft_wrap=True)
    model = run_config.model
    out.print(Text(f"config     {run_config.source}"))
    out.print(Text(f"base model {model.base_model} ({model.dtype}, attention {model.attn_impl})"))
    out.print(Text(f"output     {run_config.train.output_dir}"))
    out.print(Text(f"adapters   {len(run_config.adapters)}"))
    width = max(len(a.name) for a in run_config.adapters)
    for adapter, (rows, kind) in zip(run_config.adapters, data):
        out.print(Text(f"  {adapter.name:<{width}}  r={adapter.r} alpha={adapter.lora_alpha:g} "
                       f"{_variant(adapter)}  lr={adapter.lr:g} epochs={adapter.num_epochs}  "
                       f"{rows} {kind} rows in {adapter.data}"))
    out.print(Text("config OK", style="bold green"))


def _variant(adapter: "AdapterConfig") -> str:
    parts = ["dora" if adapter.use_dora else "lora"]
    if adapter.use_rslora:
        parts.append("rslora")
    if adapter.loraplus_lr_ratio != 1:
        parts.append(f"lora+ x{adapter.loraplus_lr_ratio:g}")
    return "+".join(parts)


# -- convert ------------------------------------------------------------------------------

@app.command(help=CONVERT_HELP)
def convert(
    mlora_json: Annotated[Path, typer.Argument(help="An m-LoRA JSON config.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Write the TOML here instead of printing it.",
        show_default=False)] = None,
) -> None:
    from engine.convert import convert_mlora_json

    try:
        toml_text = convert_mlora_json(mlora_json)
    except UserError as e:
        _fail(str(e))
    if output is None:
        sys.stdout.write(toml_text)
        return
    try:
        output.write_text(toml_text, encoding="utf-8")
    except OSError as e:
        _fail(f"{output}: cannot write it: {e.strerror or e}")
    stderr.print(Text(f"wrote {output}; check it with: mlora validate {output}"), soft_wrap=True)


# -- generate -----------------------------------------------------------------------------

@app.command(help=GENERATE_HELP)
def generate(
    prompt: Annotated[str, typer.Argument(help="The instruction to send, as in a training row.",
                                          show_default=False)],
    adapter: Annotated[Path, typer.Option(
        "--adapter", help="A trained adapter folder (e.g. runs/demo/NAME, or one of its "
                          "checkpoints).", show_default=False)],
    input_text: Annotated[str, typer.Option(
        "--input", help="The row's input, for tasks trained on Alpaca rows with an input "
                        "(as in the demo).", show_default=False)] = "",
    base_only: Annotated[bool, typer.Option(
        "--base-only", help="Use the adapter's base model and prompt format, without the "
                            "adapter (to compare).")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="At most this many new tokens.")] = 64,
    temperature: Annotated[float, typer.Option(
        min=0.0, help="0 decodes greedily (repeatable); above 0 samples.")] = 0.0,
    seed: Annotated[Optional[int], typer.Option(
        help="Seed for sampling (temperature > 0).", show_default=False)] = None,
    base_model: Annotated[Optional[str], typer.Option(
        help="Use this base model instead of the one recorded in the adapter folder.",
        show_default=False)] = None,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Send PROMPT as is, without the adapter's prompt template (adapters "
                      "trained on text rows).")] = False,
) -> None:
    from engine.generate import generate as generate_text

    try:
        text = generate_text(adapter, prompt, input=input_text, base_only=base_only, max_new_tokens=max_new_tokens,
                             temperature=temperature, base_model=base_model, raw=raw, seed=seed,
                             log=lambda message: stderr.print(Text(message, style="dim")))
    except UserError as e:
        _fail(str(e))
    sys.stdout.write(text + "\n")


def main() -> None:
    """Entry point of the `mlora` console script."""
    app()


if __name__ == "__main__":
    main()
