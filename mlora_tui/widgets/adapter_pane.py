"""The adapter pane: the selected adapter's variant, then every setting as its config gave
them, with its latest evaluation scores (one line per [[eval]] task) first.

Fields come from the job's ``adapter`` dict (all of ``AdapterConfig``) in its own order, so
a field added to the config shows up here without a change. Settings left to a default that
the engine resolves (targets, seed, cutoff) say so.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

from mlora_tui.state import JobView
from mlora_tui.widgets import formatting as fmt

_UNSET = {
    "target_modules": "family default",
    "warmup_steps": "from warmup_ratio",
    "cutoff_len": "[train] cutoff_len",
    "seed": "[train] seed",
    "max_grad_norm": "no clipping",
    "init_from": "fresh weights",
}


def _value(name: str, value: Any, job: JobView, width: int) -> Text:
    if isinstance(value, str) and "/" in value:
        # A path: its end says the most, and a path folded a character a line says nothing.
        return Text(fmt.shorten_middle(value, width), no_wrap=True)
    if name == "target_modules" and value is None and job.targets:
        return Text(", ".join(job.targets))
    if value is None or value == "":
        return Text(_UNSET.get(name, fmt.DASH), style="dim")
    if isinstance(value, bool):
        return Text("yes" if value else "no")
    if isinstance(value, (list, tuple)):
        return Text(", ".join(map(str, value)))
    if isinstance(value, float):
        return Text(f"{value:g}")
    return Text(str(value))


class AdapterPane(VerticalScroll):
    """Scrollable list of the selected adapter's settings."""

    DEFAULT_CSS = """
    AdapterPane {
        background: $surface;
        scrollbar-size-vertical: 1;
    }
    AdapterPane > Static {
        width: 1fr;
    }
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._body = Static("no adapter selected")
        self._shown: tuple | None = None
        self._job: JobView | None = None

    def compose(self):
        yield self._body

    def on_resize(self) -> None:
        self.show(self._job)    # paths are shortened to the width

    def show(self, job: JobView | None) -> None:
        self._job = job
        width = self.scrollable_content_region.width
        key = None if job is None else (job.name, job.variant, repr(job.adapter),
                                        tuple(job.targets), job.train_examples,
                                        job.val_examples, job.reason, repr(job.scores),
                                        job.scores_step, width)
        if key == self._shown:
            return
        self._shown = key
        self.border_title = f"Adapter {job.name}" if job else "Adapter"
        if job is None:
            self._body.update(Text("no adapter selected", style="dim"))
            return
        table = Table.grid(padding=(0, 1))
        names = [name for name in job.adapter if name != "name"]
        value_width = max(width - 1 - max(map(len, ["examples", *names,
                                                         *(f"  {t}" for t in job.scores)])), 8)
        table.add_column(style="bold", no_wrap=True)
        # Words wrap whole (a list of modules); a word too long for the pane is cut short.
        table.add_column(overflow="ellipsis")
        table.add_row("variant", Text(job.variant))
        if job.scores:     # first: what a look at the pane is most often for
            # The tasks under a heading of their own, indented: a task may share a
            # setting's name.
            at = "" if job.scores_step is None else f"at step {job.scores_step}"
            table.add_row("scores", Text(at, style="dim"))
            for task, metrics in job.scores.items():
                table.add_row(f"  {task}", Text(fmt.score_text(metrics)))
        for name in names:
            table.add_row(name, _value(name, job.adapter[name], job, value_width))
        table.add_row("examples", Text(f"{fmt.count(job.train_examples)} train, "
                                       f"{fmt.count(job.val_examples)} validation"))
        if job.reason:
            table.add_row("reason", Text(job.reason))
        self._body.update(table)
