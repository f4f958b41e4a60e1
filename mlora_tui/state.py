"""What the TUI knows of one engine, built from its status replies and events.

``EngineState`` is the TUI's buffered model: the socket worker feeds it every event as it
arrives (``apply_event``) and the screen redraws from it a few times a second, so a burst
of events costs one redraw. It holds the jobs by name (with each job's loss and eval-loss
history), the base model and engine facts, a bounded log, the last resource sample, and the
connection state with the time the engine was last heard from. It imports neither Textual
nor torch, so it is tested on its own.

Events replayed after a reconnect carry the ``seq`` numbers already applied and are
skipped; connecting to another engine (another pid behind the socket) starts afresh, since
its ``seq`` numbers start again from 1.
"""

from __future__ import annotations

import math
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from engine.core.jobs import FAILED, FINAL_STATES, QUEUED, job_variant
from mlora_tui.progress import headline_score, score_text

CONNECTING, CONNECTED, DISCONNECTED = "connecting", "connected", "disconnected"

# Job fields a status reply's job summary and a ``step`` event share.
_STEP_FIELDS = ("step", "total_steps", "epoch", "loss", "lr", "grad_norm", "tokens_per_s",
                "eta_s")
_SUMMARY_FIELDS = _STEP_FIELDS + ("state", "reason", "r", "eval_loss")


@dataclass
class JobView:
    """One adapter job as the TUI shows it."""

    name: str
    state: str = QUEUED
    reason: str | None = None
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    variant: str = "lora"
    r: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    adapter: dict[str, Any] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    train_examples: int | None = None
    val_examples: int | None = None
    # Loss per optimizer step, as two compact arrays: a long run has many steps.
    loss_steps: array = field(default_factory=lambda: array("q"))
    losses: array = field(default_factory=lambda: array("d"))
    eval_points: list[tuple[int, float]] = field(default_factory=list)
    # Task key -> metrics ({"acc", "acc_norm", "n", ...} or {"perplexity", ...}), the
    # latest of each task, and the step of the latest evaluation that scored any.
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    scores_step: int | None = None
    # A sweep's trial (from its job_added event): the sweep's name, the trial's index and
    # the searched parameters; None for a job of its own.
    sweep: str | None = None
    trial: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def headline_score(self) -> tuple[str, float] | None:
        """(task, acc) of the first task with an accuracy (the jobs table's score)."""
        return headline_score(self.scores)

    @property
    def history(self) -> list[tuple[int, float]]:
        """(step, loss) of every step seen, in step order."""
        return list(zip(self.loss_steps, self.losses))

    def record_loss(self, step: int, loss: float) -> None:
        # A step seen twice (status then a replayed event) keeps one point.
        if self.loss_steps and step <= self.loss_steps[-1]:
            return
        self.loss_steps.append(step)
        self.losses.append(loss)


@dataclass(frozen=True)
class LogLine:
    time: float
    level: str          # debug | info | warning | error
    message: str
    job: str | None = None


