"""The loss pane: training loss over steps, drawn in Unicode braille (2x4 dots a cell).

It shows the selected adapter's curve against its whole run (x runs to ``total_steps``, so
the curve fills in as the job trains), or, when ``overlay`` is on, several adapters in one
colour each: all of them when they are few, else the five best (``best_jobs``) and the
selected one, with a legend cut to the pane's width. Eval losses are marked ``◆`` at their
step. The y axis is linear or log (whole decades), optionally over an EMA of the losses,
and spans only what is drawn. ``plot`` and ``legend`` are pure functions of their inputs,
so the drawing is tested without a screen; the widget only re-renders when a shown curve
changes.
"""

from __future__ import annotations

import math
import os
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Sequence

from rich.cells import cell_len
from rich.text import Text
from textual.widget import Widget

from mlora_tui.state import JobView, best_jobs
from mlora_tui.widgets import formatting as fmt

# Bit of each dot in a braille cell, by [row][column] (Unicode's dot numbering).
_DOT_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
_BRAILLE = 0x2800
_PALETTE = ("$primary", "$accent", "$success", "$warning", "$error", "$secondary",
            "bright_cyan", "bright_magenta")
EVAL_MARK = "◆"
BEST = 5                   # curves of the best jobs in the overlay, besides the selected one
EMA_WEIGHT = 0.9           # each smoothed point keeps 90% of the last: about ten steps' memory


@dataclass(frozen=True)
class Series:
    label: str
    steps: Sequence[int]
    losses: Sequence[float]
    style: str
    marks: Sequence[tuple[int, float]] = ()     # (step, eval loss) points


def ema(values: Sequence[float], weight: float = EMA_WEIGHT) -> list[float]:
    """Exponential moving average, debiased (as TensorBoard's) so that the first points
    are not pulled towards zero; non-finite values are skipped (kept as they are)."""
    out: list[float] = []
    _ema_extend(out, values, 0.0, 0, weight)
    return out


def _ema_extend(out: list[float], values: Sequence[float], average: float, count: int,
                weight: float = EMA_WEIGHT) -> tuple[float, int]:
    """Append the EMA of ``values`` to ``out``, going on from ``average`` after ``count``
    finite values; returns where it ended, so a growing curve is smoothed once a point."""
    for value in values:
        if not math.isfinite(value):
            out.append(value)
            continue
        count += 1
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** count))
    return average, count


@dataclass(frozen=True)
class _Axis:
    """The y axis: value to fraction of the height (0 top, 1 bottom), and its labels."""
    to_unit: Callable[[float], float]
    labels: list[tuple[float, str]]      # (fraction of the height, text)


def _axis(values: list[float], log_scale: bool) -> _Axis:
    if log_scale:
        low = math.floor(math.log10(min(values)))
        high = max(math.ceil(math.log10(max(values))), low + 1)
        span = high - low
        return _Axis(lambda v: (high - math.log10(v)) / span,
                     [((high - d) / span, f"{10.0 ** d:g}") for d in range(high, low - 1, -1)])
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    return _Axis(lambda v: (hi - v) / (hi - lo),
                 [(0.0, f"{hi:.3g}"), (0.5, f"{(lo + hi) / 2:.3g}"), (1.0, f"{lo:.3g}")])


