"""Evaluation during training: which jobs are evaluated when, in one batched pass.

A job is evaluated after its last optimizer step, every ``eval_steps`` optimizer steps when
it sets that, and when a client asks (the ``evaluate`` request, run at the next step
boundary). An evaluation is the job's validation loss (when it has a validation set) and
its scores on its ``eval_tasks`` (``[[eval]]`` tables, read once when the engine starts).
Every job due at one step boundary is scored in the same passes: for each task, an
``AdapterSet`` view of the engine's own model whose rows are the due jobs that list the
task (``engine.train.evaluate.score_tasks``), so one base forward serves them all.

Evaluating reads the adapters and never changes them: no gradients, no dropout (scoring's
segments carry no dropout seed), no random numbers drawn, and the next training pass sets
the batch layout again, so training stays bit for bit what it would be without it.

Each evaluated job gets one ``eval`` event: ``{"job", "step", "eval_loss"?, "scores"?}``
(``scores``: {task: metrics}); a key is present only when that part ran. Before the first
step, the base model alone is scored once on every task a job lists, for comparison: one
``base_eval`` event ``{"scores": {task: metrics}}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.core.config import AdapterConfig
from engine.core.config_eval import load_eval_tasks
from engine.core.errors import ConfigError, UserError
from engine.core.jobs import CANCELLED
from engine.train.adapter_set import BASE_ROW, AdapterRow, AdapterSet
from engine.train.evaluate import score_tasks
from engine.train.job import Job

if TYPE_CHECKING:
    from engine.train.engine import Engine

# Sequences per scoring pass, every due job's counted.
EVAL_BATCH_SIZE = 32


class EvalRunner:
    """The engine's evaluations: its ``[[eval]]`` tasks, and the jobs asked for."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        config = engine.config
        # {name: (TaskSpec, items)}; a bad task file is a ConfigError before any training.
        self.tasks = load_eval_tasks(config.evals, config.source)
        self.requested: list[str] = []   # jobs a client asked to evaluate, in order

    def check_job(self, cfg: AdapterConfig) -> None:
        """A job's eval_tasks must name the engine's [[eval]] tables (jobs added later too)."""
        for name in cfg.eval_tasks:
            if name not in self.tasks:
                known = ", ".join(f'"{k}"' for k in self.tasks) or "none"
                raise ConfigError(f'unknown task "{name}": the engine\'s [[eval]] tables are '
                                  f"{known}", table=f'adapter "{cfg.name}"', field="eval_tasks")

    # -- when ------------------------------------------------------------------------------

    def after_step(self, stepped: list[Job]) -> list[Job]:
        """Evaluate, in one batch, every job of ``stepped`` (jobs that just took an optimizer
        step) at its last step or at a multiple of its eval_steps; returns those at their
        last step (evaluated: the engine saves them without evaluating again)."""
        finished = [job for job in stepped if job.step >= job.total_steps]
        due = [job for job in stepped if job in finished or
               (job.cfg.eval_steps is not None and job.step % job.cfg.eval_steps == 0)]
        if due:
            self.evaluate(due)
        return finished

    def request(self, name: str) -> dict:
        """A client's ``evaluate``: checked now, run at the next step boundary."""
        job = self.engine.job(name)
        if job.state == CANCELLED:
            raise UserError(f"job {name!r} is cancelled: its adapter has left the model, so "
                            "there is nothing to evaluate (its saved checkpoints can be, with "
                            "mlora evaluate)")
        tasks = self.task_names(job, requested=True)
        if not tasks and not job.data.val:
            raise UserError(f"job {name!r} has nothing to evaluate: the config has no [[eval]] "
                            "table and the job no validation set (val_set_size)")
        if name not in self.requested:
            self.requested.append(name)
        return {"job": name, "tasks": tasks, "eval_loss": bool(job.data.val)}

    def run_requested(self) -> None:
        """The evaluations clients asked for since the last step boundary, in one batch."""
        if not self.requested:
            return
        names, self.requested = self.requested, []
        jobs = [self.engine.jobs[n] for n in names
                if n in self.engine.jobs and self.engine.jobs[n].state != CANCELLED]
        if jobs:
            self.evaluate(jobs, requested=True)

    def task_names(self, job: Job, requested: bool = False) -> list[str]:
        """The tasks ``job`` is scored on: its eval_tasks; when a client asks and it lists
        none, every [[eval]] table."""
        if job.cfg.eval_tasks:
            return list(job.cfg.eval_tasks)
        return list(self.tasks) if requested else []

    def score_base(self) -> None:
        """The base model alone on every task some job lists: one ``base_eval`` event."""
        engine = self.engine
        names = list(dict.fromkeys(name for job in engine.jobs.values()
                                   for name in job.cfg.eval_tasks))
        if not names:
            return
        view = AdapterSet(engine.model, engine.tokenizer, engine.layout,
                          [AdapterRow(BASE_ROW, None)], engine.device, engine.model_info)
        try:
            scores = score_tasks(view, [self.tasks[name] for name in names],
                                 batch_size=EVAL_BATCH_SIZE)
        except torch.OutOfMemoryError:
            engine._free_memory()
            engine.log("out of memory while scoring the base model; no base scores",
                       level="warning")
            return
        engine.emit("base_eval", scores=scores[BASE_ROW])

    # -- how -------------------------------------------------------------------------------

    def evaluate(self, jobs: list[Job], requested: bool = False) -> None:
        """Validation loss of each job that has a validation set, and every task's scores
        for the jobs that list it (one batched pass per task); one ``eval`` event per job."""
        engine = self.engine
        results: dict[str, dict] = {job.name: {} for job in jobs}
        for job in jobs:
            if not job.data.val:
                continue
            try:
                loss = engine.evaluate(job)
            except torch.OutOfMemoryError:
                engine._free_memory()
                engine.log(f"{job.name}: out of memory while computing its validation loss; "
                           "none this time (lower micro_batch_size to evaluate)",
                           level="warning")
                continue
            if loss is not None:
                job.eval_loss = loss
                results[job.name]["eval_loss"] = loss
        by_task: dict[str, list[Job]] = {}
        for job in jobs:
            for name in self.task_names(job, requested):
                by_task.setdefault(name, []).append(job)
        for name, group in by_task.items():
            spec, items = self.tasks[name]
            try:
                scores = score_tasks(self._view(group), [(spec, items)],
                                     batch_size=EVAL_BATCH_SIZE)
            except torch.OutOfMemoryError:
                engine._free_memory()
                engine.log(f"out of memory while scoring task {name!r} for "
                           f"{', '.join(j.name for j in group)}; no scores this time",
                           level="warning")
                continue
            for job in group:
                results[job.name].setdefault("scores", {})[name] = scores[job.name][name]
        for job in jobs:
            result = results[job.name]
            if "scores" in result:
                job.scores.update(result["scores"])
            if result:
                engine.emit("eval", job=job.name, step=job.step, **result)
                engine.sweeps.on_eval(job, result)     # a trial reports to its sweep

    def _view(self, jobs: list[Job]) -> AdapterSet:
        """The engine's own model as an AdapterSet whose rows are ``jobs``' adapters."""
        engine = self.engine
        rows = [AdapterRow(job.name, job.name, meta={"prompt": job.cfg.prompt}) for job in jobs]
        return AdapterSet(engine.model, engine.tokenizer, engine.layout, rows, engine.device,
                          engine.model_info)
