"""The playground (key `g`, or `mlora-tui --playground DIR...`): adapters answer one prompt
side by side, their answers streaming into one column each.

The screen holds a prompt box (multi-line), an optional input line, the prompt template of
the adapter highlighted in the list of rows, the rows to ask (every job or adapter, and
`base`, the base model alone; space chooses), and two settings (max new tokens,
temperature). Ctrl+Enter (or Ctrl+J, which is what many terminals send for it) or the
Generate button sends; Escape leaves. The answers fill a grid of columns, as many side by
side as the width allows (at least ``MIN_COLUMN`` cells each); the rest wrap below and the
grid scrolls.

Two back ends answer, behind one small interface (``Backend.run``):

- ``EngineBackend``: the running engine, through the app's client (``generate`` request):
  the engine snapshots the chosen jobs' adapters when the request arrives, reports the step
  each snapshot is from (shown in the column's title), and decodes a slice of tokens
  between two training steps. The TUI only displays.
- ``LocalBackend``: adapter folders of a finished run, loaded here in a worker thread
  (``run_worker(thread=True)``) once, then asked every prompt (mlora_tui/playground_local.py).
  Torch is imported in that thread only, never at start-up.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Input, Label, SelectionList, Static, TextArea
from textual.widgets.selection_list import Selection

from engine.core.jobs import CANCELLED, FAILED
from mlora_tui.playground_local import (BASE_ROW, Stopped, check_folders, folder_meta,
                                        row_names, template_name)
from mlora_tui.widgets.key_footer import KeyFooter

MIN_COLUMN = 32         # cells: an answer column at least this wide
MIN_COLUMN_HEIGHT = 8   # lines: an answer column at least this tall
MAX_TOKENS_LIMIT = 1024  # engine.core.protocol.MAX_GENERATE_TOKENS

OnReply = Callable[[dict], None]    # {"rows": [{"name", "step"}], ...}
OnUpdate = Callable[[dict], None]   # {"texts": {name: text so far}, "done", "stops"?, "error"?}


class PlaygroundError(Exception):
    """A prompt the back end cannot answer; the message says why, for the person."""


@dataclass
class Settings:
    max_new_tokens: int = 64
    temperature: float = 0.0
    input: str = ""


@dataclass
class RowChoice:
    """A row the list offers: its name, the template its prompt goes through, whether it
    starts chosen."""
    name: str
    template: str
    chosen: bool = False


class Backend(Protocol):
    def choices(self) -> list[RowChoice]: ...

    async def run(self, prompt: str, rows: list[str], settings: Settings,
                  on_reply: OnReply, on_update: OnUpdate) -> dict: ...


class EngineBackend:
    """The running engine answers, with each job's weights as of the request."""

    def __init__(self, app: Any, selected: str | None = None):
        self.app = app              # MloraApp: its client and its buffered state
        self.selected = selected

    def choices(self) -> list[RowChoice]:
        # A cancelled or failed job's adapter has left the model: it cannot answer.
        jobs = [job for job in self.app.state.jobs.values()
                if job.state not in (CANCELLED, FAILED)]
        rows = [RowChoice(job.name, str(job.adapter.get("prompt") or "alpaca"),
                          job.name == self.selected) for job in jobs]
        first = rows[0].template if rows else "none"
        return [RowChoice(BASE_ROW, first), *rows]

    async def run(self, prompt: str, rows: list[str], settings: Settings,
                  on_reply: OnReply, on_update: OnUpdate) -> dict:
        from mlora_tui.client import EngineUnavailable, RequestFailed

        client = self.app.client
        if client is None:
            raise PlaygroundError("the engine is disconnected; try again when it is back")
        try:
            return await client.generate(
                prompt, jobs=[r for r in rows if r != BASE_ROW], base=BASE_ROW in rows,
                input=settings.input, max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature, on_reply=on_reply, on_update=on_update)
        except RequestFailed as e:
            raise PlaygroundError(e.message) from None
        except (EngineUnavailable, OSError) as e:
            raise PlaygroundError(str(e)) from None


