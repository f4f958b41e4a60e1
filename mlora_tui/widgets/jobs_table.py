"""The jobs pane: one row per adapter, reconciled by key against the buffered state.

Columns have fixed widths and keys, and rows are keyed by job name: a redraw adds rows for
new jobs, rewrites only the cells whose text changed and removes rows that no longer match
the filter. The table is never rebuilt, so the cursor and scroll position stay put and a
redraw sends only what changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from rich.text import Text
from textual.message import Message
from textual.widgets import DataTable

from engine.core.jobs import RUNNING
from mlora_tui.state import JobView
from mlora_tui.widgets import formatting as fmt

# (key, label, width of the text, right-aligned). Every column is one cell wider than its
# text, the gap on its left, so that all eleven fit in a 100-column terminal with a cell to
# spare for the scroll bar. A variant label of up to two parts fits (``mixlora-dynamic``,
# ``dora+loraplus``); the adapter pane shows a longer one whole.
COLUMNS = (
    ("name", "adapter", 13, False),
    ("variant", "variant", 15, False),
    ("r", "r", 3, True),
    ("state", "state", 9, False),
    ("step", "step", 9, True),
    ("epoch", "epoch", 5, True),
    ("loss", "loss", 6, True),
    ("eval_loss", "eval", 6, True),
    ("lr", "lr", 7, True),
    ("tokens_per_s", "tok/s", 6, True),
    ("eta", "ETA", 7, True),
)
_RIGHT = {key for key, _, _, right in COLUMNS if right}


def row_cells(job: JobView) -> dict[str, str]:
    """The text of each cell of a job's row."""
    return {
        "name": job.name,
        "variant": job.variant,
        "r": fmt.DASH if job.r is None else str(job.r),
        "state": job.state,
        "step": f"{job.step}/{job.total_steps}",
        "epoch": fmt.epoch(job.epoch),
        "loss": fmt.loss(job.loss),
        "eval_loss": fmt.loss(job.eval_loss),
        "lr": fmt.lr(job.lr),
        # Speed and time left mean something only while the job is in the batch.
        "tokens_per_s": fmt.rate(job.tokens_per_s) if job.state == RUNNING else fmt.DASH,
        "eta": fmt.eta(job.eta_s) if job.state == RUNNING else fmt.DASH,
    }


class JobsTable(DataTable):
    """The live jobs table. Posts ``JobHighlighted`` when the cursor lands on a job."""

    DEFAULT_CSS = """
    JobsTable {
        height: auto;
        max-height: 100%;
        background: $surface;
        scrollbar-size-vertical: 1;
    }
    """

    @dataclass
    class JobHighlighted(Message):
        name: str | None

    def __init__(self, **kwargs):
        super().__init__(cursor_type="row", zebra_stripes=True, cell_padding=0, **kwargs)
        self._shown: dict[str, dict[str, str]] = {}

    def on_mount(self) -> None:
        for key, label, width, _ in COLUMNS:
            self.add_column(self._cell(key, label, {}), width=width + 1, key=key)

    def reconcile(self, jobs: Iterable[JobView], name_filter: str = "") -> None:
        """Make the rows match ``jobs`` (those whose name contains ``name_filter``)."""
        wanted = [job for job in jobs if name_filter.lower() in job.name.lower()]
        names = [job.name for job in wanted]
        keep = set(names)
        for gone in [name for name in self._shown if name not in keep]:
            self.remove_row(gone)
            del self._shown[gone]
        variables = self.app.theme_variables
        added = False
        for job in wanted:
            cells = row_cells(job)
            shown = self._shown.get(job.name)
            if shown is None:
                self.add_row(*(self._cell(key, cells[key], variables) for key, *_ in COLUMNS),
                             key=job.name)
                added = True
            else:
                for key, text in cells.items():
                    if shown[key] != text:
                        self.update_cell(job.name, key, self._cell(key, text, variables))
            self._shown[job.name] = cells
        if added and [row.key.value for row in self.ordered_rows] != names:
            # A row shown again after a filter change goes back to its place.
            position = {name: i for i, name in enumerate(names)}
            self.sort("name", key=lambda cell: position[cell.plain.strip()])

    @staticmethod
    def _cell(key: str, text: str, variables) -> Text:
        style = fmt.theme_style(fmt.STATE_STYLES.get(text, ""), variables) if key == "state" else ""
        if key in _RIGHT:
            return Text(text, style=style, justify="right", no_wrap=True, overflow="ellipsis")
        cell = Text(" ", no_wrap=True, overflow="ellipsis")
        cell.append(text, style=style)
        return cell

    @property
    def highlighted_job(self) -> str | None:
        if not self.row_count:
            return None
        row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        return row_key.value

    def select_job(self, name: str) -> None:
        if name in self._shown:
            self.move_cursor(row=self.get_row_index(name))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self.post_message(self.JobHighlighted(event.row_key.value))
