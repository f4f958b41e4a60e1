"""Hyperparameter sweeps: Optuna proposes the trials, the engine trains them as jobs.

Each ``[[sweep]]`` (engine/core/config_sweep.py) is a source of jobs. Its trials are
ordinary jobs (named ``<sweep>-<k>``, added like ``add_jobs`` adds them): exact, resumable,
pausable, with their own fault isolation, batched with every other job. Optuna does the
searching, through ask-and-tell: its study lives in ``output_dir/sweeps.db`` (its RDB
storage: ``optuna-dashboard sqlite:///OUTPUT_DIR/sweeps.db`` opens it). A grid's trials are
its combinations in table order (enqueued); a sampled sweep asks its sampler (TPE or
random) with a seed derived from (sweep seed, trial index), so trial k gets the same
parameters whenever it is asked with the same history. At every ``eval`` of a trial the
sweep's metric is reported to the trial and its pruner (ASHA, Hyperband, median) decides;
a pruned trial ends in the state ``pruned``, its adapter saved as it was.

Slots refill continuously: at every step boundary each sweep tops up to ``parallel``
trials that are not finished, so a pruned or finished trial's slot goes to the next trial
at the next step.

Resume: the engine checkpoint, not the database, is the truth. Optuna's samplers keep
random state in memory, a finished trial cannot be told again, and pruner state written
after the checkpoint would survive a crash; so the checkpoint holds every trial (index,
job, parameters, reports, state, value, the pruner's system attributes), and a resumed
engine deletes the study and writes it again from them (``optuna.trial.create_trial``)
before going on: the database is then what it was at the checkpoint, and the same reports
in the same order give the same decisions.

``output_dir/sweep-<name>.json`` (rewritten atomically after each report) lists every
trial, best first, and names the best.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from engine.core.config import parse_adapter_tables
from engine.core.config_sweep import SweepConfig
from engine.core.errors import UserError
from engine.core.jobs import CANCELLED, DONE, FAILED, PRUNED
from engine.train.adapters import write_files_atomically

if TYPE_CHECKING:
    from engine.train.engine import Engine
    from engine.train.job import Job

DB_FILE = "sweeps.db"


@dataclass
class Trial:
    index: int
    job: str
    params: dict
    state: str = "running"                      # running | done | pruned | failed
    reports: list = field(default_factory=list)  # [[step, value], ...]
    value: Optional[float] = None
    reason: str = ""
    system_attrs: dict = field(default_factory=dict)
    number: int = -1                             # Optuna's trial number in the study


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class Sweep:
    """One ``[[sweep]]``: its study, its trials, and the slots it keeps filled."""

    def __init__(self, engine: "Engine", config: SweepConfig, storage):
        self.engine, self.config, self.storage = engine, config, storage
        self.trials: list[Trial] = []
        optuna = _optuna()
        self.study = optuna.create_study(study_name=config.name, storage=storage,
                                         direction=config.direction, pruner=self._pruner(),
                                         load_if_exists=False)

    # -- Optuna pieces ------------------------------------------------------------------

    def _pruner(self):
        optuna, c = _optuna(), self.config
        if c.prune == "asha":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=c.eval_steps,
                                                          reduction_factor=3)
        if c.prune == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=c.eval_steps,
                                                  reduction_factor=3)
        if c.prune == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=min(c.parallel, 4),
                                               n_warmup_steps=0)
        return optuna.pruners.NopPruner()

    def _sampler(self, index: int):
        optuna, c = _optuna(), self.config
        seed = c.trial_seed(index)
        if c.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        # Optuna's default of 10 random start-up trials would leave a 12-trial search mostly
        # random: a quarter of the trials (at least 2, at most 10) start it.
        startup = max(2, min(10, c.n_trials // 4))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)

    def _distributions(self) -> dict:
        optuna, c = _optuna(), self.config
        d = optuna.distributions
        if c.grid is not None:
            return {k: d.CategoricalDistribution(v) for k, v in c.grid.items()}
        out = {}
        for key, spec in c.sample.items():
            kind, value = next(iter(spec.items()))
            if kind == "choice":
                out[key] = d.CategoricalDistribution(value)
            elif kind == "int_uniform":
                out[key] = d.IntDistribution(value[0], value[1])
            else:
                out[key] = d.FloatDistribution(float(value[0]), float(value[1]),
                                               log=kind == "log_uniform")
        return out

    # -- trials ---------------------------------------------------------------------------

    def open_trials(self) -> int:
        return sum(1 for t in self.trials if t.state == "running")

    def fill(self) -> None:
        """Start trials until ``parallel`` are open or every trial has started."""
        while self.open_trials() < self.config.parallel and len(self.trials) < self.config.n_trials:
            self._start(len(self.trials))

    def _start(self, index: int) -> None:
        c = self.config
        if c.grid is not None:
            self.study.enqueue_trial(c.grid_params(index))
        else:
            self.study.sampler = self._sampler(index)
        trial = self.study.ask(self._distributions())
        params = dict(trial.params)
        name = c.trial_name(index)
        self.study._storage.set_trial_user_attr(trial._trial_id, "job", name)
        record = Trial(index, name, params, number=trial.number)
        self.trials.append(record)
        self._add_job(record)
        self.engine.log(f"sweep {c.name}: trial {name} starts with "
                        + ", ".join(f"{k}={_short(v)}" for k, v in params.items()))
        self.write_summary()

    def _add_job(self, trial: Trial) -> None:
        engine, c = self.engine, self.config
        table = c.trial_table(trial.index, trial.params)
        cfg = parse_adapter_tables([table], engine.config.source, engine.config.train,
                                   Path(engine.config.source).parent)[0]
        engine.add_job(cfg, from_config=False, sweep={"sweep": c.name, "trial": trial.index,
                                                     "params": trial.params})

    def trial_of(self, job_name: str) -> Optional[Trial]:
        return next((t for t in self.trials if t.job == job_name), None)

    def _handle(self, trial: Trial):
        return _optuna().trial.Trial(self.study, self._trial_id(trial))

    def _trial_id(self, trial: Trial) -> int:
        return self.study._storage.get_trial_id_from_study_id_trial_number(
            self.study._study_id, trial.number)

    # -- what trials report -------------------------------------------------------------

    def on_eval(self, job: "Job", result: dict) -> None:
        """A trial's eval: report the metric at its step; prune it when its pruner says so."""
        trial = self.trial_of(job.name)
        if trial is None or trial.state != "running":
            return
        value = self.config.metric_of(result)
        if value is None or not math.isfinite(value):
            return
        handle = self._handle(trial)
        if any(step == job.step for step, _ in trial.reports):
            return
        handle.report(value, job.step)
        trial.reports.append([job.step, value])
        if job.step < job.total_steps and handle.should_prune():
            trial.state, trial.value = "pruned", value
            trial.reason = (f"pruned by {self.config.prune} at step {job.step}: "
                            f"{self.config.metric} {value:.4g}")
            trial.system_attrs = dict(self.study._storage.get_trial(
                self._trial_id(trial)).system_attrs)
            self.study.tell(trial.number, state=_optuna().trial.TrialState.PRUNED)
            self._prune(job, trial.reason)
        self.write_summary()

    def _prune(self, job: "Job", reason: str) -> None:
        """End a trial early: its adapter saved as it is now, its state ``pruned``."""
        engine = self.engine
        job.optimizer.zero_grad(set_to_none=True)
        path = engine.adapter_dir(job)
        try:
            write_files_atomically(path, engine._adapter_files(job))
            engine.emit("adapter_saved", job=job.name, step=job.step, path=str(path))
        except OSError as exc:
            engine.log(f"{job.name}: pruned, but its adapter could not be saved to {path} "
                       f"({exc.strerror or exc})", level="warning")
        engine._set_state(job, PRUNED, reason)

    def on_finished(self, job: "Job") -> None:
        """A trial left training: done (its last reported metric is its value) or not."""
        trial = self.trial_of(job.name)
        if trial is None or trial.state != "running":
            return
        states = _optuna().trial.TrialState
        if job.state == DONE and trial.reports:
            trial.state, trial.value = "done", trial.reports[-1][1]
            self.study.tell(trial.number, trial.value)
        elif job.state in (DONE, FAILED, CANCELLED):
            trial.state = "failed"
            trial.reason = job.reason or ("no metric was reported" if job.state == DONE
                                          else job.state)
            self.study.tell(trial.number, state=states.FAIL)
        else:
            return
        trial.system_attrs = dict(self.study._storage.get_trial(
            self._trial_id(trial)).system_attrs)
        self.write_summary()

    # -- checkpoints and the summary file -------------------------------------------------

    def state(self) -> dict:
        for trial in self.trials:     # the pruner's attributes as the database has them now
            if trial.state == "running":
                trial.system_attrs = dict(self.study._storage.get_trial(
                    self._trial_id(trial)).system_attrs)
        return {"config": asdict(self.config), "trials": [asdict(t) for t in self.trials]}

    def restore(self, saved: dict) -> None:
        """The study written again from the checkpoint's trials (see the module's doc)."""
        if saved and saved.get("config") != json.loads(json.dumps(asdict(self.config))):
            raise UserError(f'cannot resume: [[sweep]] "{self.config.name}" is not the one the '
                            "checkpoint's trials come from (its fields changed); start the "
                            "sweep again in another output_dir, or restore its fields")
        optuna = _optuna()
        optuna.delete_study(study_name=self.config.name, storage=self.storage)
        self.study = optuna.create_study(study_name=self.config.name, storage=self.storage,
                                         direction=self.config.direction,
                                         pruner=self._pruner())
        states = optuna.trial.TrialState
        distributions = self._distributions()
        self.trials = []
        for raw in saved.get("trials", []):
            trial = Trial(**raw)
            kind = {"running": states.RUNNING, "done": states.COMPLETE,
                    "pruned": states.PRUNED, "failed": states.FAIL}[trial.state]
            frozen = optuna.trial.create_trial(
                state=kind, params=trial.params,
                distributions={k: distributions[k] for k in trial.params},
                value=trial.value if kind == states.COMPLETE else None,
                intermediate_values={int(s): float(v) for s, v in trial.reports},
                user_attrs={"job": trial.job}, system_attrs=trial.system_attrs)
            self.study.add_trial(frozen)
            trial.number = self.study.trials[-1].number
            self.trials.append(trial)

    def ranked(self) -> list[Trial]:
        sign = 1 if self.config.direction == "minimize" else -1

        def key(t: Trial):
            value = t.value if t.value is not None else (t.reports[-1][1] if t.reports else None)
            order = {"done": 0, "running": 1, "pruned": 2, "failed": 3}[t.state]
            return (value is None, order, sign * value if value is not None else 0.0, t.index)
        return sorted(self.trials, key=key)

    def summary(self) -> dict:
        c = self.config
        ranked = self.ranked()
        done = [t for t in ranked if t.state == "done"]
        return {"name": c.name, "metric": c.metric, "direction": c.direction,
                "prune": c.prune, "parallel": c.parallel, "trials_total": c.n_trials,
                "best": done[0].job if done else None,
                "trials": [{"job": t.job, "index": t.index, "params": t.params,
                            "state": t.state, "value": t.value,
                            "metric_history": t.reports, "reason": t.reason}
                           for t in ranked]}

    def write_summary(self) -> None:
        path = self.engine.output_dir / f"sweep-{self.config.name}.json"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.summary(), indent=2) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self.engine.log(f"sweep {self.config.name}: cannot write {path} "
                            f"({e.strerror or e})", level="warning")
            return
        self.engine.emit("sweep", **self.summary())


