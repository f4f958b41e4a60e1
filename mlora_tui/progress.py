"""What a person sees on stderr during `mlora run`: live progress bars and the final summary.

Both are fed the engine's event dicts (see ``engine.train.engine.Engine`` and
``engine.core.protocol``), one at a time, through ``handle(event)``, whether they arrive live or
are replayed to a client that attached late. ``RunProgress`` shows one bar per adapter
(name, step/total, loss, tokens/s, ETA) and prints each job's variant and size when it is
added, state changes, warnings and saved files above the bars.
``RunSummary`` remembers where each job ended and prints, at the end, where every adapter
is and the command to try it.

Rich redraws the bars at a fixed rate from their fields, so an event only updates numbers
and never forces a redraw: a fast run costs the same terminal traffic over SSH as a slow one.
Nothing here imports torch.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Column
from rich.text import Text

from engine.core.jobs import (CANCELLED, DONE, FAILED, PAUSED, PRUNED, QUEUED, RUNNING,
                              job_variant)

# "stopped" is no job state: the summary's word for a job the run left unfinished.
STATE_STYLES = {
    QUEUED: "dim",
    RUNNING: "cyan",
    PAUSED: "yellow",
    DONE: "green",
    FAILED: "bold red",
    CANCELLED: "magenta",
    PRUNED: "dim",
    "stopped": "yellow",
}
_UNFINISHED = (QUEUED, RUNNING, PAUSED)
_LOG_STYLES = {"debug": "dim", "info": "dim", "warning": "yellow", "error": "bold red"}


def format_duration(seconds: float | None) -> str:
    """``1:02:03``, ``4:05`` or ``--:--`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def headline_score(scores: dict | None) -> tuple[str, float] | None:
    """(task, acc) of the first task with an accuracy, in the order the engine sent them
    (a config's ``eval_tasks`` order); None when no task has one (none ran, or only
    perplexity tasks)."""
    for task, metrics in (scores or {}).items():
        acc = metrics.get("acc") if isinstance(metrics, dict) else None
        if isinstance(acc, (int, float)):
            return task, float(acc)
    return None


def percent(value: float | None) -> str:
    """An accuracy (a fraction) as ``61.2%``; six characters at most."""
    return "-" if value is None or value != value else f"{100 * value:.1f}%"


def score_text(metrics: dict) -> str:
    """One task's scores in a few words: ``acc 61.2%, acc_norm 63.0%, n 500`` or
    ``ppl 12.34, 2,048 tokens``."""
    if not isinstance(metrics, dict):
        return str(metrics)
    parts = []
    if isinstance(metrics.get("perplexity"), (int, float)):
        parts.append(f"ppl {metrics['perplexity']:.2f}")
        if isinstance(metrics.get("tokens"), int):
            parts.append(f"{metrics['tokens']:,} tokens")
    for name in ("acc", "acc_norm"):
        if isinstance(metrics.get(name), (int, float)):
            parts.append(f"{name} {percent(metrics[name])}")
    if isinstance(metrics.get("n"), int):
        parts.append(f"n {metrics['n']:,}")
    return ", ".join(parts) or "-"


def _format_loss(loss: float | None) -> str:
    return "loss      -" if loss is None else f"loss {loss:6.4f}"


def _format_speed(tokens_per_s: float | None) -> str:
    if tokens_per_s is None:
        return "      - tok/s"
    return f"{tokens_per_s:7.0f} tok/s"


class RunProgress:
    """Rich progress bars on ``console`` (stderr), one per adapter, driven by engine events.

    Use as a context manager around the run; events may arrive before the first job exists
    (model loading) and after the last one ends.
    """

    def __init__(self, console: Console):
        self.console = console
        self._progress = Progress(
            TextColumn("{task.description}", table_column=Column(no_wrap=True, max_width=28)),
            BarColumn(bar_width=28),
            MofNCompleteColumn(table_column=Column(justify="right", min_width=9)),
            TextColumn("{task.fields[loss]}", table_column=Column(min_width=11)),
            TextColumn("{task.fields[speed]}", table_column=Column(min_width=13)),
            TextColumn("ETA {task.fields[eta]}", table_column=Column(min_width=11)),
            TextColumn("{task.fields[state]}", table_column=Column(min_width=9)),
            console=console,
            refresh_per_second=4,
            # stdout belongs to programs; stray stderr writes (library warnings) still go
            # above the bars through Rich's stderr redirect.
            redirect_stdout=False,
        )
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> "RunProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._progress.stop()

    def print(self, message: str, style: str = "") -> None:
        """A line above the bars; ``message`` is plain text (brackets are not markup)."""
        self._progress.console.print(Text(message, style=style))

    def handle(self, event: dict) -> None:
        handler = getattr(self, f"_on_{event.get('type')}", None)
        if handler is not None:
            handler(event)

    # -- one method per event type --------------------------------------------------------

    def _on_run_start(self, event: dict) -> None:
        params = event.get("num_params")
        size = f", {params / 1e6:.1f}M parameters" if isinstance(params, (int, float)) else ""
        self.print(f"Base model {event.get('base_model')} ({event.get('model_type')}{size}) on "
                   f"{event.get('device')}, {event.get('dtype')}, attention "
                   f"{event.get('attn_impl')}"
                   f"{', sequences packed' if event.get('packing') else ''}; "
                   f"output in {event.get('output_dir')}")

    def _on_job_added(self, event: dict) -> None:
        name = event["job"]
        total = event.get("total_steps") or None
        adapter = event.get("adapter") or {}
        self._tasks[name] = self._progress.add_task(
            name, total=total, loss=_format_loss(None), speed=_format_speed(None),
            eta=format_duration(None), state=_state_text(QUEUED))
        detail = f", {job_variant(event)} r={adapter.get('r')}" if adapter else ""
        self.print(f"{name}: added ({event.get('train_examples')} training examples, "
                   f"{event.get('val_examples')} validation, {total} steps{detail})",
                   style="dim")

    def _on_job_state(self, event: dict) -> None:
        name, state = event["job"], event["state"]
        task = self._tasks.get(name)
        if task is not None:
            self._progress.update(task, state=_state_text(state))
            if state == DONE:
                self._progress.update(task, completed=event.get("total_steps"),
                                      eta=format_duration(0))
        if state == QUEUED:
            return   # every job starts queued: saying so for each is noise
        reason = event.get("reason")
        self.print(f"{name}: {state}" + (f": {reason}" if reason else ""),
                   style=STATE_STYLES.get(state, ""))

    def _on_step(self, event: dict) -> None:
        task = self._tasks.get(event["job"])
        if task is None:
            return
        self._progress.update(
            task, completed=event.get("step"), total=event.get("total_steps") or None,
            loss=_format_loss(event.get("loss")), speed=_format_speed(event.get("tokens_per_s")),
            eta=format_duration(event.get("eta_s")))

    def _on_eval(self, event: dict) -> None:
        # Either field may be absent: say what this evaluation measured.
        parts = []
        loss = event.get("eval_loss")
        if isinstance(loss, (int, float)):
            parts.append(f"validation loss {loss:.4f}")
        for task, metrics in (event.get("scores") or {}).items():
            parts.append(f"{task} {score_text(metrics)}")
        if parts:
            self.print(f"{event['job']}: {'; '.join(parts)} at step {event.get('step')}")

    def _on_checkpoint(self, event: dict) -> None:
        self.print(f"{event['job']}: checkpoint at step {event.get('step')} in "
                   f"{event.get('path')}", style="dim")

    def _on_adapter_saved(self, event: dict) -> None:
        self.print(f"{event['job']}: adapter saved to {event.get('path')}", style="green")

    def _on_engine_exit(self, event: dict) -> None:
        code = event.get("code")
        self.print(f"engine exited: {event.get('reason')}" + (f" (code {code})" if code else ""),
                   style="dim" if not code else "bold red")

    def _on_log(self, event: dict) -> None:
        level = event.get("level", "info")
        prefix = f"{level}: " if level in ("warning", "error") else ""
        self.print(prefix + str(event.get("message", "")), style=_LOG_STYLES.get(level, ""))


def _state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


@dataclass
class JobOutcome:
    """Where one job ended, as told by the events."""

    name: str
    state: str = QUEUED
    reason: str | None = None
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    scores: dict = field(default_factory=dict)     # task -> metrics, the latest of each
    adapter_path: str | None = None
    checkpoint_path: str | None = None
    data: str | None = None            # its data file, for an example prompt


def _first_alpaca_row(data_path: str | None) -> tuple[str, str] | None:
    """(instruction, input) of a JSONL data file's first row, to show a real example."""
    if not data_path:
        return None
    try:
        with open(data_path, encoding="utf-8") as f:
            row = json.loads(f.readline(1 << 16))
    except (OSError, ValueError):
        return None
    if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
        return None
    input_text = row.get("input")
    return row["instruction"], input_text if isinstance(input_text, str) else ""


class RunSummary:
    """Collects the outcome of every job from events and prints the end-of-run summary."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobOutcome] = {}
        self.output_dir: str | None = None
        self.ended = False
        self.exit_code: int | None = None     # the engine process's, once it said so
        self.exit_reason: str | None = None
        self.metrics_lost: list[str] = []     # what metrics.jsonl lacks, from engine_exit
        self.base_scores: dict = {}           # the base model's, from base_eval

    def _job(self, name: str) -> JobOutcome:
        return self.jobs.setdefault(name, JobOutcome(name))

    def handle(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "run_start":
            self.output_dir = event.get("output_dir")
        elif kind == "job_added":
            job = self._job(event["job"])
            job.total_steps = event.get("total_steps") or 0
            job.data = (event.get("adapter") or {}).get("data")
        elif kind == "job_state":
            job = self._job(event["job"])
            job.state, job.reason = event["state"], event.get("reason")
            job.step = event.get("step", job.step)
        elif kind == "step":
            job = self._job(event["job"])
            job.step, job.loss = event.get("step", job.step), event.get("loss")
            job.total_steps = event.get("total_steps") or job.total_steps
        elif kind == "eval":
            # An event may carry the loss, the scores or both: keep the latest of each.
            job = self._job(event["job"])
            if event.get("eval_loss") is not None:
                job.eval_loss = event["eval_loss"]
            job.scores.update(event.get("scores") or {})
        elif kind == "base_eval":
            self.base_scores.update(event.get("scores") or {})
        elif kind == "checkpoint":
            self._job(event["job"]).checkpoint_path = event.get("path")
        elif kind == "adapter_saved":
            self._job(event["job"]).adapter_path = event.get("path")
        elif kind == "engine_exit":
            self.exit_code, self.exit_reason = event.get("code"), event.get("reason")
            self.metrics_lost = event.get("metrics_lost") or []
        elif kind == "run_end":
            self.ended = True
            for name, final in (event.get("jobs") or {}).items():
                job = self._job(name)
                job.state = final.get("state", job.state)
                job.step = final.get("step", job.step)
                job.total_steps = final.get("total_steps", job.total_steps)

    @property
    def any_failed(self) -> bool:
        return any(job.state == FAILED for job in self.jobs.values())

    def render(self, console: Console) -> None:
        """Each adapter's state and folder, then the commands to try the finished ones."""
        if not self.jobs:
            return
        states = {name: self.shown_state(job) for name, job in self.jobs.items()}
        counts: dict[str, int] = {}
        for state in states.values():
            counts[state] = counts.get(state, 0) + 1
        tally = ", ".join(f"{n} {state}" for state, n in counts.items())
        console.print()
        console.print(Text(f"Summary ({tally})", style="bold"))
        width = max(len(name) for name in self.jobs)
        for job in self.jobs.values():
            line = Text("  ")
            line.append(f"{job.name:<{width}}  ")
            state = states[job.name]
            line.append(f"{state:<11}", style=STATE_STYLES.get(state, ""))
            line.append(f" {job.step:>5}/{job.total_steps:<5}")
            if job.loss is not None:
                line.append(f"  loss {job.loss:.4f}")
            if job.eval_loss is not None:
                line.append(f"  val {job.eval_loss:.4f}")
            headline = headline_score(job.scores)
            if headline is not None:
                line.append(f"  {headline[0]} {percent(headline[1])}")
            where = self.adapter_folder(job)
            if job.state in (DONE, PRUNED) and where:
                line.append(f"  -> {where}", style="green")
            elif where:
                line.append(f"  last checkpoint: {where}")
            else:
                line.append("  nothing saved", style="dim")
            if job.reason:
                line.append(f"  ({job.reason})", style=STATE_STYLES.get(job.state, ""))
            console.print(line, soft_wrap=True)
        self._render_scores(console)
        tries = [(job, self.adapter_folder(job)) for job in self.jobs.values()]
        tries = [(job, folder) for job, folder in tries if folder]
        if tries:
            console.print(Text("Try an adapter (add --base-only to compare with the base model):",
                               style="bold"))
            for job, folder in tries:
                example = _first_alpaca_row(job.data)
                if example is None:
                    prompt = '"Your instruction here"'
                else:
                    instruction, input_text = example
                    prompt = shlex.quote(instruction)
                    if input_text:
                        prompt += f" --input {shlex.quote(input_text)}"
                console.print(Text(f"  mlora generate --adapter {shlex.quote(folder)} {prompt}"),
                              soft_wrap=True)
        if self.output_dir:
            # Never claim a whole log: the folder may have been deleted, a disk filled.
            metrics = Path(self.output_dir) / "metrics.jsonl"
            if not metrics.is_file():
                log_note = Text(f"No event log: {metrics} is missing", style="yellow")
            elif self.metrics_lost:
                log_note = Text(f"Events are in {metrics}, except "
                                + "; ".join(self.metrics_lost), style="yellow")
            else:
                log_note = Text(f"Every event is in {metrics}", style="dim")
            console.print(log_note, soft_wrap=True)

    def _render_scores(self, console: Console) -> None:
        """The base model against each adapter on the run's eval tasks (when any ran)."""
        rows = {name: job.scores for name, job in self.jobs.items() if job.scores}
        if not rows:
            return
        if self.base_scores:
            rows = {"base": self.base_scores, **rows}
        keys = list(dict.fromkeys(k for scores in rows.values() for k in scores))
        from mlora_tui.score_table import results_table
        console.print(results_table(rows, keys, title="eval scores"))

    def shown_state(self, job: JobOutcome) -> str:
        """The job's state; once the run has ended, nothing is running any more."""
        if self.ended and job.state in _UNFINISHED:
            return "stopped" if job.step else "not started"
        return job.state

    @staticmethod
    def adapter_folder(job: JobOutcome) -> str | None:
        """The folder to load: the final adapter, else the latest checkpoint (same format)."""
        return job.adapter_path or job.checkpoint_path