def plot(series: Sequence[Series], width: int, height: int, x_max: int,
         log_scale: bool = False) -> list[Text]:
    """Lines of text (``height`` of them, ``width`` cells wide) drawing every series from
    step 0 to ``x_max`` (eval marks on top), with the loss axis on the left (linear, or log
    in whole decades) and the step range below. Only what is drawn sets the y range; a log
    axis leaves out losses of 0 or below."""
    def keep(y: float) -> bool:
        return math.isfinite(y) and (y > 0 or not log_scale)

    curves = [_drawable(s.steps, s.losses, keep) for s in series]
    marks = [[(x, y) for x, y in s.marks if keep(y)] for s in series]
    values = [y for _, ys in curves if ys for y in (min(ys), max(ys))]
    values += [y for pts in marks for _, y in pts]
    rows = height - 1
    if not values or rows < 2:
        return [Text("no loss yet", style="dim", justify="center")] * min(height, 1)
    axis = _axis(values, log_scale)
    margin = max(len(text) for _, text in axis.labels) + 1
    cols = width - margin
    if cols < 4:     # no room to draw: the newest loss of the last curve (the one on top)
        last = next((ys[-1] for _, ys in reversed(curves) if ys), values[-1])
        return [Text(f"loss {last:.4g}")]
    x_max = max(x_max, 1, *(xs[-1] for xs, _ in curves if xs),
                *(x for pts in marks for x, _ in pts))
    px_w, px_h = cols * 2, rows * 4
    bits = [[0] * cols for _ in range(rows)]
    owner = [[-1] * cols for _ in range(rows)]

    def column(x: int) -> int:
        return round(x / x_max * (px_w - 1))

    def pixel(x: int, y: float) -> tuple[int, int]:
        return column(x), round(axis.to_unit(y) * (px_h - 1))

    for index, (xs, ys) in enumerate(curves):
        def dot(x: int, y: int, index=index) -> None:
            bits[y // 4][x // 2] |= _DOT_BITS[y % 4][x % 2]
            owner[y // 4][x // 2] = index
        _trace([pixel(x, y) for x, y in _per_column(xs, ys, column)], dot)
    marked = {}
    for index, pts in enumerate(marks):
        for x, y in pts:
            px, py = pixel(x, y)
            marked[py // 4, px // 2] = index
    label_rows: dict[int, str] = {}
    for unit, text in axis.labels:     # a label whose row is taken (many decades) is left out
        label_rows.setdefault(round(unit * (px_h - 1)) // 4, text)
    lines = [_row(row, bits[row], owner[row], marked, series, label_rows.get(row), margin)
             for row in range(rows)]
    axis_line = Text(" " * (margin - 1) + "└", style="dim")
    left, right = "0", f"step {x_max}"
    axis_line.append(left + right.rjust(cols - len(left)), style="dim")
    lines.append(axis_line)
    return lines


def _drawable(steps: Sequence[int], losses: Sequence[float],
              keep: Callable[[float], bool]) -> tuple[Sequence[int], Sequence[float]]:
    """The points that can be drawn. Checked in C where possible (a finite sum means no NaN
    and no infinity; the lowest value says whether all are above 0): a long run has tens
    of thousands of steps, redrawn four times a second."""
    if not losses or (math.isfinite(sum(losses)) and keep(min(losses))):
        return steps, losses
    kept = [(x, y) for x, y in zip(steps, losses) if keep(y)]
    return [x for x, _ in kept], [y for _, y in kept]


def _per_column(steps: Sequence[int], losses: Sequence[float], column: Callable[[int], int]):
    """(step, loss) of the first, lowest, highest and last loss of each pixel column, in
    that order: all that ``_trace`` draws of a column, found with a bisection and C-level
    min/max per column instead of a Python step per point. ``steps`` rise (one point per
    step), so ``column`` of them does too."""
    i, n = 0, len(steps)
    while i < n:
        x = steps[i]
        j = bisect_left(steps, column(x) + 1, i + 1, n, key=column)
        chunk = losses[i:j]
        yield from ((x, chunk[0]), (x, min(chunk)), (x, max(chunk)), (x, chunk[-1]))
        i = j


def _row(row: int, bits: list[int], owner: list[int], marked: dict, series: Sequence[Series],
         label: str | None, margin: int) -> Text:
    """One line of the plot; cells of one series in a run share one span (fewer segments
    for Rich to render)."""
    line = Text((label or "").rjust(margin - 1), style="dim")
    line.append("│" if label is None else "┤", style="dim")
    run, run_index = [], -1
    for col, index in enumerate(owner):
        mark = marked.get((row, col))
        char = " "
        if mark is not None:
            index, char = mark, EVAL_MARK
        elif index >= 0:
            char = chr(_BRAILLE | bits[col])
        if index != run_index and run:
            line.append("".join(run), style=series[run_index].style if run_index >= 0 else "")
            run = []
        run_index = index
        run.append(char)
    if run:
        line.append("".join(run), style=series[run_index].style if run_index >= 0 else "")
    return line


def _trace(pixels: list[tuple[int, int]], dot) -> None:
    """Draw a polyline through ``pixels`` in order. Points that fall in one pixel column
    become one vertical span, so the cost follows the width, not the number of steps."""
    columns: list[list[int]] = []      # [x, first y, last y, lowest y, highest y]
    for x, y in pixels:
        if columns and columns[-1][0] == x:
            column = columns[-1]
            column[2] = y
            column[3], column[4] = min(column[3], y), max(column[4], y)
        else:
            columns.append([x, y, y, y, y])
    previous = None
    for x, first, last, low, high in columns:
        for y in range(low, high + 1):
            dot(x, y)
        if previous is not None:
            _line(previous, (x, first), dot)
        previous = (x, last)


def _line(a: tuple[int, int], b: tuple[int, int], dot) -> None:
    (x0, y0), (x1, y1) = a, b
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err = dx + dy
    while True:
        dot(x0, y0)
        if (x0, y0) == (x1, y1):
            return
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x0 += sx
        if e2 <= dx:
            err += dx
            y0 += sy


def shorten(text: str, width: int) -> str:
    """``text`` in ``width`` characters at most, cut in the middle: the names of a sweep's
    jobs differ at their ends (``sweep-lr…r16``)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    head = width // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def legend(entries: Sequence[tuple[str, str, str]], width: int, lines: int = 1) -> list[Text]:
    """At most ``lines`` lines of ``width`` cells naming each curve (``● name value``, the
    dot in the curve's style). What gives way, in turn: names cut in the middle down to 6
    characters (a start that all share goes first), the values (names whole again), names
    down to 4, then entries from the end (``+N`` says how many)."""
    names = [name for name, _, _ in entries]
    shared = len(os.path.commonprefix(names)) if len(names) > 1 else 0
    if shared > 1:   # a sweep's names share their start: cut names lose it first
        names = ["…" + name[shared:] for name in names]
    longest = max(map(len, names), default=0)
    tries = [(None, True, len(entries))]
    tries += [(w, True, len(entries)) for w in range(longest - 1, 5, -1)]
    tries += [(None, False, len(entries))]
    tries += [(w, False, len(entries)) for w in range(min(longest - 1, 5), 3, -1)]
    tries += [(4, False, count) for count in range(len(entries) - 1, -1, -1)]
    for name_width, values, count in tries:
        pieces = []
        for (name, value, style), short in zip(entries[:count], names):
            piece = Text(no_wrap=True)
            piece.append("● ", style=style)
            piece.append(name if name_width is None else shorten(short, name_width))
            if values and value:
                piece.append(f" {value}")
            pieces.append(piece)
        if count < len(entries):
            pieces.append(Text(f"+{len(entries) - count}"))
        wrapped = _wrap(pieces, width)
        if wrapped is not None and len(wrapped) <= lines:
            return wrapped
    return [Text()]


def _wrap(pieces: list[Text], width: int) -> list[Text] | None:
    """Pieces two spaces apart, a new line before one that would pass ``width``; None if
    one piece alone is wider."""
    lines: list[Text] = []
    for piece in pieces:
        if lines and lines[-1].cell_len + 2 + piece.cell_len <= width:
            lines[-1].append("  ")
            lines[-1].append_text(piece)
        else:
            lines.append(piece.copy())
    return None if any(line.cell_len > width for line in lines) else lines


class LossChart(Widget):
    """Loss of the selected adapter, or of several (``overlay``); ``toggle_log_scale`` and
    ``toggle_smoothing`` change how every curve is drawn."""

    DEFAULT_CSS = """
    LossChart {
        background: $surface;
    }
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._jobs: list[JobView] = []
        self._shown: list[JobView] = []
        self._colours: dict[str, str] = {}
        self._selected: str | None = None
        self._overlay = False
        self._key: tuple | None = None
        self.log_scale = False
        self.smoothing = False
        # Per job name: (its losses, how many are smoothed, the smoothed curve, the EMA and
        # count to go on from); the losses themselves tell a new job of the same name.
        self._smoothed: dict[str, tuple] = {}

    def toggle_log_scale(self) -> bool:
        """Switch the loss axis between linear and log (decades); returns the new setting."""
        self.log_scale = not self.log_scale
        self._title()
        self.refresh()
        return self.log_scale

    def toggle_smoothing(self) -> bool:
        """Switch the curves between raw losses and their EMA; returns the new setting."""
        self.smoothing = not self.smoothing
        self._title()
        self.refresh()
        return self.smoothing

    def show(self, jobs: list[JobView], selected: str | None, overlay: bool) -> None:
        shown = chosen_jobs(jobs, selected) if overlay else [
            job for job in jobs if job.name == selected]
        # Only the curves drawn decide whether to draw again: fifty jobs stepping cost
        # nothing here while one is shown.
        key = (overlay, selected, len(jobs) if overlay else 0,
               tuple((j.name, len(j.losses), j.total_steps, j.loss, j.eval_loss,
                      len(j.eval_points)) for j in shown))
        if key == self._key:
            return
        self._key = key
        self._jobs, self._shown = list(jobs), shown
        self._selected, self._overlay = selected, overlay
        # A job keeps its colour while the jobs fit the palette; past that, colours go by
        # place among the curves drawn, so no two of them share one.
        order = jobs if len(jobs) <= len(_PALETTE) else shown
        self._colours = {job.name: _PALETTE[i % len(_PALETTE)] for i, job in enumerate(order)}
        self._title()
        self.refresh()

    def _title(self) -> None:
        if not self._overlay:
            title = f"Loss · {self._selected or '-'}"
        elif len(self._shown) >= len(self._jobs):
            title = "Loss · all adapters"
        else:
            title = f"Loss · best {BEST} of {len(self._jobs)} and the selected"
        flags = [flag for flag, on in (("log", self.log_scale), ("EMA", self.smoothing)) if on]
        self.border_title = " · ".join([title, *flags])

    def render(self) -> Text:
        width, height = self.content_size
        variables = self.app.theme_variables
        styles = {name: fmt.theme_style(colour, variables)
                  for name, colour in self._colours.items()}
        # The selected curve last, so it is drawn on top.
        shown = sorted(self._shown, key=lambda job: job.name == self._selected)
        series = [Series(job.name, job.loss_steps,
                         self._ema(job) if self.smoothing else job.losses,
                         styles[job.name], job.eval_points) for job in shown]
        if self._overlay:
            # A second line for the legend where the plot keeps eight rows or more.
            caption = legend([(job.name, fmt.loss(_metric(job)), styles[job.name])
                              for job in self._shown], width, 2 if height >= 10 else 1)
        else:
            caption = [self._caption(styles, width)]
        x_max = max((j.total_steps for j in shown), default=1)
        lines = plot(series, width, max(height - len(caption), 0), x_max, self.log_scale)
        return Text("\n").join([*lines, *caption][-height:] if height > 0 else [])

    def _ema(self, job: JobView) -> list[float]:
        """The job's smoothed losses, extended by its new points only (a long run has tens
        of thousands, redrawn four times a second)."""
        fresh = (None, 0, [], 0.0, 0)
        losses, done, curve, average, count = self._smoothed.get(job.name, fresh)
        if losses is not job.losses:       # a new job of that name (another engine's)
            done, curve, average, count = 0, [], 0.0, 0
        average, count = _ema_extend(curve, job.losses[done:], average, count)
        self._smoothed[job.name] = (job.losses, len(job.losses), curve, average, count)
        return curve

    def _caption(self, styles: dict[str, str], width: int) -> Text:
        """The selected job's line, as long as fits: its step, then words, go first."""
        if not self._shown:
            return Text()
        job = self._shown[0]
        held_out = job.eval_loss is not None
        for step, words in ((True, True), (False, True), (False, False)):
            caption = Text(no_wrap=True, overflow="ellipsis")
            caption.append("● ", style=styles[job.name])
            caption.append(job.name)
            if step:
                caption.append(f"  {job.step}/{job.total_steps}")
            caption.append(f"  {'loss ' if words else ''}{fmt.loss(job.loss)}")
            if held_out:
                caption.append(f"  {EVAL_MARK} ", style=styles[job.name])
                caption.append(f"{'eval ' if words else ''}{fmt.loss(job.eval_loss)}")
            if caption.cell_len <= width:
                break
        return caption


def chosen_jobs(jobs: Sequence[JobView], selected: str | None) -> list[JobView]:
    """The overlay's curves: every job when they are few, else the ``BEST`` best and the
    selected one (best first, the selected last when it is not among them)."""
    if len(jobs) <= BEST + 1:
        return list(jobs)
    chosen = best_jobs(jobs, BEST)
    names = {job.name for job in chosen}
    chosen += [job for job in jobs if job.name == selected and job.name not in names]
    return chosen


def _metric(job: JobView) -> float | None:
    """What the overlay ranks by, for its legend."""
    return job.eval_loss if job.eval_loss is not None else job.loss
