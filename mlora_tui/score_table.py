"""The adapters x tasks table of scores, for `mlora evaluate` and the end of `mlora run`."""

from __future__ import annotations

from typing import Optional

from rich.table import Table
from rich.text import Text


def _headline(scores: dict) -> tuple[Optional[float], str, bool]:
    """(value, text, higher is better) of a task's cell."""
    if "perplexity" in scores:
        return scores["perplexity"], f"ppl {scores['perplexity']:.2f}", False
    text = f"{100 * scores['acc']:.1f}"
    if "acc_norm" in scores:
        text += f" / {100 * scores['acc_norm']:.1f}"
    return scores.get("acc_norm", scores["acc"]), text, True


def results_table(results: dict, keys: list[str], title: str = "evaluation") -> Table:
    """Adapters x tasks: accuracy (acc / acc_norm, in %) or perplexity; the best of each
    column marked with a star. A row without a task's scores shows "-"."""
    table = Table(title=Text(title), caption="acc / acc_norm (%); * = best",
                  caption_justify="left")
    table.add_column("adapter", no_wrap=True)
    for key in keys:
        table.add_column(key, justify="right")
    best = {}
    for key in keys:
        values = [(_headline(r[key]), name) for name, r in results.items() if key in r]
        if values:
            higher = values[0][0][2]
            best[key] = (max if higher else min)(v[0][0] for v in values)
    for name, row in results.items():
        cells = []
        for key in keys:
            if key not in row:
                cells.append(Text("-  "))
                continue
            value, text, _ = _headline(row[key])
            marked = len(results) > 1 and value == best.get(key)
            cells.append(Text(text + (" *" if marked else "  "),
                              style="bold green" if marked else ""))
        table.add_row(name, *cells)
    return table
