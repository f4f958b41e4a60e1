"""The fork form (key ``f``): the selected job's settings a fork may change, and a new name.

Each field starts at the job's current value, written as in TOML; the fields left as they
were are not sent. The engine validates the rest as it validates a config (a refusal shows
here, in place, and the form stays open), then the new job starts from the selected job's
state at the next step boundary (``mlora jobs fork``, engine/train/fork.py). Nothing here
imports torch.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# The settings a fork may change (engine/train/fork.py CHANGEABLE, which imports torch).
FIELDS = ("lr", "scheduler_type", "warmup_ratio", "warmup_steps", "max_grad_norm",
          "lora_dropout", "num_epochs", "eval_steps", "eval_tasks", "weight_decay",
          "momentum", "loraplus_lr_ratio")
UNSETTABLE = ("max_grad_norm", "warmup_steps", "eval_steps")   # empty: none


def toml_value(value: Any) -> str:
    """A setting as the user would write it in a config ('' for none)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def parse_value(field: str, text: str) -> Any:
    """``text`` read as a TOML value (a bare word as a string); ValueError says why not."""
    text = text.strip()
    if not text:
        if field in UNSETTABLE:
            return None
        raise ValueError(f"{field}: enter a value")
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", text):
            return text
        raise ValueError(f"{field}: {text!r} is not a TOML value (a number, true/false, "
                         'a "string" or a [list])') from None


def changed_settings(initial: dict[str, str], entered: dict[str, str]) -> dict[str, Any]:
    """The fields whose text changed, parsed; ValueError for the first bad one."""
    return {field: parse_value(field, text) for field, text in entered.items()
            if text.strip() != initial[field].strip()}


class ForkScreen(ModalScreen[bool]):
    """Dismisses with True once the engine has forked the job."""

    DEFAULT_CSS = """
    ForkScreen { align: center middle; }
    ForkScreen > Vertical {
        width: 80%; max-width: 90; height: 90%;
        border: thick $primary 60%; background: $surface; padding: 0 2;
    }
    ForkScreen VerticalScroll { height: 1fr; }
    ForkScreen .row { height: auto; }
    ForkScreen .row Label { width: 20; padding-top: 1; }
    ForkScreen .row Input { width: 1fr; }
    ForkScreen #error { color: $error; max-height: 6; overflow-y: auto; }
    ForkScreen #error.-empty { display: none; }
    ForkScreen #buttons { height: auto; align-horizontal: right; }
    ForkScreen Button { margin-left: 2; }
    """

    BINDINGS = [Binding("escape", "close", "Back", id="fork.back")]

    def __init__(self, app: Any, job: Any):
        super().__init__()
        self.mlora = app                 # MloraApp: its client sends the request
        self.job_name = job.name
        adapter = job.adapter or {}
        self.initial = {field: toml_value(adapter.get(field)) for field in FIELDS}

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"Fork {self.job_name} at the next step: the new job starts from its "
                        "weights, optimizer, schedule and data position; change any of these "
                        "settings from there on.", markup=False)
            with VerticalScroll():
                with Horizontal(classes="row"):
                    yield Label("new name")
                    yield Input(f"{self.job_name}-fork", id="new-name")
                for field in FIELDS:
                    with Horizontal(classes="row"):
                        yield Label(field)
                        yield Input(self.initial[field], id=f"set-{field}",
                                    placeholder="none" if field in UNSETTABLE else "")
            yield Static("", id="error", classes="-empty")
            with Horizontal(id="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Fork", id="fork", variant="primary")

    def on_mount(self) -> None:
        self._error = self.query_one("#error", Static)
        self.query_one("#new-name", Input).focus()

    def show_error(self, message: str | None) -> None:
        self._error.update(Text(message or ""))
        self._error.set_class(not message, "-empty")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.send()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "fork":
            self.send()
        else:
            self.dismiss(False)

    def entered(self) -> tuple[str, dict[str, str]]:
        return (self.query_one("#new-name", Input).value.strip(),
                {field: self.query_one(f"#set-{field}", Input).value for field in FIELDS})

    @work(exclusive=True, group="fork")
    async def send(self) -> None:
        from mlora_tui.client import EngineUnavailable, RequestFailed

        new, entered = self.entered()
        if not new:
            self.show_error("enter the new job's name")
            return
        try:
            changes = changed_settings(self.initial, entered)
        except ValueError as e:
            self.show_error(str(e))
            return
        client = self.mlora.client
        if client is None:
            self.show_error("the engine is disconnected; try again when it is back")
            return
        self.show_error(None)
        try:
            result = await client.fork_job(self.job_name, new, changes)
        except RequestFailed as e:
            self.show_error(e.message)
            return
        except (EngineUnavailable, OSError) as e:
            self.show_error(str(e))
            return
        self.mlora.notify(f"{result.get('job', new)} forked from {self.job_name} at step "
                          f"{result.get('step')}", title="fork")
        self.dismiss(True)

    def action_close(self) -> None:
        self.dismiss(False)
