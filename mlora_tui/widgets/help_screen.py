"""The help screen (`?`): every key of the screen below it, as currently mapped, with the
binding id a keymap file uses to remap it.

Keys are read from the active bindings when the screen opens, so a remapped key (keymap
file, ``App.set_keymap``) shows as remapped; keys that do not apply to the selected job
right now are dimmed, as in the footer.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

# (keys as mapped now, what they do, whether that applies right now, the binding id)
HelpRow = tuple[str, str, bool, str]

INTRO = ("The engine trains on in its own process: quitting or losing the connection "
         "(SSH, tmux) never stops it. Attach again with `mlora-tui --attach NAME`.\n"
         "Dimmed keys do not apply to the selected job now. Remap keys by id in "
         "~/.config/mlora-tui/keymap.toml, e.g.  pause = \"space\".\n"
         "The mouse: click a job to select it, a column's header to sort by it, a pane to "
         "focus it. Under 120 columns or 30 lines the panes below the jobs take turns "
         "under tabs (click one, or 1-4).")


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen {
        align: center middle;
    }
    HelpScreen > VerticalScroll {
        width: 76;
        max-width: 95%;
        height: auto;
        max-height: 90%;
        border: thick $primary 60%;
        border-title-align: center;
        background: $surface;
        padding: 1 2;
    }
    """

    BINDINGS = [Binding("escape,question_mark,q", "close", "Close", id="help.close")]

    def __init__(self, rows: list[HelpRow]):
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        table.add_column(style="dim", no_wrap=True)
        for key, description, enabled, binding_id in self.rows:
            style = "" if enabled else "dim"
            table.add_row(Text(key, style=style), Text(description, style=style), binding_id)
        with VerticalScroll() as scroll:
            scroll.border_title = "Keys"
            yield Static(table)
            yield Static(Text("\n" + INTRO, style="dim"))

    def action_close(self) -> None:
        self.dismiss()
