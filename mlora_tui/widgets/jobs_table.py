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
from textual.strip import Strip
from textual.widgets import DataTable

from engine.core.jobs import CANCELLED, DONE, FAILED, PAUSED, QUEUED, RUNNING
from mlora_tui.state import JobView
from mlora_tui.widgets import formatting as fmt

# (key, label, width of the text, right-aligned). Every column is one cell wider than its
# text, the gap on its left, so that the eleven other than score fit in a 100-column
# terminal with a cell to spare for the scroll bar. A variant label of up to two parts fits
# (``mixlora-dynamic``, ``dora+loraplus``); the adapter pane shows a longer one whole. The
# score (the first [[eval]] task's acc) is shown only once some job has scores.
COLUMNS = (
    ("name", "adapter", 13, False),
    ("variant", "variant", 15, False),
    ("r", "r", 3, True),
    ("state", "state", 9, False),
    ("step", "step", 9, True),
    ("epoch", "epoch", 5, True),
    ("loss", "loss", 6, True),
    ("eval_loss", "eval", 6, True),
    ("score", "score", 6, True),
    ("lr", "lr", 7, True),
    ("tokens_per_s", "tok/s", 6, True),
    ("eta", "ETA", 7, True),
)
_RIGHT = {key for key, _, _, right in COLUMNS if right}
_WIDTH = {key: width for key, _, width, _ in COLUMNS}
LABELS = {key: label for key, label, _, _ in COLUMNS}
# Columns given up first when the terminal is narrow; name, state, step, loss, eval and ETA
# always stay (the table scrolls sideways below their width). The score goes before the
# epoch: at 80 columns the table shows it in place of the variant.
DROP_ORDER = ("lr", "tokens_per_s", "r", "variant", "score", "epoch")
NAME_MAX = 32       # the name column grows up to this when there is room to spare
# Sorted by state: what is happening now first, how jobs ended last.
_STATE_ORDER = {state: i for i, state in enumerate(
    (RUNNING, QUEUED, PAUSED, DONE, FAILED, CANCELLED))}


def visible_columns(width: int, scores: bool = True) -> list[str]:
    """The keys of the columns that fit in ``width`` cells, in table order; without
    ``scores`` (no job has any) the score column is not shown at all."""
    hidden: set[str] = set() if scores else {"score"}
    for key in (None, *DROP_ORDER):
        if key:
            hidden.add(key)
        if sum(_WIDTH[k] + 1 for k in _WIDTH if k not in hidden) <= width:
            break
    return [key for key in _WIDTH if key not in hidden]


def _last(value) -> tuple:
    """Unknown values (None, NaN: a diverged loss) sort after every known one."""
    unknown = value is None or value != value
    return (unknown, 0 if unknown else value)


def sort_key(column: str, job: JobView) -> tuple:
    """How a job ranks when the table is sorted by ``column`` (ascending)."""
    running = job.state == RUNNING
    return {
        "name": lambda: (job.name.lower(),),
        "variant": lambda: (job.variant, job.name),
        "r": lambda: _last(job.r),
        "state": lambda: (_STATE_ORDER.get(job.state, len(_STATE_ORDER)),),
        "step": lambda: (job.step,),
        "epoch": lambda: _last(job.epoch),
        "loss": lambda: _last(job.loss),
        "eval_loss": lambda: _last(job.eval_loss),
        # Higher is better: the best score first.
        "score": lambda: _last(None if job.headline_score is None else -job.headline_score[1]),
        "lr": lambda: _last(job.lr),
        "tokens_per_s": lambda: _last(job.tokens_per_s if running else None),
        "eta": lambda: _last(job.eta_s if running else None),
    }[column]()


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
        "score": fmt.DASH if job.headline_score is None else fmt.percent(job.headline_score[1]),
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

    @dataclass
    class SortChosen(Message):
        """A column header was clicked: sort by that column."""
        column: str

    def __init__(self, **kwargs):
        super().__init__(cursor_type="row", zebra_stripes=True, cell_padding=0, **kwargs)
        self._shown: dict[str, dict[str, str]] = {}
        self.shown_columns: list[str] = [key for key, *_ in COLUMNS]
        self.has_scores = False     # some job has scores: the score column is wanted

    def on_mount(self) -> None:
        for key, label, width, _ in COLUMNS:
            self.add_column(self._cell(key, label, {}), width=width + 1, key=key)

    def on_resize(self) -> None:
        self._fit()

    def _fit(self) -> None:
        """Hide the columns that do not fit (width 0: keys and order stay), and give the
        name column the room left over, up to the longest name."""
        width = self.size.width - 1         # a cell for the vertical scroll bar
        self.shown_columns = visible_columns(width, self.has_scores)
        spare = width - sum(_WIDTH[key] + 1 for key in self.shown_columns)
        longest = max(map(len, self._shown), default=0)
        name_width = _WIDTH["name"] + max(0, min(spare, longest - _WIDTH["name"],
                                                 NAME_MAX - _WIDTH["name"]))
        changed = False
        for key, column in self.columns.items():
            wanted = 0 if key.value not in self.shown_columns else (
                name_width if key.value == "name" else _WIDTH[key.value]) + 1
            if column.width != wanted:
                column.width = wanted
                changed = True
        if changed:
            self._require_update_dimensions = True
            self.refresh()

    def reconcile(self, jobs: Iterable[JobView], name_filter: str = "",
                  sort: str | None = None) -> None:
        """Make the rows match ``jobs`` (those whose name contains ``name_filter``), in
        their order or sorted by the column ``sort``."""
        jobs = list(jobs)
        wanted = [job for job in jobs if name_filter.lower() in job.name.lower()]
        if sort is not None:
            wanted.sort(key=lambda job: sort_key(sort, job))
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
        has_scores = any(job.scores for job in jobs)
        if added or has_scores != self.has_scores:
            self.has_scores = has_scores
            self._fit()     # a longer name may widen its column; scores bring theirs
        if [row.key.value for row in self.ordered_rows] != names:
            # A row shown again after a filter change goes back to its place; a sorted
            # table follows its values. The cursor stays on its job, not on its row index.
            current = self.highlighted_job
            position = {name: i for i, name in enumerate(names)}
            self.sort("name", key=lambda cell: position[cell.plain.strip()])
            if current is not None:
                self.move_cursor(row=self.get_row_index(current), scroll=False)

    def restyle(self) -> None:
        """Draw every cell again at the next reconcile (the theme's colours changed)."""
        for cells in self._shown.values():
            cells["state"] = ""

    @staticmethod
    def _cell(key: str, text: str, variables) -> Text:
        style = fmt.theme_style(fmt.STATE_STYLES.get(text, ""), variables) if key == "state" else ""
        if key in _RIGHT:
            return Text(text, style=style, justify="right", no_wrap=True, overflow="ellipsis")
        cell = Text(" ", no_wrap=True, overflow="ellipsis")
        cell.append(text, style=style)
        return cell

    def render_line(self, y: int) -> Strip:
        # A hidden column (width 0) leaves an empty segment without a style, which Textual's
        # NO_COLOR filter cannot take: drop those.
        strip = super().render_line(y)
        if len(self.shown_columns) == len(COLUMNS):
            return strip
        return Strip([segment for segment in strip if segment.text], strip.cell_length)

    @property
    def highlighted_job(self) -> str | None:
        if not self.row_count:
            return None
        row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        return row_key.value

    def select_job(self, name: str) -> None:
        if name in self._shown:
            self.move_cursor(row=self.get_row_index(name))

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        self.post_message(self.SortChosen(event.column_key.value))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self.post_message(self.JobHighlighted(event.row_key.value))