class LocalBackend:
    """Adapter folders answer, loaded here (once) in a worker thread."""

    def __init__(self, folders: Sequence[str | Path]):
        self.folders = [Path(f) for f in folders]
        self.names = row_names(self.folders)
        self.metas = [folder_meta(f) for f in self.folders]
        self.app: App | None = None      # set by the screen that shows it
        self.aset = None
        self.load_error: str | None = None
        self._lock = threading.Lock()        # one load, one decode at a time
        self.stop = threading.Event()        # set when the screen goes: abandon the decode

    def choices(self) -> list[RowChoice]:
        rows = [RowChoice(name, template_name(meta), i == 0)
                for i, (name, meta) in enumerate(zip(self.names, self.metas))]
        return [RowChoice(BASE_ROW, rows[0].template if rows else "none"), *rows]

    def start_loading(self, screen: "PlaygroundScreen") -> None:
        """Load the model behind the first frame, so the first prompt waits less."""
        self.app = screen.app
        say = _from_thread(screen.app, screen.say)
        screen.run_worker(lambda: self._load(say), thread=True, group="playground-load",
                          exit_on_error=False)

    def _load(self, say: Callable[..., None] | None = None):
        """The loaded adapter set, loading it the first time (None: it cannot be loaded,
        ``load_error`` says why). In a worker thread."""
        with self._lock:
            if self.aset is None and self.load_error is None:
                from engine.core.errors import UserError
                from mlora_tui import playground_local

                if say:
                    say(f"loading the base model and {len(self.folders)} adapter(s)...")
                try:
                    self.aset = playground_local.load(self.folders)
                except UserError as e:
                    self.load_error = str(e)
                except Exception as e:      # noqa: BLE001 - shown, not a traceback
                    self.load_error = f"loading failed: {e!r}"
                if say:
                    say(self.load_error or "ready: type a prompt, ctrl+enter sends",
                        error=self.load_error is not None)
            return self.aset

    async def run(self, prompt: str, rows: list[str], settings: Settings,
                  on_reply: OnReply, on_update: OnUpdate) -> dict:
        app = self.app
        steps = {name: meta.get("step") for name, meta in zip(self.names, self.metas)}
        worker = app.run_worker(lambda: self._generate(app, prompt, rows, settings, on_update),
                                thread=True, group="playground-local", exit_on_error=False)
        on_reply({"rows": [{"name": r, "step": steps.get(r)} for r in rows]})
        await worker.wait()
        kind, value = worker.result
        if kind == "error":
            raise PlaygroundError(value)
        return value

    def _generate(self, app: App, prompt: str, rows: list[str], settings: Settings,
                  on_update: OnUpdate) -> tuple[str, Any]:
        """In a worker thread: ("done", last data) or ("error", why)."""
        from engine.core.errors import UserError
        from mlora_tui import playground_local

        self.stop.clear()
        texts = {name: "" for name in rows}
        update = _from_thread(app, on_update)

        def on_text(name: str, text: str) -> None:
            if self.stop.is_set():
                raise Stopped()
            texts[name] = text
            update({"texts": dict(texts), "done": False})

        aset = self._load()
        if aset is None:
            return "error", self.load_error or "the model is not loaded"
        try:
            with self._lock:
                out = playground_local.generate_rows(
                    aset, rows, prompt, input=settings.input,
                    max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                    on_text=on_text)
        except Stopped:
            return "error", "stopped"
        except UserError as e:
            return "error", str(e)
        except Exception as e:          # noqa: BLE001 - shown, not a traceback
            return "error", f"generation failed: {e!r}"
        data = {"texts": {g.name: g.text for g in out}, "done": True,
                "stops": {g.name: g.stop for g in out}}
        update(data)
        return "done", data


def _from_thread(app: App, callback: Callable) -> Callable:
    """``callback`` called on the app's thread, from a worker thread (dropped once the app
    is gone)."""
    def call(*args, **kwargs) -> None:
        try:
            app.call_from_thread(callback, *args, **kwargs)
        except RuntimeError:        # the app's loop is closed: it is exiting
            pass
    return call


class AnswerColumn(VerticalScroll):
    """One row's answer, titled with its name (and the step its weights are from)."""

    def __init__(self, name: str):
        super().__init__(classes="pg-answer")
        self.row = name
        self.border_title = name
        self.body = Static("", markup=False)
        self.text = ""

    def compose(self) -> ComposeResult:
        yield self.body

    def show(self, text: str) -> None:
        if text != self.text:
            self.text = text
            self.body.update(Text(text))
            self.scroll_end(animate=False)


