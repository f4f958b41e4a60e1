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
from mlora_tui.commands.common import EngineOption, engine_request, fail, stderr

GENERATE_HELP = "\n\n".join([
    "Each adapter (and the base model with --base) answers PROMPT, all in one batched "
    "decode through one base model.",
    "The prompt is formatted with each adapter's own prompt template, the way training "
    "formatted an instruction (with --input, its input). The base model is the one the "
    "adapters were trained on. One adapter alone prints only its text; several print a "
    "panel each (streamed on a terminal); --json prints {\"outputs\": {name: text}}.",
    "With --job (and --engine when several run), a running engine's jobs answer instead, "
    "each with its weights as of the request, while they go on training.",
    "[bold]Exit codes[/bold]: 0 generated; 2 bad adapter folder, base model or option; "
    "3 no engine.",
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
    job: Annotated[Optional[list[str]], typer.Option(
        "--job", help="A job of a running engine (its weights as of now); repeat for more.",
        show_default=False)] = None,
    engine: EngineOption = None,
) -> None:
    if job or engine:
        if adapter:
            fail("give --adapter folders or a running engine's --job, not both")
        _from_engine(engine, list(job or []), prompt, input_text, base or base_only,
                     max_new_tokens, temperature, top_p, seed, raw, as_json)
        return
    folders = list(adapter or [])
    if not folders and not base_model:
        fail("give at least one --adapter (or --base-model with --base)")
    panels = not as_json and (len(folders) + (base and not base_only) > 1)
    options = dict(input=input_text, include_base=base or (base_only and not folders),
                   base_only=base_only, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, seed=seed, base_model=base_model,
                   raw=raw)
    results, shown = _from_folders(folders, prompt, options, panels)
    outputs = {g.name: g.text for g in results}
    if as_json:
        sys.stdout.write(json.dumps({"outputs": outputs}, ensure_ascii=False) + "\n")
    elif panels:
        if not shown:
            Console(highlight=False).print(_panels(outputs))
    else:
        sys.stdout.write(results[0].text + "\n")


def _from_folders(folders: list[Path], prompt: str, options: dict, panels: bool):
    """``generate_many``'s answers; with ``panels`` on a terminal, streamed as panels
    (returns whether they were shown so)."""
    from engine.train.generate import generate_many

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
            results = generate_many(folders, prompt, on_text=on_text,
                                    log=lambda m: stderr.print(Text(m, style="dim")),
                                    **options)
            if live is not None:
                live.update(_panels({g.name: g.text for g in results}))
        finally:
            if live is not None:
                live.stop()
    except UserError as e:
        fail(str(e))
    return results, live is not None


def _panels(texts: dict[str, str]) -> Group:
    return Group(*(Panel(Text(text), title=name, title_align="left")
                   for name, text in texts.items()))


def _from_engine(engine: Optional[str], jobs: list[str], prompt: str, input_text: str,
                 base: bool, max_new_tokens: int, temperature: float, top_p: float,
                 seed: Optional[int], raw: bool, as_json: bool) -> None:
    """A running engine's jobs answer (every unfinished job's when none is named)."""
    out = Console(highlight=False)
    live = None
    titles: dict[str, str] = {}
    if not as_json and out.is_terminal:
        from rich.live import Live
        live = Live(console=out, refresh_per_second=8)

    def on_reply(reply: dict) -> None:
        for row in reply.get("rows", []):
            step = row.get("step")
            titles[row["name"]] = row["name"] + ("" if step is None else f" (step {step})")
        if live is not None:
            live.start()

    def on_update(data: dict) -> None:
        if live is not None:
            live.update(_panels({titles.get(n, n): t for n, t in data["texts"].items()}))

    async def ask(client):
        return await client.generate(prompt, jobs=jobs or None, base=base, input=input_text,
                                     max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p, seed=seed, raw=raw, on_reply=on_reply,
                                     on_update=on_update)

    try:
        result = engine_request(engine, ask)
    finally:
        if live is not None:
            live.stop()
    if result.get("error"):
        fail(result["error"], 1)
    texts = result.get("texts", {})
    if as_json:
        sys.stdout.write(json.dumps({"outputs": texts}, ensure_ascii=False) + "\n")
    elif live is None:
        out.print(_panels({titles.get(n, n): t for n, t in texts.items()}))
