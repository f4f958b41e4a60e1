"""The jobs pane: one row per adapter, reconciled by key against the buffered state.

Columns have fixed widths and keys, and rows are keyed by job name: a redraw adds rows for
new jobs, rewrites only the cells whose text changed and removes rows that no longer match
the filter. The table is never rebuilt, so the cursor and scroll position stay put and a
redraw sends only what changed.

A sweep's trials are grouped under one row of the sweep (its name, trials done / pruned /
running of the total, the best value of its metric); enter on that row folds the group or
unfolds it. A sweep of more than ``FOLD_OVER`` trials starts folded: at 80x24 the table has
room for about nine rows, so a larger sweep unfolded would push every other job out of sight.
Sorting sorts the trials within their group, and a group ranks where its best-sorted trial
would; jobs of no sweep sort as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from rich.text import Text
from textual.message import Message
from textual.strip import Strip
from textual.widgets import DataTable

from engine.core.jobs import CANCELLED, DONE, FAILED, PAUSED, PRUNED, QUEUED, RUNNING
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
    (RUNNING, QUEUED, PAUSED, DONE, PRUNED, FAILED, CANCELLED))}
FOLD_OVER = 8       # a sweep with more trials than this starts folded
GROUP = "\x00sweep:"    # a group row's key: the prefix and the sweep's name (no job's name)
FOLDED, UNFOLDED = "▸", "▾"


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


def group_key(sweep: str) -> str:
    return GROUP + sweep


def sweep_of_key(key: str | None) -> str | None:
    """The sweep of a group row's key; None for a job's row."""
    return key[len(GROUP):] if key is not None and key.startswith(GROUP) else None


def is_unfolded(sweep: str, total: int, unfolded: Mapping[str, bool]) -> bool:
    """Unfolded as the user left it, else when the sweep is small enough."""
    return unfolded.get(sweep, total <= FOLD_OVER)


def best_value(summary: Mapping[str, Any]) -> float | None:
    """The metric's value of the sweep's best trial (its latest report while it trains)."""
    from mlora_tui.widgets.sweep_view import trial_value
    for trial in summary.get("trials") or []:
        if trial.get("job") == summary.get("best"):
            return trial_value(trial)
    return None


def group_cells(sweep: str, trials: list[JobView], summary: Mapping[str, Any],
                unfolded: bool) -> dict[str, str]:
    """The text of a sweep's row: its name and trials done and pruned (name column), how
    many run (state), trials ended of the total (step), the metric and its best value."""
    states = [job.state for job in trials]
    total = max(int(summary.get("trials_total") or 0), len(trials))
    done, pruned, running = states.count(DONE), states.count(PRUNED), states.count(RUNNING)
    ended = sum(job.finished for job in trials)
    state = (f"{running} running" if running else "finished" if ended == total else "waiting")
    metric = str(summary.get("metric") or "")
    best = best_value(summary)
    cells = {key: "" for key, *_ in COLUMNS}
    cells.update(name=f"{UNFOLDED if unfolded else FOLDED} {sweep}: {done} done, {pruned} pruned",
                 variant=f"sweep {metric}", state=state, step=f"{ended}/{total}")
    if metric == "eval_loss" or not metric.endswith("acc"):
        cells["eval_loss"] = fmt.loss(best)
    else:
        cells["score"] = fmt.DASH if best is None else fmt.percent(best)
    return cells


def table_rows(jobs: list[JobView], sweeps: Mapping[str, Mapping[str, Any]], name_filter: str,
               sort: str | None, unfolded: Mapping[str, bool]) -> list[tuple[str, dict[str, str]]]:
    """(row key, cells) of every row, in table order: jobs of no sweep as themselves, each
    sweep as its group row followed by its trials (when unfolded), trials indented."""
    wanted = [job for job in jobs if name_filter.lower() in job.name.lower()]
    if sort is not None:
        wanted.sort(key=lambda job: sort_key(sort, job))
    items: list[tuple[str, list[JobView]]] = []     # (sweep or "", its jobs), in order
    where: dict[str, int] = {}
    for job in wanted:
        if job.sweep is None:
            items.append(("", [job]))
        elif job.sweep in where:
            items[where[job.sweep]][1].append(job)
        else:
            where[job.sweep] = len(items)
            items.append((job.sweep, [job]))
    rows = []
    for sweep, members in items:
        if not sweep:
            rows.append((members[0].name, row_cells(members[0])))
            continue
        summary = sweeps.get(sweep) or {}
        trials = [job for job in jobs if job.sweep == sweep]
        total = max(int(summary.get("trials_total") or 0), len(trials))
        unfold = is_unfolded(sweep, total, unfolded)
        rows.append((group_key(sweep), group_cells(sweep, trials, summary, unfold)))
        if unfold:
            for job in members:
                cells = row_cells(job)
                cells["name"] = "  " + cells["name"]
                rows.append((job.name, cells))
    return rows


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
    class GroupToggled(Message):
        """Enter (or a click) on a sweep's row: fold or unfold its trials."""
        sweep: str

    @dataclass
    class SortChosen(Message):
        """A column header was clicked: sort by that column."""
        column: str

    def __init__(self, **kwargs):
        super().__init__(cursor_type="row", zebra_stripes=True, cell_padding=0, **kwargs)
        self._shown: dict[str, dict[str, str]] = {}
        self.shown_columns: list[str] = [key for key, *_ in COLUMNS]
        self.has_scores = False     # some job has scores: the score column is wanted
        self._longest = 0           # the longest name cell's text

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
        longest = max((len(cells["name"]) for cells in self._shown.values()), default=0)
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
                  sort: str | None = None, sweeps: Mapping[str, Mapping[str, Any]] | None = None,
                  unfolded: Mapping[str, bool] | None = None) -> None:
        """Make the rows match ``jobs`` (those whose name contains ``name_filter``), in
        their order or sorted by the column ``sort``, trials grouped under their sweep."""
        jobs = list(jobs)
        rows = table_rows(jobs, sweeps or {}, name_filter, sort, unfolded or {})
        names = [key for key, _ in rows]
        keep = set(names)
        for gone in [name for name in self._shown if name not in keep]:
            self.remove_row(gone)
            del self._shown[gone]
        variables = self.app.theme_variables
        added = False
        for key, cells in rows:
            shown = self._shown.get(key)
            group = key.startswith(GROUP)
            if shown is None:
                self.add_row(*(self._cell(column, cells[column], variables, group)
                               for column, *_ in COLUMNS), key=key)
                added = True
            else:
                for column, text in cells.items():
                    if shown[column] != text:
                        self.update_cell(key, column, self._cell(column, text, variables, group))
            self._shown[key] = cells
        has_scores = any(job.scores for job in jobs)
        longest = max((len(cells["name"]) for cells in self._shown.values()), default=0)
        if added or has_scores != self.has_scores or longest != self._longest:
            # A longer name (or a sweep's row counting more) may widen its column; scores
            # bring theirs.
            self.has_scores, self._longest = has_scores, longest
            self._fit()
        if [row.key.value for row in self.ordered_rows] != names:
            # A row shown again after a filter change goes back to its place; a sorted
            # table follows its values. The cursor stays on its row's key, not its index.
            current = self.highlighted_key
            position = {id(self.get_cell(key, "name")): i for i, key in enumerate(names)}
            self.sort("name", key=lambda cell: position[id(cell)])
            if current is not None:
                self.move_cursor(row=self.get_row_index(current), scroll=False)

    def restyle(self) -> None:
        """Draw every cell again at the next reconcile (the theme's colours changed)."""
        for cells in self._shown.values():
            cells["state"] = ""

    @staticmethod
    def _cell(key: str, text: str, variables, group: bool = False) -> Text:
        if group:       # a sweep's row
            style = "bold" if key == "name" else "dim" if key == "variant" else ""
        elif key == "state":
            style = fmt.theme_style(fmt.STATE_STYLES.get(text, ""), variables)
        else:
            style = ""
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
    def highlighted_key(self) -> str | None:
        if not self.row_count:
            return None
        row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        return row_key.value

    @property
    def highlighted_job(self) -> str | None:
        """The job under the cursor (None on a sweep's row)."""
        key = self.highlighted_key
        return None if sweep_of_key(key) is not None else key

    @property
    def highlighted_sweep(self) -> str | None:
        return sweep_of_key(self.highlighted_key)

    def select_job(self, name: str) -> None:
        if name in self._shown:
            self.move_cursor(row=self.get_row_index(name))

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        self.post_message(self.SortChosen(event.column_key.value))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        key = event.row_key.value
        self.post_message(self.JobHighlighted(None if sweep_of_key(key) is not None else key))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        sweep = sweep_of_key(event.row_key.value)
        if sweep is not None:
            event.stop()
            self.post_message(self.GroupToggled(sweep))