class PlaygroundScreen(Screen):
    """Prompt, rows, settings above; the answers, a column per row, below."""

    DEFAULT_CSS = """
    PlaygroundScreen {
        layout: vertical;
    }
    PlaygroundScreen #pg-top {
        height: 10;
    }
    PlaygroundScreen #pg-ask {
        width: 1fr;
    }
    PlaygroundScreen #pg-prompt {
        height: 1fr;
        min-height: 4;
        border: round $primary 40%;
        padding: 0 1;
    }
    PlaygroundScreen #pg-prompt:focus {
        border: round $primary;
    }
    PlaygroundScreen #pg-input {
        margin: 0 1;
    }
    PlaygroundScreen #pg-settings {
        height: 1;
        margin: 0 1;
    }
    PlaygroundScreen #pg-settings Label {
        padding: 0 1 0 0;
    }
    PlaygroundScreen #pg-settings Input {
        width: 7;
        margin-right: 2;
    }
    PlaygroundScreen #pg-settings Button {
        min-width: 10;
    }
    PlaygroundScreen #pg-status {
        height: 1;
        margin: 0 1;
        color: $text-muted;
    }
    PlaygroundScreen #pg-status.-error {
        color: $error;
    }
    PlaygroundScreen #pg-rows {
        width: 30;
        height: 100%;
        border: round $primary 40%;
        border-title-color: $text-muted;
    }
    PlaygroundScreen #pg-rows:focus {
        border: round $primary;
    }
    PlaygroundScreen #pg-answers {
        height: 1fr;
        layout: grid;
        grid-size: 1;
        grid-gutter: 0 1;
    }
    PlaygroundScreen .pg-answer {
        border: round $primary 40%;
        border-title-color: $text;
        border-title-style: bold;
        border-subtitle-color: $text-muted;
        padding: 0 1;
        height: 100%;
    }
    PlaygroundScreen .pg-answer:focus {
        border: round $primary;
    }
    """

    BINDINGS = [
        Binding("ctrl+enter,ctrl+j", "generate", "Generate", id="playground.generate",
                tooltip="Ask the chosen rows the prompt"),
        Binding("escape", "leave", "Back", id="playground.back",
                tooltip="Leave the playground"),
    ]

    def __init__(self, backend: Backend, *, standalone: bool = False):
        super().__init__()
        self.backend = backend
        self.standalone = standalone
        self.choices = backend.choices()
        self.busy = False
        self.columns: dict[str, AnswerColumn] = {}

    def compose(self) -> ComposeResult:
        with Horizontal(id="pg-top"):
            with Vertical(id="pg-ask"):
                yield TextArea(id="pg-prompt", soft_wrap=True, show_line_numbers=False)
                yield Input(placeholder="input (optional): the Alpaca row's input",
                            id="pg-input", compact=True)
                with Horizontal(id="pg-settings"):
                    yield Label("max tokens")
                    yield Input("64", id="pg-max", type="integer", compact=True)
                    yield Label("temp")
                    yield Input("0", id="pg-temp", type="number", compact=True)
                    yield Button("Generate", id="pg-go", variant="primary", compact=True)
                yield Static("", id="pg-status", markup=False)
            yield SelectionList[str](
                *(Selection(c.name, c.name, c.chosen) for c in self.choices), id="pg-rows")
        yield VerticalScroll(id="pg-answers")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.prompt_box = self.query_one("#pg-prompt", TextArea)
        self.prompt_box.border_title = "Prompt (ctrl+enter sends)"
        self.rows_list = self.query_one("#pg-rows", SelectionList)
        self.rows_list.border_title = "Rows (space)"
        self.answers = self.query_one("#pg-answers", VerticalScroll)
        self.status = self.query_one("#pg-status", Static)
        chosen = next((i for i, c in enumerate(self.choices) if c.chosen), 0)
        if self.choices:
            self.rows_list.highlighted = chosen
        self._show_template(chosen)
        self.prompt_box.focus()
        if isinstance(self.backend, LocalBackend):
            self.backend.start_loading(self)

    def on_unmount(self) -> None:
        if isinstance(self.backend, LocalBackend):
            self.backend.stop.set()

    # -- what the screen says -------------------------------------------------------------

    def say(self, message: str, error: bool = False) -> None:
        self.status.update(Text(message))
        self.status.set_class(error, "-error")

    def _show_template(self, index: int | None) -> None:
        if index is None or not 0 <= index < len(self.choices):
            return
        choice = self.choices[index]
        self.query_one("#pg-prompt", TextArea).border_subtitle = (
            f"template {choice.template} ({choice.name})")

    @on(SelectionList.SelectionHighlighted, "#pg-rows")
    def _highlighted(self, event: SelectionList.SelectionHighlighted) -> None:
        self._show_template(event.selection_index)

    # -- the answers ----------------------------------------------------------------------

    def _lay_out(self) -> None:
        """As many columns side by side as fit, the rest wrapped below (the grid scrolls)."""
        n = len(self.columns)
        if not n:
            return
        width = self.answers.size.width or self.size.width
        height = self.answers.size.height or max(self.size.height - 11, MIN_COLUMN_HEIGHT)
        fit = max(1, min(n, (width + 1) // (MIN_COLUMN + 1)))
        down = math.ceil(n / fit)
        across = math.ceil(n / down)    # rows of even length: 4 in 2x2, not 3 + 1
        self.answers.styles.grid_size_columns = across
        self.answers.styles.grid_rows = str(max(MIN_COLUMN_HEIGHT, height // down))

    def on_resize(self) -> None:
        self.call_after_refresh(self._lay_out)

    async def _open_columns(self, rows: list[str]) -> None:
        await self.answers.remove_children()
        self.columns = {name: AnswerColumn(name) for name in rows}
        await self.answers.mount_all(self.columns.values())
        self._lay_out()

    def _reply_arrived(self, reply: dict) -> None:
        for row in reply.get("rows", []):
            column = self.columns.get(row.get("name"))
            if column is None:
                continue
            step = row.get("step")
            column.border_title = (f"{column.row} · step {step}" if step is not None
                                   else column.row)
            column.border_subtitle = "…"

    def _texts_arrived(self, data: dict) -> None:
        for name, text in (data.get("texts") or {}).items():
            column = self.columns.get(name)
            if column is not None:
                column.show(text)
        if data.get("done"):
            for name, stop in (data.get("stops") or {}).items():
                if name in self.columns:
                    self.columns[name].border_subtitle = stop
            if data.get("error"):
                self.say(data["error"], error=True)

    # -- keys -----------------------------------------------------------------------------

    def _settings(self) -> Settings | str:
        raw_max = self.query_one("#pg-max", Input).value.strip()
        raw_temp = self.query_one("#pg-temp", Input).value.strip()
        try:
            max_new = int(raw_max)
        except ValueError:
            return f"max tokens must be a whole number, got {raw_max!r}"
        if not 1 <= max_new <= MAX_TOKENS_LIMIT:
            return f"max tokens must be 1 to {MAX_TOKENS_LIMIT}, got {max_new}"
        try:
            temperature = float(raw_temp or "0")
        except ValueError:
            return f"temperature must be a number, got {raw_temp!r}"
        if not (temperature >= 0 and math.isfinite(temperature)):
            return f"temperature must be 0 (greedy) or more, got {raw_temp}"
        return Settings(max_new, temperature, self.query_one("#pg-input", Input).value)

    def action_generate(self) -> None:
        if self.busy:
            self.say("still answering the last prompt; wait for it to finish", error=True)
            return
        prompt = self.prompt_box.text
        if not prompt.strip():
            self.say("type a prompt first", error=True)
            self.prompt_box.focus()
            return
        rows = list(self.rows_list.selected)
        order = [c.name for c in self.choices]
        rows.sort(key=order.index)
        if not rows:
            self.say("choose at least one row (space in the list)", error=True)
            self.rows_list.focus()
            return
        settings = self._settings()
        if isinstance(settings, str):
            self.say(settings, error=True)
            return
        self.busy = True
        self.say(f"asking {', '.join(rows)}...")
        self._generate(prompt, rows, settings)

    @work(group="playground")
    async def _generate(self, prompt: str, rows: list[str], settings: Settings) -> None:
        try:
            await self._open_columns(rows)
            final = await self.backend.run(prompt, rows, settings, self._reply_arrived,
                                           self._texts_arrived)
        except PlaygroundError as e:
            self.say(str(e), error=True)
        else:
            if not final.get("error"):
                self.say("done")
        finally:
            self.busy = False

    @on(Button.Pressed, "#pg-go")
    def _go(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_generate()

    def action_leave(self) -> None:
        if self.standalone:
            self.app.exit()
        else:
            self.app.pop_screen()


class PlaygroundApp(App):
    """``mlora-tui --playground DIR...``: the playground alone, on adapter folders."""

    TITLE = "mlora-tui playground"

    def __init__(self, folders: Sequence[str | Path]):
        super().__init__()
        self.folders = [Path(f) for f in folders]

    def on_mount(self) -> None:
        self.push_screen(PlaygroundScreen(LocalBackend(self.folders), standalone=True))


__all__ = ["Backend", "EngineBackend", "LocalBackend", "PlaygroundApp", "PlaygroundError",
           "PlaygroundScreen", "Settings", "check_folders"]
