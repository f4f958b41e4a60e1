"""The engine: jobs (one adapter each) trained together in one batched step.

Read ``Engine.step`` top to bottom to see a step: pick the running jobs, take one
micro-batch from each, concatenate them, run the base model once with every adapter on its
own rows, compute each job's loss from its own rows only, one backward, and let each job
whose gradient accumulation is complete clip and step its own optimizer.

Exactness: nothing in a job's arithmetic depends on the other jobs in the batch. Its loss is
the sum of token losses over its own target tokens divided by the number of target tokens
in its whole optimizer batch (so accumulation equals one big batch); its dropout masks come
from its own seed and micro-batch count; it has its own optimizer, scheduler and clipping.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from engine.adapters import (adapter_files, adapter_modules, attach_adapter, detach_adapter,
                             load_adapter_state, peft_config, read_adapter_folder,
                             write_files_atomically, write_folder_atomically)
from engine.config import AdapterConfig, RunConfig
from engine.data import JobData
from engine.errors import ConfigError, UserError
from engine.lora import BatchLayout, Segment, mix_seed
from engine.models import (default_targets, enable_gradient_checkpointing,
                           find_target_linears, hidden_states_and_head, load_base_model,
                           select_device)
from engine.prompts import load_template

IGNORE_INDEX = -100
EventSink = Callable[[dict], None]

QUEUED, RUNNING, PAUSED, DONE, FAILED, CANCELLED = (
    "queued", "running", "paused", "done", "failed", "cancelled")
FINAL_STATES = (DONE, FAILED, CANCELLED)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier at optimizer step ``step`` (HF's schedules)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


class Job:
    """One adapter being trained: its data, weights, optimizer, schedule and progress."""

    def __init__(self, cfg: AdapterConfig, data: JobData, params: dict[str, list], seed: int,
                 targets: list[str]):
        self.cfg = cfg
        self.name = cfg.name
        self.data = data
        self.seed = seed
        self.targets = targets
        self.state = QUEUED
        self.reason: str | None = None
        self.step = 0
        self.epoch = 0
        self.total_steps = data.total_steps(cfg.num_epochs)
        self._batches: list[list[int]] = []
        self._pending: list[list[int]] = []
        self._batch_targets = 0
        self._loss_sum = 0.0
        self._tokens = 0
        self._step_started = time.monotonic()
        self._step_seconds: float | None = None
        self.history: list[dict] = []
        self.last_metrics: dict = {}
        self.eval_loss: float | None = None
        # Counts micro-batches drawn: with the seed it names each micro-batch's dropout masks.
        self.micro_batches_drawn = 0
        self.parameters = params["A"] + params["B"] + params["magnitude"]
        self.optimizer = self._make_optimizer(params)
        warmup = (cfg.warmup_steps if cfg.warmup_steps is not None
                  else math.ceil(cfg.warmup_ratio * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.scheduler_type, warmup, self.total_steps))

    def _make_optimizer(self, params: dict[str, list]) -> torch.optim.Optimizer:
        cfg = self.cfg
        # LoRA+ (and PEFT's create_loraplus_optimizer): B and 1-D tensors learn ratio x faster.
        groups = [{"params": params["A"], "lr": cfg.lr},
                  {"params": params["B"] + params["magnitude"], "lr": cfg.lr * cfg.loraplus_lr_ratio}]
        groups = [g for g in groups if g["params"]]
        if cfg.optim == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def started(self) -> None:
        """The job enters the batch: its step timing (tokens/s, ETA) counts from now."""
        self._step_started = time.monotonic()

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def next_micro_batch(self) -> list[int]:
        """Indices of the examples of this job's next micro-batch."""
        if not self._pending:
            while not self._batches:
                self._batches = list(self.data.epoch_batches(self.epoch))
                if not self._batches:
                    raise UserError(f"adapter {self.name!r}: no training examples")
            batch = self._batches.pop(0)
            self._pending = list(self.data.micro_batches(batch, self.cfg.micro_batch_size))
            self._batch_targets = sum(_count_targets(self.data.train[i].labels) for i in batch)
            self._loss_sum = 0.0
            self._tokens = 0
        self.micro_batches_drawn += 1
        return self._pending.pop(0)

    def dropout_seed(self) -> int:
        """The seed of the current micro-batch's dropout masks."""
        return mix_seed(self.seed, self.micro_batches_drawn)

    @property
    def accumulation_complete(self) -> bool:
        return not self._pending

    def loss_normalizer(self) -> int:
        return max(1, self._batch_targets)

    def record_micro_batch(self, loss: float, tokens: int) -> None:
        self._loss_sum += loss
        self._tokens += tokens

    def optimizer_step(self) -> dict:
        """Clip, step and schedule; returns this step's metrics."""
        if self.cfg.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.cfg.max_grad_norm)
        else:
            grads = [p.grad for p in self.parameters if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if not self._batches and self.step < self.total_steps:
            self.epoch += 1
        now = time.monotonic()
        seconds = now - self._step_started
        self._step_started = now
        self._step_seconds = (seconds if self._step_seconds is None
                              else 0.8 * self._step_seconds + 0.2 * seconds)
        metrics = {
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.epoch_progress(),
            "loss": self._loss_sum,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": self._tokens,
            "tokens_per_s": self._tokens / seconds if seconds > 0 else 0.0,
            "eta_s": self._step_seconds * (self.total_steps - self.step),
        }
        self.history.append({"step": self.step, "loss": self._loss_sum})
        self.last_metrics = metrics
        return metrics

    @property
    def variant(self) -> str:
        cfg = self.cfg
        name = "dora" if cfg.use_dora else "rslora" if cfg.use_rslora else "lora"
        return name + ("+loraplus" if cfg.loraplus_lr_ratio != 1.0 else "")

    def summary(self) -> dict:
        """What a client shows of this job (protocol ``status``)."""
        last = self.last_metrics
        return {"name": self.name, "state": self.state, "reason": self.reason,
                "step": self.step, "total_steps": self.total_steps,
                "epoch": self.epoch_progress(), "variant": self.variant, "r": self.cfg.r,
                "loss": last.get("loss"), "eval_loss": self.eval_loss, "lr": last.get("lr"),
                "grad_norm": last.get("grad_norm"), "tokens_per_s": last.get("tokens_per_s"),
                "eta_s": last.get("eta_s"), "adapter": asdict(self.cfg)}

    def epoch_progress(self) -> float:
        per_epoch = self.data.steps_per_epoch
        return round(self.step / per_epoch, 3) if per_epoch else 0.0


def collate(examples: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, labels, attention_mask) of encoded examples, on the CPU."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    return ids, labels, attention


class _StepClock:
    """Wall time of a step's phases (synchronising the GPU at each boundary, if any)."""

    def __init__(self, device: torch.device):
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.laps[phase] = round(now - self._last, 6)
        self._last = now


def _count_targets(labels: list[int]) -> int:
    # Position 0 is never predicted: the loss uses labels shifted by one.
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


class Engine:
    """Holds the base model (loaded once) and the jobs; trains them in batched steps."""

    def __init__(self, config: RunConfig, on_event: EventSink | None = None,
                 write_metrics: bool = True):
        self.config = config
        self.on_event = on_event
        self.output_dir = Path(config.train.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = (open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8")
                         if write_metrics else None)
        self._stop_requested = False
        self.device = select_device()
        self.model, self.tokenizer, self.model_info = load_base_model(
            config.model, self.device, log=self.log)
        self.decoder, self.lm_head, self.softcap = hidden_states_and_head(self.model)
        if config.train.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.layout = BatchLayout()
        self.jobs: dict[str, Job] = {}
        self.emit("run_start", config=config.source, output_dir=str(self.output_dir),
                  **self.model_info)
        for adapter_cfg in config.adapters:
            self.add_job(adapter_cfg)

    # -- events -------------------------------------------------------------------------

    def emit(self, type_: str, **fields) -> dict:
        event = {"type": type_, "time": time.time(), **fields}
        if self._metrics is not None:
            self._metrics.write(json.dumps(event, default=str) + "\n")
            self._metrics.flush()
        if self.on_event is not None:
            self.on_event(event)
        return event

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)

    def _set_state(self, job: Job, state: str, reason: str | None = None) -> None:
        job.state, job.reason = state, reason
        self.emit("job_state", job=job.name, state=state, reason=reason, step=job.step,
                  total_steps=job.total_steps)

    # -- jobs ---------------------------------------------------------------------------

    def add_job(self, cfg: AdapterConfig) -> Job:
        """Build a job's data and adapter; it starts queued."""
        if cfg.name in self.jobs:
            raise ConfigError(f"an adapter named {cfg.name!r} already exists in this engine",
                              table=f'adapter "{cfg.name}"', field="name")
        seed = cfg.seed if cfg.seed is not None else self.config.train.seed
        template = load_template(cfg.prompt)
        data = JobData.from_config(cfg, self.tokenizer, template,
                                   default_cutoff_len=self.config.train.cutoff_len,
                                   default_seed=self.config.train.seed)
        for warning in data.warnings():
            self.log(warning, level="warning")
        targets = cfg.target_modules or default_targets(self.model)
        linears = list(find_target_linears(self.model, targets))
        attach_adapter(self.model, self.layout, cfg.name, linears, r=cfg.r,
                       alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                       use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, init_seed=seed,
                       device=self.device)
        if cfg.init_from:
            _config, state, _meta = read_adapter_folder(cfg.init_from)
            load_adapter_state(self.model, cfg.name, state, source=cfg.init_from)
        params = self._param_groups(cfg.name)
        job = Job(cfg, data, params, seed, sorted(targets))
        self.jobs[cfg.name] = job
        self.emit("job_added", job=cfg.name, adapter=asdict(cfg), total_steps=job.total_steps,
                  train_examples=len(data.train), val_examples=len(data.val),
                  targets=job.targets)
        self._set_state(job, QUEUED)
        return job

    def _param_groups(self, name: str) -> dict[str, list]:
        groups = {"A": [], "B": [], "magnitude": []}
        for adapter in adapter_modules(self.model, name).values():
            groups["A"].append(adapter.lora_A)
            groups["B"].append(adapter.lora_B)
            if adapter.magnitude is not None:
                groups["magnitude"].append(adapter.magnitude)
        return groups

    def request_stop(self) -> None:
        """Stop after the current step (safe to call from a signal handler)."""
        self._stop_requested = True

    def _schedule(self) -> list[Job]:
        """Running jobs for the next step; queued jobs start while slots are free."""
        limit = self.config.train.train_lora_simultaneously_num
        running = [j for j in self.jobs.values() if j.state == RUNNING]
        for job in self.jobs.values():
            if len(running) >= limit:
                break
            if job.state == QUEUED:
                self._set_state(job, RUNNING)
                job.started()
                running.append(job)
        return running[:limit]

    # -- the step -----------------------------------------------------------------------

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

    def status(self) -> dict:
        """The model and every job, as the protocol's ``status`` reply carries them."""
        return {"model": dict(self.model_info), "output_dir": str(self.output_dir),
                "jobs": [job.summary() for job in self.jobs.values()]}

    def save_now(self, name: str | None = None) -> list[Path]:
        """Checkpoint one job, or every unfinished job that has stepped."""
        jobs = [self.job(name)] if name else [j for j in self.jobs.values() if not j.finished]
        return [self.save_checkpoint(j) for j in jobs if j.step > 0 and not j.finished]

    def run(self, max_steps: int | None = None,
            poll: Callable[[bool], None] | None = None) -> dict[str, Job]:
        """Train until every job is finished (or ``max_steps`` batched steps, or a stop).

        ``poll(wait)`` runs before every step to apply outside commands (pause, add, ...);
        with ``wait`` True nothing can train and it should block briefly for a command.
        Without ``poll`` the run ends when no job can train; with it, paused jobs keep the
        engine waiting. Jobs left unfinished by a stop or by ``max_steps`` get a checkpoint.
        """
        steps = 0
        try:
            while not self._stop_requested and (max_steps is None or steps < max_steps):
                if poll is not None:
                    poll(False)
                    if self._stop_requested:
                        break
                jobs = self._schedule()
                if not jobs:
                    if poll is not None and any(j.state == PAUSED for j in self.jobs.values()):
                        poll(True)
                        continue
                    break
                self.step(jobs)
                steps += 1
            unfinished = [j for j in self.jobs.values()
                          if j.state in (RUNNING, PAUSED, QUEUED) and j.step > 0]
            for job in unfinished:
                self.save_checkpoint(job)
            if self._stop_requested:
                self.log("stopped on request; checkpoints saved" if unfinished
                         else "stopped on request")
        finally:
            self.emit("run_end", jobs={j.name: {"state": j.state, "step": j.step,
                                               "total_steps": j.total_steps}
                                       for j in self.jobs.values()})
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
        return self.jobs

    def step(self, jobs: list[Job]) -> None:
        """One batched forward/backward over a micro-batch of each job in ``jobs``."""
        clock = _StepClock(self.device)
        micro = [(job, job.next_micro_batch()) for job in jobs]
        input_ids, labels, attention = self._collate(
            [job.data.train[i] for job, indices in micro for i in indices])
        segments, start = [], 0
        for job, indices in micro:
            own_width = max(len(job.data.train[i].input_ids) for i in indices)
            segments.append(Segment(job.name, start, start + len(indices), own_width,
                                    job.dropout_seed()))
            start += len(indices)
        self.layout.set_segments(segments)

        input_ids, labels = input_ids.to(self.device), labels.to(self.device)
        clock.lap("data")
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention.to(self.device),
                              use_cache=False).last_hidden_state
        total = None
        for (job, _), seg in zip(micro, segments):
            loss_sum, _count = self._token_loss_sum(hidden[seg.start:seg.end],
                                                    labels[seg.start:seg.end])
            job_loss = loss_sum / job.loss_normalizer()
            total = job_loss if total is None else total + job_loss
            tokens = int(attention[seg.start:seg.end].sum())
            job.record_micro_batch(float(job_loss.detach()), tokens)
        clock.lap("forward")
        if total is not None and total.requires_grad:
            total.backward()
        clock.lap("backward")

        stepped = [job for job, _ in micro if job.accumulation_complete]
        metrics = {job.name: job.optimizer_step() for job in stepped}
        clock.lap("optimizer")
        real_tokens = int(attention.sum())
        self.emit("batch", jobs=[job.name for job in jobs], rows=int(attention.shape[0]),
                  tokens=real_tokens, padding=round(1 - real_tokens / attention.numel(), 4),
                  seconds=clock.laps)
        for job in stepped:
            self.emit("step", job=job.name, **metrics[job.name])
            if job.step % self.config.train.save_step == 0 and job.step < job.total_steps:
                self.save_checkpoint(job)
            if job.step >= job.total_steps:
                self._finish(job)

    def _collate(self, examples: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return collate(examples, self.tokenizer.pad_token_id)

    def _token_loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor):
        """Summed cross-entropy over the target tokens of these rows, and their count.

        Only target positions go through the LM head, so full-vocabulary logits exist for
        the job's target tokens alone, never for prompts, padding or other jobs' rows.
        """
        shifted = labels[:, 1:]
        mask = shifted != IGNORE_INDEX
        selected = hidden[:, :-1][mask]
        logits = self.lm_head(selected).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.cross_entropy(logits, shifted[mask], reduction="sum"), int(mask.sum())

    @torch.no_grad()
    def evaluate(self, job: Job) -> float | None:
        """Mean loss per target token on the job's validation rows (no dropout)."""
        if not job.data.val:
            return None
        self.layout.set_single(job.name)
        total, count = 0.0, 0
        size = job.cfg.micro_batch_size
        for start in range(0, len(job.data.val), size):
            ids, labels, attention = self._collate(job.data.val[start:start + size])
            hidden = self.decoder(input_ids=ids.to(self.device),
                                  attention_mask=attention.to(self.device),
                                  use_cache=False).last_hidden_state
            loss_sum, n = self._token_loss_sum(hidden, labels.to(self.device))
            total += float(loss_sum)
            count += n
        return total / count if count else None

    # -- saving -------------------------------------------------------------------------

    def adapter_dir(self, job: Job) -> Path:
        return self.output_dir / job.name

    def _adapter_files(self, job: Job) -> dict:
        cfg = job.cfg
        config = peft_config(r=cfg.r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                             target_modules=job.targets, use_rslora=cfg.use_rslora,
                             use_dora=cfg.use_dora, base_model=self.model_info["base_model"])
        meta = {"adapter": asdict(cfg), "step": job.step, "total_steps": job.total_steps,
                "base_model": self.config.model.base_model, "dtype": self.config.model.dtype,
                "quantize": self.config.model.quantize,
                "prompt": cfg.prompt}
        return adapter_files(self.model, job.name, config, meta)

    def save_checkpoint(self, job: Job) -> Path:
        """Adapter, optimizer and scheduler state under checkpoints/step-N, atomically."""
        files = self._adapter_files(job)
        for name, obj in (("optimizer.pt", job.optimizer.state_dict()),
                          ("scheduler.pt", job.scheduler.state_dict())):
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            files[name] = buffer.getvalue()
        files["trainer_state.json"] = json.dumps(
            {"step": job.step, "epoch": job.epoch, "history": job.history}).encode()
        path = self.adapter_dir(job) / "checkpoints" / f"step-{job.step}"
        write_folder_atomically(path, files)
        self.emit("checkpoint", job=job.name, step=job.step, path=str(path))
        return path

    def _finish(self, job: Job) -> None:
        eval_loss = self.evaluate(job)
        if eval_loss is not None:
            job.eval_loss = eval_loss
            self.emit("eval", job=job.name, step=job.step, eval_loss=eval_loss)
        path = self.adapter_dir(job)
        write_files_atomically(path, self._adapter_files(job))
        self.emit("adapter_saved", job=job.name, step=job.step, path=str(path))
        self._set_state(job, DONE)
