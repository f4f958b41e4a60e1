"""`mlora export`: an adapter merged into its base model, as an ordinary transformers folder
(imports torch, inside the command)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from engine.core.errors import UserError
from mlora_tui.commands.common import fail, stderr

EXPORT_HELP = "\n\n".join([
    "Merge a trained adapter into its base model and write the result as an ordinary "
    "transformers model folder (safetensors, config, tokenizer, generation config).",
    "AutoModelForCausalLM.from_pretrained(OUT) loads it without PEFT. LoRA, rsLoRA and DoRA "
    "adapters merge; a MixLoRA adapter cannot (a router picks its experts per token). An "
    "adapter trained on a 4/8-bit base merges into the unquantized base weights. OUT is "
    "written into a temporary folder and renamed into place.",
    "[bold]Exit codes[/bold]: 0 written; 2 bad adapter folder, base model, option or "
    "output folder.",
])


def export(
    adapter: Annotated[Path, typer.Option(
        "--adapter", help="The trained adapter folder (e.g. runs/demo/NAME, one of its "
                          "checkpoints, or a PEFT folder).", show_default=False)],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="The model folder to write.", show_default=False)],
    merge: Annotated[bool, typer.Option(
        "--merge", help="Merge the adapter into the base weights (required: the only kind "
                        "of export for now).")] = False,
    dtype: Annotated[Optional[str], typer.Option(
        help="fp32, bf16 or fp16; default: the dtype the adapter was trained in (fp32 when "
             "the folder does not say).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace OUT if it exists and is not empty.")] = False,
    base_model: Annotated[Optional[str], typer.Option(
        help="Use this base model folder instead of the one recorded in the adapter folder.",
        show_default=False)] = None,
) -> None:
    if not merge:
        fail("give --merge: merging the adapter into the base model is the only kind of "
             "export so far (mlora export --adapter DIR --merge -o OUT)")
    if dtype is not None and dtype not in ("fp32", "bf16", "fp16"):
        fail(f"--dtype {dtype!r}: use fp32, bf16 or fp16")
    from engine.train.export import export_merged

    try:
        result = export_merged(adapter, output, dtype=dtype, base_model=base_model,
                               overwrite=overwrite,
                               log=lambda m: stderr.print(Text(m, style="dim"), soft_wrap=True))
    except UserError as e:
        fail(str(e))
    stderr.print(Text.assemble(("Exported ", "bold green"),
                               f"{result.out} ({result.variant} merged into "
                               f"{result.base_model}, {result.dtype})"), soft_wrap=True)
