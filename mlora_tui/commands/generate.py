"""`mlora generate`: a reply to a prompt from a trained adapter (imports torch, inside)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from engine.core.errors import UserError
from mlora_tui.commands.common import fail, stderr

GENERATE_HELP = "\n\n".join([
    "Generate a reply to PROMPT with a trained adapter; prints only the generated text.",
    "The prompt is formatted with the adapter's prompt template, the way training formatted "
    "an instruction with no input. The base model is the one the adapter was trained on.",
    "[bold]Exit codes[/bold]: 0 generated; 2 bad adapter folder, base model or option.",
])


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
    from engine.train.generate import generate as generate_text

    try:
        text = generate_text(adapter, prompt, input=input_text, base_only=base_only,
                             max_new_tokens=max_new_tokens, temperature=temperature,
                             base_model=base_model, raw=raw, seed=seed,
                             log=lambda message: stderr.print(Text(message, style="dim")))
    except UserError as e:
        fail(str(e))
    sys.stdout.write(text + "\n")
