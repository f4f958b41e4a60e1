"""`mlora evaluate`: adapters side by side on multiple-choice tasks and perplexity (imports
torch inside the command only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from engine.core.errors import UserError
from mlora_tui.commands.common import fail, stderr
from mlora_tui.score_table import results_table

EVALUATE_HELP = "\n\n".join([
    "Evaluate adapters (and the base model alone with --base) on multiple-choice tasks and "
    "perplexity, every adapter in the same batched passes through one base model.",
    "Each --task is [NAME:]FORMAT=FILE: FORMAT one of arc-e, arc-c, boolq, obqa, piqa, siqa, "
    "hellaswag, winogrande, csqa (lm-evaluation-harness 0.4.13's task of that name, on rows "
    "in its Hugging Face dataset's columns), mc (question, choices, answer) or perplexity "
    "(text, Alpaca or messages rows); FILE is .jsonl, .json or .parquet.",
    "With CONFIG instead: every adapter of that run, on its \\[\\[eval]] tasks.",
    "[bold]Exit codes[/bold]: 0 evaluated; 2 bad adapter folder, task file or option.",
])


def evaluate(
    config: Annotated[Optional[Path], typer.Argument(
        help="A run's config: evaluate its adapters on its \\[\\[eval]] tasks.",
        show_default=False)] = None,
    adapter: Annotated[Optional[list[Path]], typer.Option(
        "--adapter", help="An adapter folder (this product's or PEFT's); repeat for more.",
        show_default=False)] = None,
    base: Annotated[bool, typer.Option(
        "--base", help="Add the base model alone as a row named 'base'.")] = False,
    task: Annotated[Optional[list[str]], typer.Option(
        "--task", help="[NAME:]FORMAT=FILE; repeat for more.", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option(
        help="Only the first N items of each task.", show_default=False)] = None,
    method: Annotated[str, typer.Option(
        help="loglik: lm-evaluation-harness's scoring; letter: m-LoRA's zero-shot prompts "
             "and label tokens.")] = "loglik",
    batch_size: Annotated[int, typer.Option(
        help="Sequences per forward pass, all adapters counted.")] = 64,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the results as one JSON document on stdout.")] = False,
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", help="Also write the JSON document to this file.",
        show_default=False)] = None,
    base_model: Annotated[Optional[str], typer.Option(
        help="The base model folder (default: the one the adapters record).",
        show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option(
        help="fp32, bf16 or fp16 (default: the adapters' training dtype).",
        show_default=False)] = None,
    quantize: Annotated[Optional[str], typer.Option(
        help="none, 4bit or 8bit (default: as the adapters were trained).",
        show_default=False)] = None,
) -> None:
    from engine.core.eval_tasks import check_task_keys, parse_task_arg

    try:
        if config is not None:
            if adapter or task:
                raise UserError("give either CONFIG or --adapter/--task, not both")
            from engine.core.eval_plan import config_evaluation
            plan = config_evaluation(config, limit=limit)
            folders, specs = plan.adapters, plan.tasks
            base_model = base_model or plan.base_model
        else:
            if not task:
                raise UserError("no task: give --task [NAME:]FORMAT=FILE (or a CONFIG with "
                                "[[eval]] tables)")
            folders = list(adapter or [])
            specs = [parse_task_arg(t, method=method, limit=limit) for t in task]
        check_task_keys(specs)
        document = _run(folders, specs, base, base_model, dtype, quantize, batch_size)
    except UserError as e:
        fail(str(e))
    text = json.dumps(document, indent=2)
    if output is not None:
        try:
            output.write_text(text + "\n")
        except OSError as e:
            fail(f"{output}: cannot write the results ({e.strerror or e})")
    if as_json:
        sys.stdout.write(text + "\n")
    else:
        stderr.print(results_table(document["results"], [s.key for s in specs]))


def _run(folders, specs, base, base_model, dtype, quantize, batch_size) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from engine.train.evaluate import evaluate as run_evaluation

    bars: dict[str, int] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=stderr, transient=True) as bar:
        def progress(key: str, done: float, total: int) -> None:
            if key not in bars:
                bars[key] = bar.add_task(key, total=total)
            bar.update(bars[key], completed=done)

        return run_evaluation(folders, specs, include_base=base, base_model=base_model,
                              dtype=dtype, quantize=quantize, batch_size=batch_size,
                              progress=progress,
                              log=lambda m: stderr.print(Text(m, style="dim")))
