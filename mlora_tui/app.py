"""The Textual TUI: watch and steer one engine's jobs.

``MloraApp`` owns the global keys (quit/detach, stop the engine, help, the command palette)
and the services: the buffered ``EngineState``, the engine's record and the connected
client. ``MonitorScreen`` owns the panes, the keys that act on the selected job, and the
workers: an async worker that follows the engine over its socket (status, then every event,
reconnecting with backoff), and a thread worker that samples NVML.

Events only update the buffered state; the screen redraws from it at a fixed rate (4 Hz)
inside ``batch_update``, so a burst of events costs one redraw and a quiet engine costs
none. Quitting never stops the engine: it runs in its own process session; only `S`
(confirmed) stops it. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Input, Tab, Tabs

from engine.core.errors import UserError
from engine.core.protocol import VERSION_MISMATCH
from mlora_tui.actions import JOB_ACTIONS, MONITOR_BINDINGS, PANES, JobActions, palette_commands
from mlora_tui.gpu import GpuReport, GpuSampler
from mlora_tui.state import CONNECTED, EngineState, JobView
from mlora_tui.widgets.adapter_pane import AdapterPane
from mlora_tui.widgets.add_adapters import AddAdaptersScreen
from mlora_tui.widgets.backend_pane import BackendPane
from mlora_tui.widgets.confirm import ConfirmScreen
from mlora_tui.widgets.help_screen import HelpScreen
from mlora_tui.widgets.jobs_table import LABELS, JobsTable, is_unfolded
from mlora_tui.widgets.key_footer import KeyFooter
from mlora_tui.widgets.log_pane import LogPane
from mlora_tui.widgets.loss_chart import LossChart
from mlora_tui.widgets.status_bar import StatusBar

if TYPE_CHECKING:
    from engine.core.runtime import EngineRecord

REDRAW_HZ = 4
GPU_SAMPLE_S = 1.0
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.25, 5.0



class MonitorScreen(JobActions, Screen):
    """Jobs, the selected adapter's settings and loss, the backend, and the log."""

    BINDINGS = MONITOR_BINDINGS

    @dataclass
    class GpuSampled(Message):
        report: GpuReport

    def __init__(self) -> None:
        super().__init__()
        self.selected: str | None = None
        self.overlay = False
        self.name_filter = ""
        self.sort_column: str | None = None     # None: the order jobs were added in
        self.unfolded: dict[str, bool] = {}     # sweep -> its trials shown (as the user left it)
        self.gpu_report: GpuReport | None = None
        self._drawn: tuple | None = None
        self._bindings_key: tuple | None = None

    @property
    def state(self) -> EngineState:
        return self.app.state

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        with Vertical(id="jobs-pane"):
            yield Input(placeholder="filter adapters by name (enter keeps it, esc clears)",
                        id="filter")
            yield JobsTable(id="jobs")
        # On a small terminal (app.tcss) the detail panes take turns below the jobs, one at
        # a time, chosen with these tabs (or 1-4); on a large one they are all shown.
        yield Tabs(*(Tab(title, id=f"tab-{pane}") for pane, title in PANES), id="pane-tabs")
        with Horizontal(id="middle"):
            yield LossChart(id="loss")
            yield AdapterPane(id="adapter")
            yield BackendPane(id="backend")
        yield LogPane(id="log")
        yield KeyFooter()

    def on_mount(self) -> None:
        # Looked up once: workers and timers must not query widgets (they may be gone).
        self.status_bar = self.query_one(StatusBar)
        self.jobs_pane = self.query_one("#jobs-pane", Vertical)
        self.filter_input = self.query_one("#filter", Input)
        self.jobs_table = self.query_one(JobsTable)
        self.loss_chart = self.query_one(LossChart)
        self.adapter_pane = self.query_one(AdapterPane)
        self.backend_pane = self.query_one(BackendPane)
        self.log_pane = self.query_one(LogPane)
        self.middle = self.query_one("#middle", Horizontal)
        self.pane_tabs = self.query_one(Tabs)
        # Every pane takes the focus when clicked (its border lights up), so the mouse
        # can pick what the arrow keys scroll.
        self.loss_chart.can_focus = True
        self.app.theme_changed_signal.subscribe(self, self._theme_changed)
        self.jobs_pane.border_title = "Jobs"
        self.backend_pane.border_title = "Backend"
        self.log_pane.border_title = "Log"
        self.jobs_table.focus()
        self.redraw()
        self.set_interval(1 / REDRAW_HZ, self.redraw)
        if self.app.gpu_sampler is not None:
            self.sample_gpus()
        if self.app.locate is not None:
            self.follow_engine()

    # -- drawing ------------------------------------------------------------------------

    def redraw(self, force: bool = False) -> None:
        """Bring every pane up to the buffered state (only when something changed).

        Not while a modal covers the screen: Textual re-renders the dimmed screen under a
        modal on every change, which costs more than the whole screen; the panes catch up
        when the modal closes."""
        if not self.is_current:
            return
        state = self.state
        key = (state.version, self.gpu_report, self.selected, self.overlay, self.name_filter,
               self.sort_column, tuple(self.unfolded.items()))
        if key == self._drawn and not force:
            return
        self._drawn = key
        with self.app.batch_update():
            self.status_bar.show(state, self.app.target_name)
            jobs = list(state.jobs.values())
            self.jobs_table.reconcile(jobs, self.name_filter, self.sort_column, state.sweeps,
                                      self.unfolded)
            if self.selected not in state.jobs:
                self.selected = self.jobs_table.highlighted_job
            job = self.selected_job
            self.adapter_pane.show(job)
            self.loss_chart.show(jobs, self.selected, self.overlay)
            self.backend_pane.show(state.model, state.engine, state.resource, self.gpu_report,
                                   state.output_dir, state.last_batch)
            self.log_pane.sync(state)
            title = "Jobs"
            if self.sort_column:
                title += f" · by {LABELS[self.sort_column]}"
            if self.name_filter:
                title += f" · filter '{self.name_filter}'"
            self.jobs_pane.border_title = title
        bindings_key = (state.connection, state.stopped, job.state if job else None,
                        bool(state.sweeps))
        if bindings_key != self._bindings_key:
            self._bindings_key = bindings_key
            self.refresh_bindings()

    def on_screen_resume(self) -> None:
        self.redraw()

    def _theme_changed(self, _theme) -> None:
        """Text drawn in Python carries the theme's colours: draw it all again."""
        self.jobs_table.restyle()
        self.log_pane.restyle()
        self._drawn = None      # also when a modal (the palette) covers the screen now
        self.redraw()

    @property
    def selected_job(self) -> JobView | None:
        return self.state.jobs.get(self.selected) if self.selected else None

    @on(JobsTable.JobHighlighted)
    def _job_highlighted(self, message: JobsTable.JobHighlighted) -> None:
        if message.name != self.selected:
            self.selected = message.name
            self.redraw()

    @on(JobsTable.GroupToggled)
    def _group_toggled(self, message: JobsTable.GroupToggled) -> None:
        trials = sum(job.sweep == message.sweep for job in self.state.jobs.values())
        total = max(trials, (self.state.sweeps.get(message.sweep) or {}).get("trials_total") or 0)
        self.unfolded[message.sweep] = not is_unfolded(message.sweep, total, self.unfolded)
        self.redraw()

    def on_monitor_screen_gpu_sampled(self, message: GpuSampled) -> None:
        self.gpu_report = message.report

    # -- keys ---------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """None (shown dimmed, does nothing) for keys that do not apply right now."""
        if action in JOB_ACTIONS:
            return self.job_action_allowed(action)
        if action in ("add", "playground"):
            return True if self.state.connection == CONNECTED else None
        if action == "sweeps":
            return True if self.state.sweeps else None
        if action == "clear_filter":
            return bool(self.name_filter) or self.filter_input.display
        return True

    def action_toggle_overlay(self) -> None:
        self.overlay = not self.overlay
        self.redraw()

    def action_cycle_sort(self) -> None:
        """The next shown column, then the order jobs were added in, then round again."""
        order = [None, *self.jobs_table.shown_columns]
        at = order.index(self.sort_column) if self.sort_column in order else 0
        self.sort_column = order[(at + 1) % len(order)]
        self.redraw()

    @on(JobsTable.SortChosen)
    def _sort_chosen(self, message: JobsTable.SortChosen) -> None:
        self.sort_column = message.column
        self.redraw()

    def action_log_scale(self) -> None:
        self.loss_chart.toggle_log_scale()

    def action_smoothing(self) -> None:
        self.loss_chart.toggle_smoothing()

    def action_show_pane(self, pane: str) -> None:
        """Bring up a detail pane (its tab on a small terminal) and give it the focus."""
        self.pane_tabs.active = f"tab-{pane}"
        self.query_one(f"#{pane}").focus()

    @on(Tabs.TabActivated, "#pane-tabs")
    def _tab_activated(self, event: Tabs.TabActivated) -> None:
        shown = event.tab.id.removeprefix("tab-")
        for pane, _ in PANES:
            self.query_one(f"#{pane}").set_class(pane != shown, "-tab-hidden")
        self.middle.set_class(shown == "log", "-tab-hidden")

    def action_filter(self) -> None:
        self.filter_input.display = True
        self.filter_input.focus()

    def action_clear_filter(self) -> None:
        self.filter_input.value = ""
        self.filter_input.display = False
        self.name_filter = ""
        self.jobs_table.focus()
        self.redraw()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.name_filter = event.value.strip()
        self.redraw()

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        self.filter_input.display = bool(self.name_filter)
        self.jobs_table.focus()

    # -- workers ------------------------------------------------------------------------

    @work(exclusive=True, group="engine")
    async def follow_engine(self) -> None:
        """Find the engine, then follow it for as long as the screen lives: hello, status,
        every event (replayed from the start, so curves are whole); on a lost connection,
        try again with backoff, looking for the engine of the same run when its socket is
        gone (a restarted engine has a new pid and socket)."""
        from mlora_tui.client import EngineClient, EngineUnavailable, RequestFailed

        app, state = self.app, self.state
        try:
            record = await asyncio.to_thread(app.locate)
        except UserError as e:
            app.failure = str(e)
            app.exit(return_code=2)
            return
        app.record = record
        delay = RECONNECT_FIRST_S
        while True:
            try:
                client = await EngineClient.connect(record.socket, client="mlora-tui")
            except RequestFailed as e:
                if e.code == VERSION_MISMATCH:     # waiting will not help
                    app.failure = e.message
                    app.exit(return_code=2)
                    return
                state.disconnected(e.message)
                await asyncio.sleep(RECONNECT_MAX_S)
                continue
            except (EngineUnavailable, OSError) as e:
                state.disconnected(str(e))
                moved = await asyncio.to_thread(_engine_of_run, record)
                if moved is not None and moved.socket != record.socket:
                    record = app.record = moved
                    continue
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            delay = RECONNECT_FIRST_S
            reason = "connection closed"
            try:
                state.connected(client.engine_info)
                app.client = client
                state.apply_status(await client.status())
                async for event in client.events(replay=True):
                    state.apply_event(event)
            except (EngineUnavailable, RequestFailed, OSError) as e:
                reason = str(e)
            finally:
                app.client = None
                await client.close()
            state.disconnected(reason)

    @work(thread=True, exclusive=True, group="gpu")
    def sample_gpus(self) -> None:
        """Read NVML every second; blocking calls, so in a thread of its own."""
        from textual.worker import get_current_worker

        worker = get_current_worker()
        sampler = self.app.gpu_sampler
        try:
            while not worker.is_cancelled:
                try:
                    self.post_message(self.GpuSampled(sampler.sample()))
                except RuntimeError:    # the app's loop closed under us: it is exiting
                    return
                if self.app.gpu_stop.wait(GPU_SAMPLE_S):
                    return
        finally:
            sampler.close()


