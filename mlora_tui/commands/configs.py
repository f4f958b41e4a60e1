"""`mlora validate`, `mlora convert` and `mlora gen`: check a config, turn an m-LoRA JSON
config into TOML, and write a config from a template. No model loads, no torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from engine.core.errors import UserError
from engine.core.jobs import variant_label
from mlora_tui.commands.common import BaseModelOption, checked, fail, stderr

VALIDATE_HELP = "\n\n".join([
    "Check CONFIG and its data files without loading a model; print what it would train.",
    "[bold]Exit codes[/bold]: 0 the config is valid; 2 it is not (the message names the file, "
    "the table, the field and what was expected).",
])
CONVERT_HELP = "\n\n".join([
    "Turn an m-LoRA JSON config into an mlora-tui TOML config.",
    "[bold]Exit codes[/bold]: 0 converted; 2 the file is missing or not an m-LoRA config.",
])
GEN_HELP = "\n\n".join([
    "Write a ready config from a template, one adapter per task file (m-LoRA's "
    "[bold]launch.py gen[/bold]).",
    "Templates ship in configs/templates (one per variant: lora, rslora, dora, loraplus); "
    "[bold]--list[/bold] shows them. Target modules are the base model family's defaults "
    "unless the template sets them. The written config is checked as `mlora validate` would.",
    "[bold]Exit codes[/bold]: 0 written; 2 a bad template, task file or option.",
])


def validate(
    config: Annotated[Path, typer.Argument(help="The TOML config to check.", show_default=False)],
) -> None:
    found = checked(config, check_output=False)
    run_config = found.config
    out = Console(highlight=False, soft_wrap=True)
    model = run_config.model
    out.print(Text(f"config     {run_config.source}"))
    out.print(Text(f"base model {model.base_model} ({model.dtype}, attention {model.attn_impl})"))
    out.print(Text(f"output     {run_config.train.output_dir}"))
    out.print(Text(f"adapters   {len(run_config.adapters)}"))
    width = max((len(a.name) for a in run_config.adapters), default=0)
    for adapter, data in zip(run_config.adapters, found.data):
        out.print(Text(f"  {adapter.name:<{width}}  r={adapter.r} alpha={adapter.lora_alpha:g} "
                       f"{variant_label(adapter)}  lr={adapter.lr:g} epochs={adapter.num_epochs}  "
                       f"{data.rows} {data.kind} rows in {adapter.data}"))
    for sweep in run_config.sweeps:
        kind = (f"grid of {sweep.n_trials}" if sweep.grid is not None
                else f"{sweep.n_trials} {sweep.sampler} trials")
        searched = ", ".join(sweep.grid or sweep.sample)
        out.print(Text(f"sweep      {sweep.name}: {kind} over {searched}; {sweep.parallel} at "
                       f"once; {sweep.direction} {sweep.metric} every {sweep.eval_steps} "
                       f"steps; prune {sweep.prune}"))
    out.print(Text("config OK", style="bold green"))


def convert(
    mlora_json: Annotated[Path, typer.Argument(help="An m-LoRA JSON config.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Write the TOML here instead of printing it.",
        show_default=False)] = None,
) -> None:
    from engine.tools.convert import convert_mlora_json

    try:
        toml_text = convert_mlora_json(mlora_json)
    except UserError as e:
        fail(str(e))
    if output is None:
        sys.stdout.write(toml_text)
        return
    _write(output, toml_text, f"wrote {output}; check it with: mlora validate {output}")


def gen(
    template: Annotated[Optional[str], typer.Option(
        "--template", help="A template name (see --list) or a .toml template file.",
        show_default=False)] = None,
    tasks: Annotated[Optional[str], typer.Option(
        "--tasks", help='Data files separated by ";" (e.g. "a.json;b.jsonl"): one adapter each.',
        show_default=False)] = None,
    output: Annotated[Path, typer.Option(
        "--output", "-o", "--file_name", help="Where to write the config.")] = Path("mlora.toml"),
    list_only: Annotated[bool, typer.Option("--list", help="List the templates.")] = False,
    base_model: BaseModelOption = None,
    lr: Annotated[Optional[float], typer.Option(
        "--lr", "--learning_rate", help="Every adapter's lr.", show_default=False)] = None,
    r: Annotated[Optional[int], typer.Option("--r", "--rank", help="Every adapter's rank.",
                                             show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch_size", "--batch-size", show_default=False)] = None,
    micro_batch_size: Annotated[Optional[int], typer.Option(
        "--micro_batch_size", "--micro-batch-size", show_default=False)] = None,
    num_epochs: Annotated[Optional[int], typer.Option(
        "--num_epochs", "--num-epochs", show_default=False)] = None,
    cutoff_len: Annotated[Optional[int], typer.Option(
        "--cutoff_len", "--cutoff-len", show_default=False)] = None,
    output_dir: Annotated[Optional[str], typer.Option(
        "--output_dir", "--output-dir", help="[train] output_dir.", show_default=False)] = None,
) -> None:
    from engine.tools.scaffold import generate_config, list_templates

    if list_only:
        for name, description in list_templates().items():
            sys.stdout.write(f"{name:<10} {description}\n")
        return
    if not template or not tasks:
        fail("give --template NAME and --tasks \"a.json;b.jsonl\" (or --list)")

    def given(**values):
        return {k: v for k, v in values.items() if v is not None}

    try:
        text = generate_config(
            template, [t.strip() for t in tasks.split(";") if t.strip()], out_path=output,
            model=given(base_model=base_model),
            train=given(cutoff_len=cutoff_len, output_dir=output_dir),
            adapter=given(lr=lr, r=r, batch_size=batch_size, micro_batch_size=micro_batch_size,
                          num_epochs=num_epochs))
    except UserError as e:
        fail(str(e))
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"{output}: cannot write it: {e.strerror or e}")
    _write(output, text, f"wrote {output}; train with: mlora run {output}")


def _write(path: Path, text: str, done: str) -> None:
    """Write ``text`` to ``path`` and say ``done`` on stderr; a failure exits with 2."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        fail(f"{path}: cannot write it: {e.strerror or e}")
    stderr.print(Text(done), soft_wrap=True)
