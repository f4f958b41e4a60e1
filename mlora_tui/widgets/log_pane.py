"""The log pane: the engine's warnings and events (state changes, checkpoints, log lines)
and the TUI's own notes, newest at the bottom."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import RichLog

from mlora_tui.state import EngineState, LogLine
from mlora_tui.widgets import formatting as fmt


class LogPane(RichLog):
    """Appends only the lines the state gained since the last redraw."""

    DEFAULT_CSS = """
    LogPane {
        background: $surface;
        scrollbar-size-vertical: 1;
    }
    """

    def __init__(self, max_lines: int = 1000, **kwargs):
        super().__init__(max_lines=max_lines, wrap=True, min_width=20, **kwargs)
        self._seen = 0
        self._generation = 0
        self._state: EngineState | None = None

    def sync(self, state: EngineState) -> None:
        self._state = state
        width = self.scrollable_content_region.width
        if not width:
            return      # not laid out yet: on_resize brings the lines
        if state.generation != self._generation:    # another engine: start afresh
            self.clear()
            self._seen = 0
            self._generation = state.generation
        variables = self.app.theme_variables
        for line in state.new_logs(self._seen):
            # At the pane's width: RichLog would otherwise wrap at the console's width,
            # which is not the terminal's under Pilot.
            self.write(self._format(line, variables), width=width)
        self._seen = state.log_count

    def restyle(self) -> None:
        """Write every line again (the theme's colours changed)."""
        self.clear()
        self._seen = 0

    def on_resize(self) -> None:
        if self._state is not None:
            self.sync(self._state)
            # Shown again (a tab on a small terminal): the newest lines, not the oldest.
            self.scroll_end(animate=False, immediate=False, x_axis=False)

    @staticmethod
    def _format(line: LogLine, variables) -> Text:
        text = Text(fmt.clock(line.time) + " ", style="dim")
        if line.level in ("warning", "error"):
            text.append(line.level + ": ", style=fmt.theme_style(fmt.LOG_STYLES[line.level],
                                                                 variables))
        text.append(line.message)
        return text
