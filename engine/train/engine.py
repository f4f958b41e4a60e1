"""The engine: jobs (one adapter each) trained together in one batched step.

Read ``Engine.step`` top to bottom to see a step: pick the running jobs, take one
micro-batch from each, put them in one forward pass (packed back to back in one row,
engine/train/packing.py, or as padded rows), run the base model once with every adapter on its
own tokens, compute each job's loss from its own tokens only, one backward, and let each
job whose gradient accumulation is complete clip and step its own optimizer.

Exactness: nothing in a job's arithmetic depends on the other jobs in the batch. Its loss is
the sum of token losses over its own target tokens divided by the number of target tokens
in its whole optimizer batch (so accumulation equals one big batch); its dropout masks come
from its own seed, micro-batch count and tokens; it has its own optimizer, scheduler and clipping.

Beside this module: the job (job.py), its schedule (schedules.py), which micro-batches share
a pass (planning.py), which queued jobs start (admission.py) and checkpoints (resume.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from engine.core import checkpoints as ckpt
from engine.train.adapters import (adapter_files, detach_adapter,
                                   load_adapter_state, peft_config, read_adapter_folder,
                                   write_files_atomically, write_folder_atomically)
from engine.core.config import AdapterConfig, RunConfig
from engine.core.data import JobData
from engine.core.errors import ConfigError, UserError
from engine.core.events import EventWriter, restore_file
from engine.core.jobs import CANCELLED, DONE, FAILED, PAUSED, PRUNED, QUEUED, RUNNING
from engine.core.outputs import write_run_record
from engine.train.admission import Admission
from engine.train.evals import EvalRunner
from engine.train.fork import fork_job
from engine.train.playground import Playground
from engine.train.trackers import TrackerHub
from engine.train.sweeps import Sweeps
from engine.train.job import Job
from engine.train.lora import BatchLayout
from engine.train.packing import packing_problem
from engine.train.passes import PassRunner, StepClock
from engine.train.planning import (DEFAULT_PASS_OVERHEAD, PASS_OVERHEAD_TOKENS, MicroBatch, Pass,
                                   StepTotals, plan_step)
from engine.train.models import (enable_gradient_checkpointing,
                                 find_target_linears, hidden_states_and_head, load_base_model,
                                 select_device)
from engine.train.variants import variant_for
from engine.train.resume import (check_data, check_layout, check_resumable, checkpoint_files,
                                 load_job_state, restore_rng)
from engine.core.prompts import load_template

EventSink = Callable[[dict], None]


class Engine:
    """Holds the base model (loaded once) and the jobs; trains them in batched steps.

    With ``resume`` the engine continues from the newest checkpoint in its output folder
    (every job where it was, bit for bit), after checking that the config still describes
    the same jobs.
    """

    def __init__(self, config: RunConfig, on_event: EventSink | None = None,
                 write_metrics: bool = True, resume: bool = False):
        self.config = config
        self.on_event = on_event
        self.output_dir = Path(config.train.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = EventWriter(self.output_dir / "metrics.jsonl",
                                    restore=self._restore_run_record) if write_metrics else None
        self._trackers = TrackerHub(config.train.report_to, self.output_dir, self.log)
        self._stop_requested = False
        self.engine_step = 0           # batched steps taken; a resumed engine counts on
        self._split_passes = False     # after running out of memory: one pass per job
        self._checkpointed_step: int | None = None  # the step of the newest checkpoint
        checkpoint = ckpt.latest_checkpoint(self.output_dir) if resume else None
        manifest = ckpt.read_manifest(checkpoint) if checkpoint is not None else None
        if manifest is not None:
            check_resumable(checkpoint, manifest, config)
        self.evals = EvalRunner(self)   # reads the [[eval]] tasks: a bad file stops it here
        self.playground = Playground(self)   # generations asked while it trains
        self.sweeps = Sweeps(self)           # [[sweep]]s: Optuna's trials become jobs
        self.device = select_device()
        # see plan_passes; tests set it to force one pass
        self.pass_overhead = PASS_OVERHEAD_TOKENS.get(self.device.type, DEFAULT_PASS_OVERHEAD)
        self.model, self.tokenizer, self.model_info = load_base_model(
            config.model, self.device, log=self.log)
        self.decoder, self.lm_head, self.softcap = hidden_states_and_head(self.model)
        if config.train.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.layout = BatchLayout()
        self.passes = PassRunner(self.model, self.decoder, self.lm_head, self.softcap,
                                 self.layout, self.device, self.tokenizer.pad_token_id)
        self.packing = self._packing_choice()
        self.model_info["packing"] = self.packing
        self.admission = Admission(config, self.model, self.model_info, self.device,
                                   self.packing)
        self.jobs: dict[str, Job] = {}
        self.emit("run_start", config=config.source, output_dir=str(self.output_dir),
                  **self.model_info)
        if resume and checkpoint is None:
            self.log(f"nothing to resume: no checkpoint in "
                     f"{ckpt.checkpoints_dir(self.output_dir)}; starting from the beginning",
                     level="warning")
        if manifest is not None:
            self._restore(checkpoint, manifest)
        for adapter_cfg in config.adapters:
            if adapter_cfg.name not in self.jobs:
                if manifest is not None:
                    self.log(f"adapter {adapter_cfg.name!r} is new in the config: it starts "
                             "from step 0")
                self.add_job(adapter_cfg)
        try:
            # What this run is, so that another run into the same folder is refused
            # (engine/core/outputs.py) and --resume can name what changed.
            write_run_record(self.output_dir, config)
        except OSError as exc:
            self.log(f"cannot write {self.output_dir / 'run.json'} ({exc})", level="warning")

    def _packing_choice(self) -> bool:
        """Whether training passes pack their examples ([train] packing)."""
        choice = self.config.train.packing
        if choice == "off" or (choice == "auto" and self.device.type != "cpu"):
            return False
        problem = packing_problem(self.model, self.decoder, self.device)
        if problem is None:
            return True
        if choice == "on":
            raise ConfigError(f"packing = \"on\", but this model cannot pack: {problem}; "
                              "use \"auto\" or \"off\"", table="train", field="packing")
        self.log(f"sequence packing is off: {problem}", level="warning")
        return False

    # -- events -------------------------------------------------------------------------

    def emit(self, type_: str, **fields) -> dict:
        event = {"type": type_, "time": time.time(), **fields}
        # The writer's own notices (the log disappeared, cannot be written) come first.
        notices = self._metrics.write(event) if self._metrics is not None else []
        if self.on_event is not None:
            for each in notices + [event]:
                self.on_event(each)
        self._trackers.handle(event)     # [train] report_to: engine/train/trackers.py
        return event

    def _restore_run_record(self) -> list[str]:
        """The metrics writer found the output folder gone: run.json goes back with it."""
        return [restore_file("run.json", lambda: write_run_record(self.output_dir, self.config))]

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)

    def _set_state(self, job: Job, state: str, reason: str | None = None) -> None:
        job.state, job.reason = state, reason
        self.emit("job_state", job=job.name, state=state, reason=reason, step=job.step,
                  total_steps=job.total_steps)
        if state in (DONE, FAILED, CANCELLED):
            self.sweeps.on_finished(job)     # a trial's end tells its study

    # -- jobs ---------------------------------------------------------------------------

    def add_job(self, cfg: AdapterConfig, from_config: bool = True,
                restoring: bool = False, sweep: dict | None = None) -> Job:
        """Build a job's data and adapter; it starts queued.

        ``from_config`` False marks a job added to a running engine; ``restoring`` skips
        ``init_from`` (a checkpoint's weights replace the initial ones); ``sweep``: a
        trial's sweep, index and parameters, for its job_added event.
        """
        if cfg.name in self.jobs:
            raise ConfigError(f"an adapter named {cfg.name!r} already exists in this engine",
                              table=f'adapter "{cfg.name}"', field="name")
        self.evals.check_job(cfg)
        seed = cfg.seed if cfg.seed is not None else self.config.train.seed
        template = load_template(cfg.prompt)
        data = JobData.from_config(cfg, self.tokenizer, template,
                                   default_cutoff_len=self.config.train.cutoff_len,
                                   default_seed=self.config.train.seed)
        for warning in data.warnings():
            self.log(warning, level="warning")
        adapter = variant_for(cfg.name, cfg)   # its kind: LoRA, DoRA, MixLoRA (train/variants)
        targets = adapter.targets(self.model)
        try:
            linears = list(find_target_linears(self.model, targets))
        except UserError as e:
            raise UserError(f'[adapter "{cfg.name}"] target_modules: {e}') from None
        try:
            adapter.attach(self.model, self.layout, linears, init_seed=seed, device=self.device)
            if cfg.init_from and not restoring:
                _config, state, _meta = read_adapter_folder(cfg.init_from)
                load_adapter_state(self.model, cfg.name, state, source=cfg.init_from)
            job = Job(cfg, data, adapter, adapter.param_groups(self.model), seed,
                      sorted(targets), from_config=from_config)
        except BaseException:
            adapter.detach(self.model)    # a job is added whole or not at all
            raise
        self.jobs[cfg.name] = job
        self.emit("job_added", job=cfg.name, adapter=asdict(cfg), total_steps=job.total_steps,
                  train_examples=len(data.train), val_examples=len(data.val),
                  targets=job.targets, variant=job.variant, **(sweep or {}))
        self._set_state(job, QUEUED)
        return job

    def fork(self, name: str, new: str, changes: dict | None = None) -> Job:
        """Job ``name``'s state at this step as a new job ``new``, ``changes`` applied from
        here on (engine/train/fork.py)."""
        return fork_job(self, name, new, changes or {})

    def request_stop(self) -> None:
        """Stop after the current step (safe to call from a signal handler)."""
        self._stop_requested = True

    def _schedule(self) -> list[Job]:
        """Running jobs for the next step; queued jobs start while slots and memory allow
        (engine/train/admission.py)."""
        limit = self.config.train.train_lora_simultaneously_num
        for job in list(self.jobs.values()):
            if job.state in (QUEUED, RUNNING) and job.step >= job.total_steps:
                self._finish(job)          # trained, but its adapter is not saved yet
        running = [j for j in self.jobs.values() if j.state == RUNNING]
        for job, waiting in self.admission.admit(self.jobs.values(), running):
            if waiting is not None:
                if job.reason != waiting:
                    self._set_state(job, QUEUED, waiting)
                continue
            self._set_state(job, RUNNING)
            job.started()
            running.append(job)
        return running[:limit]

    def estimate_peak_bytes(self, jobs: list[Job]) -> int | None:
        """The estimated peak memory of a step of ``jobs`` (engine/core/memory.py); None if the
        model's shape is beyond the estimator."""
        return self.admission.estimate_peak_bytes(jobs)

    # -- control: called between steps, by the thread that runs the engine ------------------

    def job(self, name: str) -> Job:
        if name not in self.jobs:
            known = ", ".join(self.jobs) or "none"
            raise UserError(f"no job named {name!r} (jobs: {known})")
        return self.jobs[name]

    def pause(self, name: str, reason: str = "paused by user") -> None:
        """Take a job out of the batch; its accumulated gradients wait for its return."""
        job = self.job(name)
        if job.state not in (RUNNING, QUEUED):
            raise UserError(f"job {name!r} is {job.state}; only running or queued jobs pause")
        self._set_state(job, PAUSED, reason)

    def resume(self, name: str) -> None:
        job = self.job(name)
        if job.state == PRUNED:
            raise UserError(f"job {name!r} was pruned ({job.reason}); a pruned trial does not "
                            "resume (fork it to train it on: mlora jobs fork)")
        if job.state != PAUSED:
            raise UserError(f"job {name!r} is {job.state}; only paused jobs resume")
        self._set_state(job, QUEUED, "resumed")

    def cancel(self, name: str, reason: str = "cancelled by user") -> None:
        """End a job for good; its adapter leaves the model (checkpoints already saved stay)."""
        job = self.job(name)
        if job.finished:
            raise UserError(f"job {name!r} is already {job.state}")
        detach_adapter(self.model, name)
        job.optimizer.zero_grad(set_to_none=True)
        self._set_state(job, CANCELLED, reason)

    def _fail(self, job: Job, reason: str) -> None:
        """End one job with its reason; the others go on (its adapter stays in the model)."""
        job.optimizer.zero_grad(set_to_none=True)
        self._set_state(job, FAILED, reason)

    def status(self) -> dict:
        """The model and every job, as the protocol's ``status`` reply carries them."""
        return {"model": dict(self.model_info), "output_dir": str(self.output_dir),
                "jobs": [job.summary() for job in self.jobs.values()]}

    def save_now(self, name: str | None = None) -> list[Path]:
        """Checkpoint every job now; returns the folders of ``name`` (or of every unfinished
        job) inside it."""
        jobs = [self.job(name)] if name else [j for j in self.jobs.values() if not j.finished]
        path = self.save_checkpoint()
        if path is None:
            raise UserError("the checkpoint could not be written (see the engine's log)")
        return [path / j.name for j in jobs if j.state != CANCELLED]

    def run(self, max_steps: int | None = None,
            poll: Callable[[bool], None] | None = None) -> dict[str, Job]:
        """Train until every job is finished (or ``max_steps`` batched steps, or a stop).

        ``poll(wait)`` runs before every step to apply outside commands (pause, add, ...);
        with ``wait`` True nothing can train and it should block briefly for a command.
        Without ``poll`` the run ends when no job can train; with it, paused jobs keep the
        engine waiting. A run that ends with jobs unfinished writes a checkpoint.
        """
        steps = 0
        try:
            self.evals.score_base()        # the base model's scores, to compare with
            self.sweeps.fill()             # the first trials join the first step
            while not self._stop_requested and (max_steps is None or steps < max_steps):
                if poll is not None:
                    poll(False)
                    self.evals.run_requested()
                    self.playground.advance()      # a slice of each open generation
                    if self._stop_requested:
                        break
                self.sweeps.fill()                 # trials take the slots that came free
                jobs = self._schedule()
                if not jobs:
                    waiting = any(j.state == PAUSED for j in self.jobs.values())
                    if poll is not None and (waiting or self.playground.active):
                        poll(not self.playground.active)
                        self.evals.run_requested()
                        continue
                    break
                self.step(jobs)
                steps += 1
            self.evals.run_requested()   # asked for before the last step boundary
            unfinished = [j for j in self.jobs.values()
                          if j.state in (RUNNING, PAUSED, QUEUED) and j.micro_batches_drawn]
            if unfinished and self._checkpointed_step != self.engine_step:
                self.save_checkpoint()
            if self._stop_requested:
                self.log("stopped on request; checkpoint saved" if unfinished
                         else "stopped on request")
        finally:
            self.playground.close_all("the engine stopped before the answer was done")
            self.emit("run_end", jobs={j.name: {"state": j.state, "step": j.step,
                                               "total_steps": j.total_steps}
                                       for j in self.jobs.values()})
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
        return self.jobs

    # -- the step -----------------------------------------------------------------------

    def step(self, jobs: list[Job]) -> None:
        """One batched step: a micro-batch of each job in ``jobs``, forward and backward
        (in one pass, or a few where that cuts padding or the token budget asks), then
        each job whose accumulation is complete steps its optimizer.

        Faults stay in their job: a job whose examples cannot be read fails; a non-finite
        loss or gradient pauses its job with the step not applied; a pass that runs out of
        memory is retried one job at a time, and a job that does not fit alone pauses.
        """
        clock = StepClock(self.device)
        micro = self._draw(jobs)
        clock.lap("data")
        losses, totals = self._run_passes(self._plan(micro), clock)
        self.engine_step += 1
        stepped = self._optimizer_steps(micro, losses)
        clock.lap("optimizer")
        save = self._after_steps(stepped)
        clock.lap("events")        # step events, and evaluating and saving finished jobs
        if save:
            self.save_checkpoint()
            clock.lap("checkpoint")
        self.emit("batch", jobs=[job.name for job in jobs], rows=totals.rows,
                  tokens=totals.tokens, padding=totals.padding, passes=totals.passes,
                  packed=totals.packed, seconds=clock.laps)

    def _draw(self, jobs: list[Job]) -> list[MicroBatch]:
        """The next micro-batch of each job; a job whose examples cannot be read fails."""
        micro = []
        for job in jobs:
            try:
                indices = job.next_micro_batch()
                micro.append(MicroBatch(job, indices, [job.data.train[i] for i in indices]))
            except Exception as exc:  # noqa: BLE001 - whatever it is, it is this job's alone
                self._fail(job, f"cannot read its next examples: {exc}")
        return micro

    def _plan(self, micro: list[MicroBatch]) -> list[Pass]:
        """The step's passes (engine/train/planning.py); after an out-of-memory error, one
        pass per job."""
        if self._split_passes:
            return [Pass(self.packing, [item]) for item in micro]
        return plan_step(micro, self.packing, self.config.train.max_tokens_per_step,
                         self.pass_overhead)

    def _run_passes(self, passes: list[Pass],
                    clock: StepClock) -> tuple[dict[str, float], StepTotals]:
        """Every pass forward and backward: each job's micro-batch loss, by job name, and
        the passes' sizes. A pass out of memory is retried one job at a time."""
        losses: dict[str, float] = {}
        totals = StepTotals()
        while passes:
            pass_ = passes.pop(0)
            try:
                result = self.passes.forward_backward(pass_, clock)
            except torch.OutOfMemoryError:
                for item in pass_.items:   # MixLoRA: the pass's partial router statistics
                    item.job.adapter.discard_pass()
                self._free_memory()
                passes = self._out_of_memory(pass_) + passes
                continue
            losses.update(result.losses)
            totals.add(result, pass_.packed)
        return losses, totals

    def _out_of_memory(self, pass_: Pass) -> list[Pass]:
        """The passes that retry a pass that ran out of memory: one per job, from now on;
        none for a single job, which goes back unread and pauses."""
        if len(pass_.items) > 1:
            self._split_passes = True
            self.log(f"step {self.engine_step + 1}: out of memory with "
                     f"{len(pass_.items)} jobs in one pass; running one pass per job "
                     "(lower max_tokens_per_step to choose the size)", level="warning")
            return [Pass(pass_.packed, [item]) for item in pass_.items]
        item = pass_.items[0]
        item.job.unread(item.indices)
        self._set_state(item.job, PAUSED, "out of memory: its micro-batch does not fit "
                        "even alone; lower micro_batch_size or cutoff_len, then resume it")
        return []

    def _optimizer_steps(self, micro: list[MicroBatch],
                         losses: dict[str, float]) -> list[tuple[Job, dict]]:
        """Each job whose accumulation is complete steps its optimizer; a non-finite loss
        or gradient skips the step and pauses the job. Returns (job, its step's metrics)."""
        stepped = []
        for job in (item.job for item in micro):
            if job.name not in losses:
                continue
            loss = losses[job.name]
            if not math.isfinite(loss):
                self._skip(job, f"non-finite loss ({loss}) at step {job.step + 1}")
                continue
            if not job.accumulation_complete:
                continue
            norm = job.grad_norm()
            if not math.isfinite(norm):
                self._skip(job, f"non-finite gradient (norm {norm}) at step {job.step + 1}")
                continue
            stepped.append((job, job.optimizer_step(norm)))
        return stepped

    def _after_steps(self, stepped: list[tuple[Job, dict]]) -> bool:
        """The step events; the jobs due are evaluated, in one batch (engine/train/evals.py);
        jobs at their last step save. Returns whether a job reached ``save_step``, so that
        a checkpoint is due."""
        save = False
        for job, metrics in stepped:
            self.emit("step", job=job.name, **metrics)
            for kind, fields in job.adapter.step_events():   # MixLoRA: tokens per expert
                self.emit(kind, job=job.name, step=job.step, **fields)
        finished = self.evals.after_step([job for job, _ in stepped])
        for job, _ in stepped:
            if job in finished:
                self._finish(job, evaluated=True)
            elif job.step % self.config.train.save_step == 0:
                save = True
        return save

    def _skip(self, job: Job, what: str) -> None:
        job.skip_step()
        self._set_state(job, PAUSED, f"{what}: the step was not applied. Lower lr or check "
                        "the data, then resume or cancel the job")

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def evaluate(self, job: Job) -> float | None:
        """Mean loss per target token on the job's validation rows (no dropout)."""
        return self.passes.evaluate(job, self.packing)

    # -- saving -------------------------------------------------------------------------

    def adapter_dir(self, job: Job) -> Path:
        return self.output_dir / job.name

    def _adapter_files(self, job: Job) -> dict:
        cfg = job.cfg
        config = peft_config(r=cfg.r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                             target_modules=job.targets, use_rslora=cfg.use_rslora,
                             use_dora=cfg.use_dora, base_model=self.model_info["base_model"])
        config.update(job.adapter.config_fields())  # MixLoRA: peft_type MIXLORA, its fields
        meta = {"adapter": asdict(cfg), "step": job.step, "total_steps": job.total_steps,
                "base_model": self.config.model.base_model, "dtype": self.config.model.dtype,
                "quantize": self.config.model.quantize,
                "prompt": cfg.prompt}
        return adapter_files(self.model, job.name, config, meta)

    def save_checkpoint(self) -> Path | None:
        """Every job's whole state at this step as checkpoints/step-K, written atomically.

        Returns the folder, or None when it could not be written (a full or read-only disk,
        say): that is logged as an error, the previous checkpoint stays whole, and training
        goes on. The oldest checkpoints beyond ``save_total_limit`` are removed.
        """
        path = ckpt.checkpoints_dir(self.output_dir) / f"step-{self.engine_step}"
        files = checkpoint_files(self.engine_step, self.config, self.packing,
                                 self.jobs.values(), self._adapter_files, self.device,
                                 sweeps=self.sweeps.state())
        try:
            write_folder_atomically(path, files)
        except OSError as exc:
            self.log(f"checkpoint of step {self.engine_step} failed: {path}: "
                     f"{exc.strerror or exc}. The previous checkpoint is whole; training "
                     "goes on", level="error")
            return None
        self._checkpointed_step = self.engine_step
        for job in self.jobs.values():
            if job.state in (RUNNING, PAUSED, QUEUED) and job.micro_batches_drawn:
                self.emit("checkpoint", job=job.name, step=job.step,
                          engine_step=self.engine_step, path=str(path / job.name))
        ckpt.prune(self.output_dir, self.config.train.save_total_limit)
        return path

    def _restore(self, path: Path, manifest: dict) -> None:
        """Every job of the checkpoint, exactly where it was (engine/train/resume.py)."""
        check_layout(path, manifest, self.packing)
        configs = {cfg.name: cfg for cfg in self.config.adapters}
        for saved in manifest["jobs"]:
            cfg = configs.get(saved["name"]) or AdapterConfig(**saved["adapter"])
            job = self.add_job(cfg, from_config=saved["from_config"], restoring=True)
            check_data(path, job, saved)
            position = saved["position"]
            if position["state"] == CANCELLED:
                detach_adapter(self.model, job.name)
            else:
                load_job_state(self.model, job, path / job.name, self.device)
            job.restore_position(position)
            self._set_state(job, job.state, job.reason)
        self.sweeps.restore(manifest.get("sweeps") or {})
        restore_rng(path, self.device)
        self.engine_step = manifest["engine_step"]
        self.emit("resumed", path=str(path), engine_step=self.engine_step,
                  jobs={job.name: job.step for job in self.jobs.values()})

    def request_evaluation(self, name: str) -> dict:
        """Evaluate a job at the next step boundary (the ``evaluate`` request)."""
        return self.evals.request(name)

    def _finish(self, job: Job, evaluated: bool = False) -> None:
        if not evaluated:     # its validation loss and eval_tasks, after its last step
            self.evals.evaluate([job])
        path = self.adapter_dir(job)
        try:
            write_files_atomically(path, self._adapter_files(job))
        except OSError as exc:
            self._set_state(job, PAUSED, f"trained, but its adapter could not be saved to "
                            f"{path} ({exc.strerror or exc}); free the space or fix the "
                            "folder, then resume the job to save it")
            return
        self.emit("adapter_saved", job=job.name, step=job.step, path=str(path))
        self._set_state(job, DONE)