class Sweeps:
    """Every sweep of the engine."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.sweeps: list[Sweep] = []
        if not engine.config.sweeps:
            return
        optuna = _optuna()
        engine.output_dir.mkdir(parents=True, exist_ok=True)
        db = engine.output_dir / DB_FILE
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
        for config in engine.config.sweeps:
            try:
                optuna.delete_study(study_name=config.name, storage=storage)
            except KeyError:
                pass     # a fresh database (a resume writes the study again: restore)
            self.sweeps.append(Sweep(engine, config, storage))

    @property
    def active(self) -> bool:
        return any(len(s.trials) < s.config.n_trials or s.open_trials() for s in self.sweeps)

    def fill(self) -> None:
        for sweep in self.sweeps:
            sweep.fill()

    def on_eval(self, job: "Job", result: dict) -> None:
        for sweep in self.sweeps:
            sweep.on_eval(job, result)

    def on_finished(self, job: "Job") -> None:
        for sweep in self.sweeps:
            sweep.on_finished(job)

    def state(self) -> dict:
        return {s.config.name: s.state() for s in self.sweeps}

    def restore(self, saved: dict) -> None:
        for sweep in self.sweeps:
            sweep.restore(saved.get(sweep.config.name, {}))

    def trial_names(self) -> set[str]:
        return {t.job for s in self.sweeps for t in s.trials}


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
