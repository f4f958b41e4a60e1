"""The top line: which engine, its jobs at a glance, and whether what is shown is live.

When the engine goes away it says so ('engine disconnected') with the time it was last
heard from, so a stale screen never passes for a live one.
"""

from __future__ import annotations

from collections import Counter

from rich.text import Text
from textual.widgets import Static

from engine.core.jobs import CANCELLED, DONE, FAILED, PAUSED, PRUNED, QUEUED, RUNNING
from mlora_tui.state import CONNECTED, CONNECTING, EngineState
from mlora_tui.widgets import formatting as fmt

# What is happening now first, how jobs ended last.
_ORDER = (RUNNING, QUEUED, PAUSED, DONE, PRUNED, FAILED, CANCELLED)


class StatusBar(Static):
    DEFAULT_CSS = """
    StatusBar {
        height: 1;
        background: $panel;
        color: $foreground;
        padding: 0 1;
    }
    """

    _shown: tuple[EngineState, str | None] | None = None

    def on_resize(self) -> None:
        if self._shown is not None:     # what fits depends on the width
            self.show(*self._shown)

    def show(self, state: EngineState, target: str | None = None) -> None:
        self._shown = (state, target)
        variables = self.app.theme_variables
        # Under 100 columns the app's name and the pid give way to the job counts.
        wide = self.size.width >= 98 or not self.size.width
        text = Text(no_wrap=True, overflow="ellipsis")
        if wide:
            text.append("mlora-tui  ", style="bold")
        # Whether the screen is live comes first: it must survive a narrow terminal.
        if state.connection == CONNECTED:
            text.append("● live", style=fmt.theme_style("bold $success", variables))
            if not state.model:
                text.append(" (loading the model)", style=fmt.theme_style("$warning", variables))
            elif state.stopped:
                text.append(" (stopping)", style=fmt.theme_style("$warning", variables))
            text.append(f" {fmt.clock(state.last_update)}", style="dim")
        elif state.connection == CONNECTING and state.last_update is None:
            text.append("● connecting...", style=fmt.theme_style("$warning", variables))
        else:
            text.append("● engine disconnected", style=fmt.theme_style("bold $error", variables))
            text.append(f" · last update {fmt.clock(state.last_update)} · reconnecting",
                        style=fmt.theme_style("$warning", variables))
            if state.exit_reason:
                text.append(f" (it exited: {state.exit_reason})")
        name = state.engine.get("name") or target
        if name:
            text.append(f"  engine {name}")
            if state.engine.get("pid") and wide:
                text.append(f" (pid {state.engine['pid']})", style="dim")
        counts = Counter(job.state for job in state.jobs.values())
        if counts:
            summary = ", ".join(f"{counts[s]} {s}" for s in _ORDER if counts[s])
            text.append(f"  {len(state.jobs)} jobs: {summary}")
        self.update(text)
