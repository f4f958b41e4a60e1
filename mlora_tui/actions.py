"""The monitor screen's keys: its bindings, what each key that acts on the selected job
needs of that job's state, and the actions that send the requests.

``JobActions`` is a mixin of ``app.MonitorScreen`` (which provides ``state``, ``selected``,
``selected_job`` and ``app``); it is kept apart so that the screen's module holds the
layout, the redraw and the workers. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any, Iterable

from textual.binding import Binding

from engine.core.jobs import DONE, FAILED, PAUSED, PRUNED, QUEUED, RUNNING
from mlora_tui.state import CONNECTED
from mlora_tui.widgets.confirm import ConfirmScreen

# Job actions: what each needs of the selected job's state. A job in a final state
# (done, failed, cancelled, pruned) takes none of them but evaluate (and fork, if pruned).
JOB_ACTIONS = {
    "pause": (RUNNING, QUEUED),
    "resume": (PAUSED,),
    "cancel_job": (QUEUED, RUNNING, PAUSED),
    "save": (RUNNING, PAUSED, QUEUED),
    # A finished job too, while its adapter is in the model (else the engine says why).
    "evaluate": (RUNNING, PAUSED, QUEUED, DONE, FAILED),
    "fork": (RUNNING, PAUSED, QUEUED, PRUNED),
}
# The detail panes, in the order of their tabs and of the keys 1-4 that bring them up.
PANES = (("loss", "Loss"), ("adapter", "Adapter"), ("backend", "Backend"), ("log", "Log"))

MONITOR_BINDINGS = [
    # First, so that the footer keeps it when the terminal is too narrow for the rest.
    Binding("question_mark", "app.help", "Help", id="help", tooltip="This list of keys"),
    Binding("p", "pause", "Pause", id="pause",
            tooltip="Take the selected job out of the batch until resumed"),
    Binding("r", "resume", "Resume", id="resume",
            tooltip="Put the selected paused job back in the batch"),
    Binding("x", "cancel_job", "Cancel", id="cancel",
            tooltip="End the selected job for good (asks first)"),
    Binding("a", "add", "Add", id="add",
            tooltip="Add adapters from a TOML file of [[adapter]] tables"),
    Binding("s", "save", "Save", id="save",
            tooltip="Write a checkpoint of the selected job now"),
    Binding("l", "toggle_overlay", "Overlay", id="overlay",
            tooltip="Loss of the selected adapter, or of all adapters together"),
    Binding("slash", "filter", "Filter", id="filter",
            tooltip="Show only the adapters whose name contains a text"),
    Binding("escape", "clear_filter", "Clear filter", show=False, id="clear-filter",
            tooltip="Show every adapter again"),
    Binding("o", "cycle_sort", "Sort", id="sort",
            tooltip="Sort the jobs by the next column (added order after the last)"),
    # After the keys every run uses: on an 80-column footer it gives way to them.
    Binding("e", "evaluate", "Eval", id="evaluate",
            tooltip="Score the selected job on its eval tasks now (between two steps)"),
    Binding("g", "playground", "Ask", id="playground",
            tooltip="The playground: jobs and the base model answer a prompt side by side"),
    Binding("w", "sweeps", "Sweeps", id="sweeps",
            tooltip="The sweeps: each sweep's trials ranked by their metric"),
    Binding("f", "fork", "Fork", show=False, id="fork",
            tooltip="Fork the selected job: a new job from this step, settings changed"),
    Binding("L", "log_scale", "Log scale", show=False, id="log-scale",
            tooltip="Loss chart: log or linear loss axis"),
    Binding("E", "smoothing", "Smooth", show=False, id="smoothing",
            tooltip="Loss chart: smoothed (EMA) or raw losses"),
    *(Binding(str(i), f"show_pane('{pane}')", title, show=False, id=f"pane-{pane}",
              tooltip=f"Show the {title.lower()} pane (a tab on a small terminal)")
      for i, (pane, title) in enumerate(PANES, 1)),
]


def palette_commands(job: str) -> Iterable[tuple[str, str, str]]:
    """(action, title, help) of the monitor screen's commands in the command palette."""
    return [
        ("pause", f"Pause {job}", "take the job out of the batch until resumed"),
        ("resume", f"Resume {job}", "put the paused job back in the batch"),
        ("cancel_job", f"Cancel {job}", "end the job for good (asks first)"),
        ("save", f"Checkpoint {job}", "write a checkpoint of the job now"),
        ("evaluate", f"Evaluate {job}", "score the job on its eval tasks now"),
        ("fork", f"Fork {job}", "a new job from the job's state now, settings changed"),
        ("add", "Add adapters", "add jobs from a TOML file of [[adapter]] tables"),
        ("toggle_overlay", "Toggle all losses", "one adapter's loss, or all together"),
        ("filter", "Filter jobs", "show only adapters whose name contains a text"),
        ("cycle_sort", "Sort jobs by the next column", "added order after the last"),
        ("sweeps", "Sweeps", "each sweep's trials ranked by their metric"),
        ("log_scale", "Toggle the loss chart's log scale", "log or linear loss axis"),
        ("smoothing", "Toggle loss smoothing", "smoothed (EMA) or raw losses"),
    ]


class JobActions:
    """The keys that act on the selected job (a mixin of the monitor screen)."""

    app: Any
    selected: str | None

    def job_action_allowed(self, action: str) -> bool | None:
        """For a job action: True when it applies to the selected job now, else None
        (shown dimmed, does nothing)."""
        live = self.state.connection == CONNECTED
        job = self.selected_job
        ok = live and job is not None and job.state in JOB_ACTIONS[action]
        if action == "save" and job is not None:
            ok = ok and job.step > 0
        return True if ok else None

    def action_pause(self) -> None:
        self.app.send("pause", self.selected)

    def action_resume(self) -> None:
        self.app.send("resume", self.selected)

    def action_save(self) -> None:
        self.app.send("save", self.selected)

    def action_evaluate(self) -> None:
        # The scores come later, as an eval event (the log, the table, the adapter pane).
        self.state.note(f"{self.selected}: evaluation requested")
        self.app.send("evaluate_job", self.selected)

    def action_playground(self) -> None:
        from mlora_tui.widgets.playground import EngineBackend, PlaygroundScreen
        self.app.push_screen(PlaygroundScreen(EngineBackend(self.app, self.selected)))

    def action_cancel_job(self) -> None:
        name = self.selected

        def answered(yes: bool | None) -> None:
            if yes:
                self.app.send("cancel", name)

        self.app.push_screen(
            ConfirmScreen(f"Cancel job {name!r}?\n\nIt stops for good and its adapter leaves "
                          f"the model; checkpoints already written stay.", "Cancel job"),
            answered)

    def action_fork(self) -> None:
        from mlora_tui.widgets.fork_form import ForkScreen
        self.app.push_screen(ForkScreen(self.app, self.selected_job))

    def action_sweeps(self) -> None:
        from mlora_tui.widgets.sweep_view import SweepScreen
        self.app.push_screen(SweepScreen(self.state))

    def action_add(self) -> None:
        from mlora_tui.widgets.add_adapters import AddAdaptersScreen
        self.app.push_screen(AddAdaptersScreen(self.app.add_adapters_from))
