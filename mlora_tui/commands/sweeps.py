"""`mlora sweep show`: a sweep's trials, best first, from its output_dir/sweep-<name>.json.
No torch; no request to the engine (the file is rewritten after every report)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mlora_tui.commands.common import EngineOption, fail, target

sweep_app = typer.Typer(help="Hyperparameter sweeps ([[sweep]] tables): their trials.",
                        no_args_is_help=True, rich_markup_mode="rich")

SHOW_HELP = ("Show a sweep's trials, best first: parameters, state, the metric's latest value "
             "and history, why a trial was pruned. From a running engine (-e, or the only "
             "one running), or from a run's folder with --dir (running or finished).")


@sweep_app.command("show", help=SHOW_HELP)
def show(
    name: Annotated[Optional[str], typer.Argument(
        help="The sweep; default: every sweep of the run.", show_default=False)] = None,
    engine: EngineOption = None,
    directory: Annotated[Optional[Path], typer.Option(
        "--dir", help="A run's output_dir (instead of a running engine).",
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the sweep file(s) as JSON on stdout.")] = False,
) -> None:
    output_dir = directory if directory is not None else Path(target(engine).output_dir)
    files = ([output_dir / f"sweep-{name}.json"] if name
             else sorted(output_dir.glob("sweep-*.json")))
    if not files:
        fail(f"{output_dir}: no sweep-*.json (the run has no [[sweep]], or no trial started)")
    summaries = []
    for path in files:
        try:
            summaries.append(json.loads(path.read_text()))
        except FileNotFoundError:
            known = ", ".join(p.stem[6:] for p in output_dir.glob("sweep-*.json")) or "none"
            fail(f"{path}: no such sweep (sweeps of this run: {known})")
        except (OSError, ValueError) as e:
            fail(f"{path}: cannot read it ({e})")
    if as_json:
        sys.stdout.write(json.dumps(summaries[0] if name else summaries, indent=2) + "\n")
        return
    console = Console(highlight=False)
    for summary in summaries:
        console.print(sweep_table(summary))


def sweep_table(summary: dict) -> Table:
    """One sweep's trials, best first; the best marked, pruned and failed trials dimmed."""
    arrow = "lower" if summary.get("direction") == "minimize" else "higher"
    started = len(summary.get("trials", []))
    table = Table(title=Text(f"sweep {summary['name']}: {summary['metric']} ({arrow} is "
                             f"better), {started}/{summary.get('trials_total', started)} "
                             f"trials started"), title_justify="left")
    for column, justify in (("trial", "left"), ("state", "left"), ("params", "left"),
                            ("metric", "right"), ("history", "left"), ("note", "left")):
        table.add_column(column, justify=justify, no_wrap=column in ("trial", "state"))
    for trial in summary.get("trials", []):
        history = trial.get("metric_history") or []
        value = trial.get("value")
        if value is None and history:
            value = history[-1][1]
        best = trial["job"] == summary.get("best")
        style = "bold green" if best else ("dim" if trial["state"] in ("pruned", "failed")
                                           else "")
        params = ", ".join(f"{k}={_short(v)}" for k, v in trial.get("params", {}).items())
        table.add_row(trial["job"] + (" *" if best else ""), trial["state"], params,
                      "-" if value is None else f"{value:.4g}", _spark([v for _, v in history]),
                      trial.get("reason") or "", style=style)
    return table


_BARS = "▁▂▃▄▅▆▇█"


def _spark(values: list[float]) -> str:
    """The metric's history as a small bar chart (the last 16 reports)."""
    values = values[-16:]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(_BARS[min(7, int((v - low) / span * 7.999))] for v in values)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
