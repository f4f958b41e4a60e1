"""Experiment trackers (``[train] report_to``): every job's metrics also go to TensorBoard,
Weights & Biases, MLflow or trackio, each through its own library.

``TrackerHub`` sees every event the engine emits (``Engine.emit``) and turns them into one
tracker run per job: ``job_added`` starts it with the job's settings as hyperparameters
(wandb and trackio group a sweep's trials by the sweep, MLflow tags them), ``step``,
``eval`` and ``router`` events log their numbers at the job's step, a final ``job_state``
ends it and ``run_end`` ends every run still open. The names are the same in every tracker
(``METRICS``; eval scores as ``eval/<task>/<metric>``).

Offline by default, under output_dir: TensorBoard event files in ``tensorboard/<job>``,
wandb in offline mode (``wandb/offline-run-*``), MLflow's file store in ``mlruns``, trackio's
SQLite store in ``trackio``. A user's own settings win (WANDB_MODE, WANDB_DIR, WANDB_PROJECT,
MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, TRACKIO_DIR): nothing goes to a network
service unless they say so.

A tracker never stops training: the first exception from one is reported as a warning
event and that tracker is off for the rest of the run; the others go on.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

# Event field -> the name every tracker logs it under.
METRICS = {
    "step": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
             "tokens_per_s": "train/tokens_per_s"},
    "eval": {"eval_loss": "eval/loss"},
    "router": {"aux_loss": "router/aux_loss", "z_loss": "router/z_loss"},
}
FINAL_STATES = ("done", "failed", "cancelled", "pruned")


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def event_metrics(event: dict) -> dict[str, float]:
    """The numbers of a step, eval or router event, by tracker name (finite ones only)."""
    out = {}
    for field, name in METRICS.get(event["type"], {}).items():
        value = _number(event.get(field))
        if value is not None:
            out[name] = value
    if event["type"] == "eval":
        for task, scores in (event.get("scores") or {}).items():
            for metric, value in (scores or {}).items():
                if _number(value) is not None:
                    out[f"eval/{task}/{metric}"] = _number(value)
    return out


def hyperparameters(event: dict) -> dict:
    """A job_added event's settings, flat (``expert_lora.r``), lists as text."""
    flat: dict = {}

    def put(key: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                put(f"{key}.{k}", v)
        elif isinstance(value, (list, tuple)):
            flat[key] = ",".join(map(str, value))
        elif value is not None:
            flat[key] = value

    for key, value in (event.get("adapter") or {}).items():
        put(key, value)
    for key in ("variant", "total_steps", "train_examples", "val_examples", "sweep", "trial"):
        if event.get(key) is not None:
            put(key, event[key])
    return flat


@contextlib.contextmanager
def _quiet():
    """Libraries that print (trackio) must not write to the engine's terminal or log."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class Tracker:
    """One tracker: a run per job. ``where`` says where it writes."""

    name = ""
    where = ""

    def __init__(self, output_dir: Path, project: str):
        self.output_dir, self.project = output_dir, project
        self.runs: dict = {}

    def start(self, job: str, settings: dict, group: str | None = None) -> None:
        raise NotImplementedError

    def log(self, job: str, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, job: str, state: str = "done") -> None:
        raise NotImplementedError

    def close(self) -> None:
        """End every run still open (its job did not finish in this run)."""
        for job in list(self.runs):
            self.finish(job, "stopped")


class TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, output_dir: Path, project: str):
        super().__init__(output_dir, project)
        from torch.utils.tensorboard import SummaryWriter   # needs the tensorboard package
        self._writer = SummaryWriter
        self.where = str(output_dir / "tensorboard")

    def start(self, job, settings, group=None):
        writer = self._writer(log_dir=str(Path(self.where) / job), flush_secs=10)
        table = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
        writer.add_text("settings", "| setting | value |\n|---|---|\n" + table, 0)
        self.runs[job] = writer

    def log(self, job, step, values):
        writer = self.runs[job]
        for name, value in values.items():
            writer.add_scalar(name, value, step)

    def finish(self, job, state="done"):
        self.runs.pop(job).close()


class Wandb(Tracker):
    name = "wandb"

    def __init__(self, output_dir: Path, project: str):
        super().__init__(output_dir, project)
        import wandb
        self._wandb = wandb
        self.mode = os.environ.get("WANDB_MODE") or "offline"
        self.dir = os.environ.get("WANDB_DIR") or str(output_dir)
        self.where = f"{Path(self.dir) / 'wandb'} ({self.mode})"

    def start(self, job, settings, group=None):
        wandb = self._wandb
        self.runs[job] = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or self.project, name=job, group=group,
            config=settings, dir=self.dir, mode=self.mode, reinit="create_new",
            settings=wandb.Settings(console="off", silent=True))

    def log(self, job, step, values):
        self.runs[job].log(values, step=step)

    def finish(self, job, state="done"):
        self.runs.pop(job).finish(exit_code=0 if state == "done" else 1)


class MLflow(Tracker):
    name = "mlflow"
    _STATUS = {"done": "FINISHED", "failed": "FAILED"}   # otherwise KILLED
    _KEY = re.compile(r"[^A-Za-z0-9_\-. /]")            # what MLflow allows in names

    def __init__(self, output_dir: Path, project: str):
        super().__init__(output_dir, project)
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
        self._metric, self._param = Metric, Param
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (output_dir / "mlruns").absolute().as_uri()
            # MLflow 3 keeps its file store only on request (its own opt-out switch).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.where = uri
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or project
        experiment = self.client.get_experiment_by_name(name)
        self.experiment = (experiment.experiment_id if experiment is not None
                           else self.client.create_experiment(name))

    def start(self, job, settings, group=None):
        tags = {"sweep": group} if group else {}
        run_id = self.client.create_run(self.experiment, run_name=job, tags=tags).info.run_id
        self.runs[job] = run_id
        params = [self._param(self._KEY.sub("_", k), str(v)[:6000]) for k, v in settings.items()]
        for i in range(0, len(params), 100):      # MLflow's limit per batch
            self.client.log_batch(run_id, params=params[i:i + 100])

    def log(self, job, step, values):
        now = int(time.time() * 1000)
        self.client.log_batch(self.runs[job], metrics=[
            self._metric(self._KEY.sub("_", k), v, now, step) for k, v in values.items()])

    def finish(self, job, state="done"):
        self.client.set_terminated(self.runs.pop(job), self._STATUS.get(state, "KILLED"))


class Trackio(Tracker):
    name = "trackio"

    def __init__(self, output_dir: Path, project: str):
        super().__init__(output_dir, project)
        if "trackio" not in sys.modules and not os.environ.get("TRACKIO_DIR"):
            # trackio reads TRACKIO_DIR once, when it is imported (else ~/.cache/huggingface).
            os.environ["TRACKIO_DIR"] = str((output_dir / "trackio").absolute())
            try:
                import trackio
            finally:
                del os.environ["TRACKIO_DIR"]
        import trackio
        import trackio.utils
        self._trackio = trackio
        self.where = str(trackio.utils.TRACKIO_DIR)
        self.project = re.sub(r"[^A-Za-z0-9_-]", "_", project) or "mlora"

    def start(self, job, settings, group=None):
        trackio = self._trackio
        options = dict(embed=False, auto_log_gpu=False, auto_log_cpu=False,
                       capture_console=False)     # those this trackio version has
        accepted = inspect.signature(trackio.init).parameters
        with _quiet():
            run = trackio.init(project=self.project, name=job, group=group, config=settings,
                               resume="allow",
                               **{k: v for k, v in options.items() if k in accepted})
        # trackio.init ends "the current run": let several jobs' runs stay open at once.
        trackio.context_vars.current_run.set(None)
        self.runs[job] = run

    def log(self, job, step, values):
        self.runs[job].log(values, step=step)

    def finish(self, job, state="done"):
        with _quiet():
            self.runs.pop(job).finish()


TRACKER_CLASSES = {cls.name: cls for cls in (TensorBoard, Wandb, MLflow, Trackio)}


class TrackerHub:
    """The trackers of ``report_to``, fed with the engine's events (``handle``).

    Trackers start at the first event (so that their warnings are events too); ``warn`` gets
    a message when one fails, once, and that tracker is off from then on.
    """

    def __init__(self, report_to: list[str], output_dir: Path, warn: Callable[[str], None]):
        self.names = list(report_to)
        self.output_dir = Path(output_dir)
        self.warn = warn
        self.trackers: list[Tracker] | None = None
        self.failed: dict[str, str] = {}

    def handle(self, event: dict) -> None:
        if not self.names:
            return
        kind = event.get("type")
        if self.trackers is None:
            self._start()
        if kind == "job_added":
            self._each("start", event["job"], hyperparameters(event), event.get("sweep"))
        elif kind in METRICS and event.get("job") is not None and event.get("step") is not None:
            values = event_metrics(event)
            if values:
                self._each("log", event["job"], int(event["step"]), values)
        elif kind == "job_state" and event.get("state") in FINAL_STATES:
            self._each("finish", event["job"], event["state"])
        elif kind == "run_end":
            self.close()

    def close(self) -> None:
        for tracker in list(self.trackers or []):
            self._call(tracker, "close")
        self.names = []     # closed for good: later events are not tracked

    def _start(self) -> None:
        self.trackers = []
        project = self.output_dir.absolute().name or "mlora"
        for name in self.names:
            try:
                self.trackers.append(TRACKER_CLASSES[name](self.output_dir, project))
            except Exception as exc:  # noqa: BLE001 - a tracker never stops training
                self._failed(name, "start", exc)
        if self.trackers:
            self.warn("experiment trackers: " + "; ".join(
                f"{t.name} -> {t.where}" for t in self.trackers), "info")

    def _each(self, method: str, job: str, *args) -> None:
        for tracker in list(self.trackers):
            if method == "start" or job in tracker.runs:
                self._call(tracker, method, job, *args)

    def _call(self, tracker: Tracker, method: str, *args) -> None:
        try:
            getattr(tracker, method)(*args)
        except Exception as exc:  # noqa: BLE001 - a tracker never stops training
            self.trackers.remove(tracker)
            self._failed(tracker.name, method, exc)
            with contextlib.suppress(Exception):
                tracker.close()

    def _failed(self, name: str, what: str, exc: Exception) -> None:
        self.failed[name] = f"{type(exc).__name__}: {exc}"
        self.warn(f"report_to: {name} failed ({what}: {type(exc).__name__}: {exc}); it is "
                  "off for the rest of this run, training goes on", "warning")
