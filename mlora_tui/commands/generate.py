"""`mlora generate`: trained adapters answer one prompt side by side (imports torch, inside)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console, Group
from rich.panel import Panel
from rich.text import Text

from engine.core.errors import UserError
from mlora_tui.commands.common import fail, stderr

GENERATE_HELP = "\n\n".join([
    "Each adapter (and the base model with --base) answers PROMPT, all in one batched "
    "decode through one base model.",
    "The prompt is formatted with each adapter's own prompt template, the way training "
    "formatted an instruction (with --input, its input). The base model is the one the "
    "adapters were trained on. One adapter alone prints only its text; several print a "
    "panel each (streamed on a terminal); --json prints {\"outputs\": {name: text}}.",
    "[bold]Exit codes[/bold]: 0 generated; 2 bad adapter folder, base model or option.",
])


def generate(
    prompt: Annotated[str, typer.Argument(help="The instruction to send, as in a training row.",
                                          show_default=False)],
    adapter: Annotated[Optional[list[Path]], typer.Option(
        "--adapter", help="A trained adapter folder (e.g. runs/demo/NAME, or one of its "
                          "checkpoints; PEFT's own folders too); repeat for more.",
        show_default=False)] = None,
    input_text: Annotated[str, typer.Option(
        "--input", help="The row's input, for tasks trained on Alpaca rows with an input "
                        "(as in the demo).", show_default=False)] = "",
    base: Annotated[bool, typer.Option(
        "--base", help="Add the base model alone as a row named 'base'.")] = False,
    base_only: Annotated[bool, typer.Option(
        "--base-only", help="Only the base model (with the first adapter's prompt format), "
                            "to compare.")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="At most this many new tokens.")] = 64,
    temperature: Annotated[float, typer.Option(
        min=0.0, help="0 decodes greedily (repeatable); above 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option(
        help="Sample from the smallest set of tokens whose probability reaches this.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(
        help="Seed for sampling (temperature > 0); each row draws from its own generator.",
        show_default=False)] = None,
    base_model: Annotated[Optional[str], typer.Option(
        help="Use this base model instead of the one recorded in the adapter folders.",
        show_default=False)] = None,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Send PROMPT as is, without the adapters' prompt templates (adapters "
                      "trained on text rows).")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print {\"outputs\": {name: text}} on stdout.")] = False,
) -> None:
    from engine.train.generate import generate_many

    folders = list(adapter or [])
    if not folders and not base_model:
        fail("give at least one --adapter (or --base-model with --base)")
    panels = not as_json and (len(folders) + (base and not base_only) > 1)
    out = Console(highlight=False)
    texts: dict[str, str] = {}
    live = None
    if panels and out.is_terminal:
        from rich.live import Live
        live = Live(console=out, refresh_per_second=8, transient=False)

    def on_text(name: str, text: str) -> None:
        texts[name] = text
        if live is not None:
            live.update(_panels(texts))

    try:
        if live is not None:
            live.start()
        try:
            results = generate_many(folders, prompt, input=input_text,
                                    include_base=base or (base_only and not folders),
                                    base_only=base_only, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p, seed=seed,
                                    base_model=base_model, raw=raw, on_text=on_text,
                                    log=lambda m: stderr.print(Text(m, style="dim")))
            if live is not None:
                live.update(_panels({g.name: g.text for g in results}))
        finally:
            if live is not None:
                live.stop()
    except UserError as e:
        fail(str(e))
    outputs = {g.name: g.text for g in results}
    if as_json:
        sys.stdout.write(json.dumps({"outputs": outputs}, ensure_ascii=False) + "\n")
    elif panels:
        if live is None:
            out.print(_panels(outputs))
    else:
        sys.stdout.write(results[0].text + "\n")


def _panels(texts: dict[str, str]) -> Group:
    return Group(*(Panel(Text(text), title=name, title_align="left")
                   for name, text in texts.items()))