class EngineState:
    """The buffered model of one engine; every change bumps ``version``."""

    def __init__(self, max_logs: int = 1000, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.max_logs = max_logs
        self.version = 0
        self.connection = CONNECTING
        self.disconnect_reason: str | None = None
        self.last_update: float | None = None    # when the engine was last heard from
        self.stopped = False                     # this client asked the engine to stop
        self.generation = 0                      # bumped when another engine's state replaces this
        self._reset()

    def _reset(self) -> None:
        self.generation += 1
        self.engine: dict[str, Any] = {}
        self.model: dict[str, Any] = {}
        self.output_dir: str | None = None
        self.jobs: dict[str, JobView] = {}
        self.logs: deque[LogLine] = deque(maxlen=self.max_logs)
        self.log_count = 0        # lines ever logged, so a view appends only the new ones
        self.resource: dict[str, Any] | None = None
        self.last_batch: dict[str, Any] | None = None   # the newest ``batch`` event
        self.last_seq = 0
        self.exit_reason: str | None = None    # from the engine's last event, engine_exit
        # Sweep name -> its latest summary (a ``sweep`` event: trials ranked best first).
        self.sweeps: dict[str, dict[str, Any]] = {}

    # -- the connection -----------------------------------------------------------------

    def connected(self, engine_info: dict[str, Any]) -> bool:
        """A connection to the engine described by ``engine_info`` (the hello reply's
        ``engine``) is up. Returns True when it is another engine than before, in which
        case everything known of the old one is dropped."""
        other = bool(self.engine) and _identity(engine_info) != _identity(self.engine)
        if other:
            self._reset()
        was = self.connection
        self.engine = dict(engine_info)
        self.exit_reason = None
        self.connection = CONNECTED
        self.disconnect_reason = None
        self.stopped = False
        self.last_update = self.clock()
        name = engine_info.get("name") or "engine"
        if was == DISCONNECTED and not other:
            self.note(f"reconnected to {name}")
        else:
            self.note(f"connected to {name} (pid {engine_info.get('pid', '?')})")
        self._changed()
        return other

    def disconnected(self, reason: str | None = None) -> None:
        """The engine went away (or could not be reached)."""
        if self.connection == CONNECTED:
            self.note(f"engine disconnected{': ' + reason if reason else ''}", "warning")
        if self.connection != DISCONNECTED or self.disconnect_reason != reason:
            self.connection = DISCONNECTED
            self.disconnect_reason = reason
            self._changed()

    def stopping(self) -> None:
        """This client asked the engine to stop."""
        self.stopped = True
        self.note("stop requested: the engine checkpoints unfinished jobs and exits")

    # -- what the engine sends ----------------------------------------------------------

    def apply_status(self, reply: dict[str, Any]) -> None:
        """A ``status`` reply: the model and a summary of every job."""
        if reply.get("engine"):
            self.engine.update(reply["engine"])
        if reply.get("model"):
            self.model = dict(reply["model"])
        if reply.get("output_dir"):
            self.output_dir = reply["output_dir"]
        for summary in reply.get("jobs", []):
            job = self._job(summary["name"])
            for name in _SUMMARY_FIELDS:
                if name in summary:
                    setattr(job, name, summary[name])
            if isinstance(summary.get("scores"), dict):
                job.scores = {task: dict(metrics) for task, metrics in summary["scores"].items()
                              if isinstance(metrics, dict)}
            if summary.get("adapter"):
                job.adapter = dict(summary["adapter"])
            if summary.get("variant") or summary.get("adapter"):
                job.variant = job_variant(summary)
        self._heard()

    def apply_event(self, event: dict[str, Any], seq: int | None = None) -> bool:
        """One event (with its ``seq``, given here or as the event's own ``seq`` field).
        Returns False for an event already applied (a replay after a reconnect)."""
        if seq is None:
            seq = event.get("seq")
        if seq is not None:
            if seq <= self.last_seq:
                return False
            self.last_seq = seq
        handler = getattr(self, "_on_" + str(event.get("type")), None)
        if handler is not None:     # an event type from a newer engine is ignored
            handler(event)
        self._heard()
        return True

    def _on_run_start(self, ev: dict[str, Any]) -> None:
        self.model = {k: ev.get(k) for k in ("device", "dtype", "quantize", "attn_impl",
                                             "packing", "model_type", "num_params",
                                             "base_model")
                      if k in ev}
        self.output_dir = ev.get("output_dir", self.output_dir)
        self._log(ev, "info", f"engine started: {ev.get('model_type', 'model')} on "
                              f"{ev.get('device', '?')}")

    def _on_job_added(self, ev: dict[str, Any]) -> None:
        job = self._job(ev["job"])
        job.adapter = dict(ev.get("adapter") or {})
        job.variant = job_variant(ev)
        job.r = job.adapter.get("r", job.r)
        job.total_steps = ev.get("total_steps", job.total_steps)
        job.targets = list(ev.get("targets") or [])
        job.train_examples = ev.get("train_examples")
        job.val_examples = ev.get("val_examples")
        if ev.get("sweep") is not None:
            job.sweep, job.trial = str(ev["sweep"]), ev.get("trial")
            job.params = dict(ev.get("params") or {})
            self.sweeps.setdefault(job.sweep, {"name": job.sweep, "trials": []})
        self._log(ev, "info", f"{job.name}: added ({job.train_examples} examples, "
                              f"{job.total_steps} steps)", job.name)

    def _on_job_state(self, ev: dict[str, Any]) -> None:
        job = self._job(ev["job"])
        job.state = ev.get("state", job.state)
        job.reason = ev.get("reason")
        job.step = ev.get("step", job.step)
        job.total_steps = ev.get("total_steps", job.total_steps)
        if job.state in FINAL_STATES:
            job.eta_s = None
        level = "error" if job.state == FAILED else "info"
        text = f"{job.name}: {job.state}" + (f" ({job.reason})" if job.reason else "")
        self._log(ev, level, text, job.name)

    def _on_step(self, ev: dict[str, Any]) -> None:
        job = self._job(ev["job"])
        for name in _STEP_FIELDS:
            if name in ev:
                setattr(job, name, ev[name])
        if ev.get("loss") is not None and ev.get("step") is not None:
            job.record_loss(int(ev["step"]), float(ev["loss"]))

    def _on_eval(self, ev: dict[str, Any]) -> None:
        # An evaluation may measure the validation loss, the [[eval]] tasks or both; a field
        # an event lacks keeps its latest value (a scores-only event keeps the eval loss).
        job = self._job(ev["job"])
        step = int(ev.get("step", job.step))
        said = []
        if ev.get("eval_loss") is not None:
            job.eval_loss = ev["eval_loss"]
            job.eval_points.append((step, float(job.eval_loss)))   # the chart: losses only
            said.append(f"eval loss {job.eval_loss:.4g}")
        scores = ev.get("scores")
        if isinstance(scores, dict) and scores:
            for task, metrics in scores.items():
                if isinstance(metrics, dict):
                    job.scores[task] = dict(metrics)
                    said.append(f"{task} {score_text(metrics)}")
            job.scores_step = step
        if said:
            self._log(ev, "info", f"{job.name}: {'; '.join(said)} at step {step}", job.name)

    def _on_sweep(self, ev: dict[str, Any]) -> None:
        # The whole summary each time (after every report): the latest replaces the last.
        name = ev.get("name")
        if name is not None:
            self.sweeps[str(name)] = {k: v for k, v in ev.items() if k not in ("type", "seq")}

    def _on_checkpoint(self, ev: dict[str, Any]) -> None:
        self._log(ev, "info", f"{ev['job']}: checkpoint at step {ev.get('step')} -> "
                              f"{ev.get('path')}", ev["job"])

    def _on_adapter_saved(self, ev: dict[str, Any]) -> None:
        self._log(ev, "info", f"{ev['job']}: adapter saved at step {ev.get('step')} -> "
                              f"{ev.get('path')}", ev["job"])

    def _on_log(self, ev: dict[str, Any]) -> None:
        self._log(ev, ev.get("level") or "info", str(ev.get("message", "")), ev.get("job"))

    def _on_run_end(self, ev: dict[str, Any]) -> None:
        states = [job.get("state") for job in (ev.get("jobs") or {}).values()]
        counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
        self._log(ev, "info", f"run ended ({counts or 'no jobs'})")

    def _on_engine_exit(self, ev: dict[str, Any]) -> None:
        code = ev.get("code")
        self.exit_reason = str(ev.get("reason") or f"code {code}")
        self._log(ev, "info" if code == 0 else "error",
                  f"engine exited (code {code}): {self.exit_reason}")

    def _on_batch(self, ev: dict[str, Any]) -> None:
        self.last_batch = {k: v for k, v in ev.items() if k != "type"}

    def _on_resource(self, ev: dict[str, Any]) -> None:
        self.resource = {k: v for k, v in ev.items() if k != "type"}

    # -- helpers ------------------------------------------------------------------------

    def note(self, message: str, level: str = "info") -> None:
        """A line of the TUI's own (connection changes, answers to requests) in the log."""
        self._append_log(LogLine(self.clock(), level, message))

    def _log(self, ev: dict[str, Any], level: str, message: str, job: str | None = None) -> None:
        self._append_log(LogLine(ev.get("time") or self.clock(), level, message, job))

    def _append_log(self, line: LogLine) -> None:
        self.logs.append(line)
        self.log_count += 1
        self._changed()

    def new_logs(self, seen: int) -> list[LogLine]:
        """Log lines added after the first ``seen`` ones (those still in the bounded log)."""
        fresh = min(self.log_count - seen, len(self.logs))
        return list(self.logs)[len(self.logs) - fresh:] if fresh > 0 else []

    def _job(self, name: str) -> JobView:
        job = self.jobs.get(name)
        if job is None:
            job = self.jobs[name] = JobView(name)
        return job

    def _heard(self) -> None:
        self.last_update = self.clock()
        self._changed()

    def _changed(self) -> None:
        self.version += 1


def best_jobs(jobs: Iterable[JobView], n: int) -> list[JobView]:
    """The ``n`` best jobs, best first (lower is better): those with an eval loss by it,
    then those without one by their latest training loss, then those with neither. A
    training loss is no stand-in for an eval loss (it runs lower), hence the two groups."""
    def key(job: JobView) -> tuple:
        held_out, train = _finite(job.eval_loss), _finite(job.loss)
        return (held_out is None, math.inf if held_out is None else held_out,
                math.inf if train is None else train, job.name)

    return sorted(jobs, key=key)[:n]


def _finite(value: float | None) -> float | None:
    # A NaN or infinite loss (a diverged job) ranks with the jobs that have none.
    return value if value is not None and math.isfinite(value) else None


def _identity(engine_info: dict[str, Any]) -> tuple:
    return engine_info.get("name"), engine_info.get("pid")