def _engine_of_run(record: "EngineRecord") -> "EngineRecord | None":
    """The live engine serving the same output folder as ``record`` (None if none)."""
    from engine.core.runtime import find_engine

    try:
        return find_engine(output_dir=record.output_dir)
    except UserError:
        return None


class MloraApp(App):
    """The mlora-tui application.

    ``locate`` returns the engine to watch (it may start one); it runs in a thread once
    the first frame is up. A UserError from it (the engine could not start) ends the app
    with exit code 2 and leaves the message in ``failure``, for the entry point to print
    on stderr. Without ``locate`` the app shows ``state`` as given (snapshot tests).
    ``gpu_sampler`` is NVML unless given (None: no GPU pane readings); ``keymap`` maps
    binding ids to keys.
    """

    CSS_PATH = "app.tcss"
    TITLE = "mlora-tui"
    # Below 120 columns or 30 lines the screen changes shape (app.tcss: "-small", "-short").
    HORIZONTAL_BREAKPOINTS = [(0, "-small"), (120, "-narrow"), (130, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (30, "-tall")]
    BINDINGS = [
        Binding("q", "detach", "Quit", id="quit",
                tooltip="Leave the TUI; the engine trains on"),
        Binding("d", "detach", "Detach", id="detach",
                tooltip="Leave the TUI; the engine trains on"),
        Binding("S", "stop_engine", "Stop", id="stop",
                tooltip="Stop the engine: checkpoint every unfinished job, exit (asks first)"),
        Binding("ctrl+p", "command_palette", "Palette", show=False, id="palette",
                tooltip="Every command, searchable"),
    ]

    def __init__(self, locate: Callable[[], "EngineRecord"] | None = None, *,
                 state: EngineState | None = None, target_name: str | None = None,
                 gpu_sampler: Any = "nvml", keymap: dict[str, str] | None = None):
        super().__init__()
        self.locate = locate
        self.state = state or EngineState()
        self.target_name = target_name
        self.gpu_sampler = GpuSampler() if gpu_sampler == "nvml" else gpu_sampler
        self.gpu_stop = threading.Event()
        self.keymap = keymap or {}
        self.record: EngineRecord | None = None
        self.client = None
        self.failure: str | None = None     # why the app gave up (printed after it exits)

    def on_mount(self) -> None:
        if self.keymap:
            self.set_keymap(self.keymap)
        self.push_screen(MonitorScreen())

    def on_unmount(self) -> None:
        self.gpu_stop.set()

    # -- talking to the engine ----------------------------------------------------------

    def send(self, request: str, job: str | None = None) -> None:
        """Send a control request without blocking the UI (the engine answers between
        training steps); its effect shows through the events, a refusal as a notice."""
        self.run_worker(self._send(request, job), group="requests")

    async def _send(self, request: str, job: str | None) -> None:
        from mlora_tui.client import EngineUnavailable, RequestFailed

        what = f"{request.removesuffix('_job')} {job}" if job else request
        client = self.client
        if client is None:
            self._refused(what, "engine disconnected")
            return
        try:
            await getattr(client, request)(*((job,) if job is not None else ()))
        except RequestFailed as e:
            self._refused(what, e.message)
        except (EngineUnavailable, OSError) as e:
            self._refused(what, str(e))

    def _refused(self, what: str, why: str) -> None:
        self.state.note(f"{what}: {why}", "error")
        self.notify(why, title=what, severity="error")

    async def add_adapters_from(self, path: str) -> str | None:
        """Send the TOML file at ``path`` to the engine; None when added, else the reason."""
        from mlora_tui.client import EngineUnavailable, RequestFailed

        file = Path(path).expanduser()
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            return f"cannot read {file}: {getattr(e, 'strerror', None) or e}"
        client = self.client
        if client is None:
            return "the engine is disconnected; try again when it is back"
        try:
            result = await client.add_jobs(text, str(file.resolve()))
        except RequestFailed as e:
            return e.message
        except (EngineUnavailable, OSError) as e:
            return str(e)
        added = result.get("added", []) if isinstance(result, dict) else result
        self.notify(f"added {', '.join(added) or 'nothing'}", title="adapters")
        return None

    # -- global keys --------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop_engine":
            return True if self.state.connection == CONNECTED and not self.state.stopped else None
        return True

    def action_detach(self) -> None:
        """Leave; the engine trains on."""
        self.exit()

    def action_stop_engine(self) -> None:
        name = self.state.engine.get("name") or "the engine"

        def answered(yes: bool | None) -> None:
            if yes:
                self.state.stopping()
                self.send("stop")

        self.push_screen(ConfirmScreen(
            f"Stop engine {name}?\n\nEvery unfinished job is checkpointed, then the engine "
            f"exits. To leave it training, quit with q or d instead.", "Stop engine"),
            answered)

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen(list(self._help_rows())))

    def _help_rows(self) -> Iterable[tuple[str, str, bool, str]]:
        """(keys, description, applies now, id) of our own bindings, as currently mapped."""
        rows: dict[str, tuple[list[str], str, bool]] = {}
        for active in self.screen.active_bindings.values():
            binding = active.binding
            if binding.id is None:      # Textual's own and the focused widget's keys
                continue
            what = binding.tooltip or binding.description
            keys, _, _ = rows.setdefault(binding.id, ([], what, active.enabled))
            keys.append(self.get_key_display(binding))
        for binding_id, (keys, description, enabled) in rows.items():
            yield ", ".join(keys), description, enabled, binding_id

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if not isinstance(screen, MonitorScreen):
            return
        job = screen.selected or "the selected job"
        commands = palette_commands(job)
        for action, title, help_text in commands:
            if screen.check_action(action, ()):
                yield SystemCommand(title, help_text, partial(screen.run_action, action))
        if self.client is not None:
            yield SystemCommand("Checkpoint every job", "write a checkpoint of every "
                                "unfinished job now", partial(self.send, "save"))
        if self.check_action("stop_engine", ()):
            yield SystemCommand("Stop the engine", "checkpoint and exit (asks first)",
                                self.action_stop_engine)
        yield SystemCommand("Detach", "leave; the engine trains on", self.action_detach)


def binding_ids() -> set[str]:
    """Every binding id a keymap may remap."""
    from mlora_tui.widgets.playground import PlaygroundScreen
    from mlora_tui.widgets.sweep_view import SweepScreen
    screens = (MloraApp, MonitorScreen, ConfirmScreen, AddAdaptersScreen, HelpScreen,
               PlaygroundScreen, SweepScreen)
    return {binding.id for screen in screens for binding in screen.BINDINGS
            if isinstance(binding, Binding) and binding.id}
