"""The loss pane: training loss over steps, drawn in Unicode braille (2x4 dots a cell).

It shows the selected adapter's curve against its whole run (x runs to ``total_steps``, so
the curve fills in as the job trains), or every adapter together, one colour each, when
``overlay`` is on. ``plot`` is a pure function of the points and the size, so the drawing is
tested without a screen; the widget only re-renders when a curve gains points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from rich.text import Text
from textual.widget import Widget

from mlora_tui.state import JobView
from mlora_tui.widgets import formatting as fmt

# Bit of each dot in a braille cell, by [row][column] (Unicode's dot numbering).
_DOT_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
_BRAILLE = 0x2800
_PALETTE = ("$primary", "$accent", "$success", "$warning", "$error", "$secondary",
            "bright_cyan", "bright_magenta")


@dataclass(frozen=True)
class Series:
    label: str
    steps: Sequence[int]
    losses: Sequence[float]
    style: str


def plot(series: Sequence[Series], width: int, height: int, x_max: int) -> list[Text]:
    """Lines of text (``height`` of them, ``width`` cells wide) drawing every series from
    step 0 to ``x_max``, with the loss range on the left and the step range below."""
    points = [(s, [(x, y) for x, y in zip(s.steps, s.losses) if math.isfinite(y)])
              for s in series]
    values = [y for _, pts in points for _, y in pts]
    rows = height - 1
    if not values or rows < 2:
        return [Text("no loss yet", style="dim", justify="center")] * min(height, 1)
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    labels = [f"{hi:.3g}", f"{(lo + hi) / 2:.3g}", f"{lo:.3g}"]
    margin = max(map(len, labels)) + 1
    cols = width - margin
    if cols < 4:
        return [Text(f"loss {values[-1]:.4g}")]
    x_max = max(x_max, max(x for _, pts in points for x, _ in pts), 1)
    px_w, px_h = cols * 2, rows * 4
    bits = [[0] * cols for _ in range(rows)]
    owner = [[-1] * cols for _ in range(rows)]

    def dot(x: int, y: int, index: int) -> None:
        row, col = y // 4, x // 2
        bits[row][col] |= _DOT_BITS[y % 4][x % 2]
        owner[row][col] = index

    for index, (_, pts) in enumerate(points):
        pixels = [(round(x / x_max * (px_w - 1)),
                   round((hi - y) / (hi - lo) * (px_h - 1))) for x, y in pts]
        _trace(pixels, lambda x, y: dot(x, y, index))

    label_rows = {0: labels[0], rows // 2: labels[1], rows - 1: labels[2]}
    lines = []
    for row in range(rows):
        line = Text(label_rows.get(row, "").rjust(margin - 1), style="dim")
        line.append("┤" if row in label_rows else "│", style="dim")
        for col in range(cols):
            index = owner[row][col]
            if index < 0:
                line.append(" ")
            else:
                line.append(chr(_BRAILLE | bits[row][col]), style=series[index].style)
        lines.append(line)
    axis = Text(" " * (margin - 1) + "└", style="dim")
    left, right = "0", f"step {x_max}"
    axis.append(left + right.rjust(cols - len(left)), style="dim")
    lines.append(axis)
    return lines


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


class LossChart(Widget):
    """Loss of the selected adapter, or of all of them (``overlay``)."""

    DEFAULT_CSS = """
    LossChart {
        background: $surface;
    }
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._jobs: list[JobView] = []
        self._selected: str | None = None
        self._overlay = False
        self._key: tuple | None = None
        self.log_scale = False
        self.smoothing = False

    def toggle_log_scale(self) -> bool:
        """Switch the loss axis between linear and log (decades); returns the new setting."""
        self.log_scale = not self.log_scale
        self.refresh()
        return self.log_scale

    def toggle_smoothing(self) -> bool:
        """Switch the curves between raw losses and their EMA; returns the new setting."""
        self.smoothing = not self.smoothing
        self.refresh()
        return self.smoothing

    def show(self, jobs: list[JobView], selected: str | None, overlay: bool) -> None:
        key = (overlay, selected, tuple((j.name, len(j.losses), j.total_steps, j.eval_loss)
                                        for j in jobs))
        if key == self._key:
            return
        self._key = key
        self._jobs, self._selected, self._overlay = list(jobs), selected, overlay
        self.border_title = "Loss · all adapters" if overlay else f"Loss · {selected or '-'}"
        self.refresh()

    def _styles(self) -> dict[str, str]:
        variables = self.app.theme_variables
        return {job.name: fmt.theme_style(_PALETTE[i % len(_PALETTE)], variables)
                for i, job in enumerate(self._jobs)}

    def render(self) -> Text:
        width, height = self.content_size
        styles = self._styles()
        if self._overlay:
            shown = [j for j in self._jobs if j.name != self._selected]
            shown += [j for j in self._jobs if j.name == self._selected]   # on top
            caption = Text(no_wrap=True, overflow="ellipsis")
            for job in self._jobs:
                caption.append("● ", style=styles[job.name])
                caption.append(f"{job.name} {fmt.loss(job.loss)}  ")
        else:
            shown = [j for j in self._jobs if j.name == self._selected]
            caption = Text(no_wrap=True, overflow="ellipsis")
            if shown:
                job = shown[0]
                caption.append("● ", style=styles[job.name])
                caption.append(f"{job.name}  {job.step}/{job.total_steps}  "
                               f"loss {fmt.loss(job.loss)}")
                if job.eval_loss is not None:
                    caption.append(f"  eval {fmt.loss(job.eval_loss)}")
        series = [Series(j.name, j.loss_steps, j.losses, styles[j.name]) for j in shown]
        x_max = max((j.total_steps for j in shown), default=1)
        lines = plot(series, width, max(height - 1, 0), x_max)
        return Text("\n").join([*lines, caption]) if height > 1 else caption
