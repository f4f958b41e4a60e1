"""The add-adapters modal: the path of a TOML file of ``[[adapter]]`` tables.

The file is sent to the engine, which validates it as it validates a config; when it says
no (a user error naming the file, table and field), the message shows here, in place, and
the modal stays open so the person can fix the file and press enter again.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

# path -> None when the adapters were added, else what went wrong.
Submit = Callable[[str], Awaitable[str | None]]


class AddAdaptersScreen(ModalScreen[bool]):
    """Dismisses with True once the engine has added the adapters."""

    DEFAULT_CSS = """
    AddAdaptersScreen {
        align: center middle;
    }
    AddAdaptersScreen > Vertical {
        width: 80%;
        max-width: 100;
        height: auto;
        max-height: 90%;
        border: thick $primary 60%;
        background: $surface;
        padding: 1 2;
    }
    AddAdaptersScreen #error {
        color: $error;
        margin-top: 1;
        max-height: 16;
        overflow-y: auto;
    }
    AddAdaptersScreen #error.-empty {
        display: none;
    }
    AddAdaptersScreen Horizontal {
        height: auto;
        margin-top: 1;
        align-horizontal: right;
    }
    AddAdaptersScreen Button {
        margin-left: 2;
    }
    """

    BINDINGS = [Binding("escape", "close", "Back", id="add.back")]

    def __init__(self, submit: Submit, initial_path: str = ""):
        super().__init__()
        self.submit = submit
        self.initial_path = initial_path

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Add adapters from a TOML file of [[adapter]] tables:", markup=False)
            yield Input(self.initial_path, placeholder="path/to/adapters.toml", id="path")
            yield Static("", id="error", classes="-empty")
            with Horizontal():
                yield Button("Cancel", id="cancel")
                yield Button("Add", id="add", variant="primary")

    def on_mount(self) -> None:
        self._input = self.query_one("#path", Input)
        self._error = self.query_one("#error", Static)
        self._input.focus()

    def show_error(self, message: str | None) -> None:
        self._error.update(Text(message or ""))
        self._error.set_class(not message, "-empty")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.send(event.value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "add":
            self.send(self._input.value)
        else:
            self.dismiss(False)

    @work(exclusive=True, group="add-adapters")
    async def send(self, path: str) -> None:
        path = path.strip()
        if not path:
            self.show_error("enter the path of a TOML file")
            return
        self.show_error(None)
        self._input.disabled = True
        try:
            problem = await self.submit(path)
        finally:
            self._input.disabled = False
        if problem is None:
            self.dismiss(True)
        else:
            self.show_error(problem)
            self._input.focus()

    def action_close(self) -> None:
        self.dismiss(False)
