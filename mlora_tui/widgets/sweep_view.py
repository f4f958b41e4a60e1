"""The sweep view (key `w`): one table per sweep of the run, its trials best first.

Each table is drawn from the sweep's latest summary (the engine's ``sweep`` event, sent
after every report, trials ranked best first) with each trial's live state from the jobs:
rank, trial (the best marked ``*``), state, the metric's latest value, a sparkline of its
history, the searched parameters, and for a pruned trial its rung (the pruner and the step).
Pruned and failed trials are dimmed. Rich tables wrap their wide columns, so the view reads
at 80x24; it scrolls when the sweeps are longer than the screen. Escape (or `w`) leaves.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Static

from engine.core.jobs import FAILED, PRUNED
from mlora_tui.state import EngineState
from mlora_tui.widgets import formatting as fmt
from mlora_tui.widgets.key_footer import KeyFooter

REDRAW_HZ = 4
SPARK_POINTS = 12
_BARS = "▁▂▃▄▅▆▇█"
_RUNG = re.compile(r"pruned by (\w+) at step (\d+)")


def sparkline(values: list[float], points: int = SPARK_POINTS) -> str:
    """The last ``points`` values as a small bar chart, scaled between their extremes."""
    values = [v for v in values[-points:] if v == v]
    if not values:
        return fmt.DASH
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(_BARS[min(7, int((v - low) / span * 7.999))] for v in values)


def rung(reason: str | None) -> str:
    """Where a pruned trial stopped: ``asha @ step 3``, else its reason as given."""
    if not reason:
        return ""
    found = _RUNG.search(reason)
    return f"{found.group(1)} @ step {found.group(2)}" if found else reason


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trial_value(trial: Mapping[str, Any]) -> float | None:
    """The trial's metric: its final value, else its latest report."""
    history = trial.get("metric_history") or []
    value = trial.get("value")
    return value if value is not None else (history[-1][1] if history else None)


def sweep_title(summary: Mapping[str, Any]) -> Text:
    started = len(summary.get("trials") or [])
    total = summary.get("trials_total") or started
    better = "lower" if summary.get("direction") == "minimize" else "higher"
    text = Text()
    text.append(f"sweep {summary.get('name')}", style="bold")
    text.append(f" · {summary.get('metric', '?')}, {better} is better · {started}/{total} "
                f"trials · {summary.get('prune') or 'no pruning'} · parallel "
                f"{summary.get('parallel', '?')}", style="dim")
    return text


def sweep_table(summary: Mapping[str, Any], states: Mapping[str, str],
                variables: Mapping[str, str]) -> Table:
    """One sweep's trials in the summary's order (best first). ``states``: each trial's
    live state (the summary's is as of the last report)."""
    table = Table(title=sweep_title(summary), title_justify="left", expand=True,
                  box=None, padding=(0, 1), header_style="bold", show_edge=False)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("trial", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column(str(summary.get("metric") or "metric"), justify="right", no_wrap=True)
    table.add_column("history", no_wrap=True)
    table.add_column("params", ratio=1)
    table.add_column("rung", no_wrap=False)
    best = summary.get("best")
    for rank, trial in enumerate(summary.get("trials") or [], 1):
        name = trial.get("job", "?")
        state = states.get(name, trial.get("state", "?"))
        value = trial_value(trial)
        marked = name == best
        dimmed = state in (PRUNED, FAILED)
        style = "bold" if marked else "dim" if dimmed else ""
        state_style = "dim" if dimmed else fmt.theme_style(fmt.STATE_STYLES.get(state, ""),
                                                           variables)
        params = ", ".join(f"{k}={_short(v)}" for k, v in (trial.get("params") or {}).items())
        table.add_row(str(rank), f"{name} *" if marked else name, Text(state, style=state_style),
                      fmt.DASH if value is None else f"{value:.4g}",
                      sparkline([v for _, v in trial.get("metric_history") or []]), params,
                      rung(trial.get("reason")) if state == PRUNED else "", style=style)
    return table


def sweeps_renderable(state: EngineState, variables: Mapping[str, str]):
    if not state.sweeps:
        return Text("This run has no sweep ([[sweep]] tables in its config).", style="dim")
    states = {name: job.state for name, job in state.jobs.items()}
    parts: list = []
    for name in sorted(state.sweeps):
        if parts:
            parts.append(Text(""))
        parts.append(sweep_table(state.sweeps[name], states, variables))
    return Group(*parts)


class SweepScreen(Screen):
    """Every sweep of the run, each a table of its trials ranked best first."""

    DEFAULT_CSS = """
    SweepScreen #sweeps {
        border: round $primary;
        border-title-color: $text;
        border-title-style: bold;
        padding: 0 1;
        height: 1fr;
    }
    """
    BINDINGS = [
        Binding("escape", "leave", "Back", id="sweeps-back", tooltip="Back to the jobs"),
        Binding("w", "leave", "Back", show=False, id="sweeps-close",
                tooltip="Back to the jobs"),
    ]

    def __init__(self, state: EngineState):
        super().__init__()
        self.state = state
        self._drawn: int | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="sweeps"):
            yield Static(id="sweep-tables")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.query_one("#sweeps").border_title = "Sweeps · trials best first, * the best"
        self.query_one("#sweeps").focus()
        self.redraw()
        self.set_interval(1 / REDRAW_HZ, self.redraw)

    def redraw(self) -> None:
        if self._drawn == self.state.version:
            return
        self._drawn = self.state.version
        self.query_one("#sweep-tables", Static).update(
            sweeps_renderable(self.state, self.app.theme_variables))

    def action_leave(self) -> None:
        self.dismiss()
