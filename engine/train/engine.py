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
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from safetensors.torch import load_file

from engine.core import checkpoints as ckpt
from engine.train.adapters import (adapter_files, adapter_modules, attach_adapter, detach_adapter,
                             load_adapter_state, peft_config, read_adapter_folder,
                             write_files_atomically, write_folder_atomically)
from engine.core.config import AdapterConfig, RunConfig
from engine.core.data import JobData
from engine.core.errors import ConfigError, UserError
from engine.core.events import EventWriter, restore_file
from engine.core.outputs import write_run_record
from engine.train.lora import BatchLayout, Segment, mix_seed
from engine.train.mixlora import (attach_mixlora, discard_router_batch, extend_param_groups,
                            is_mixlora, mixlora_peft_fields, mixlora_targets,
                            prepare_router_batch, router_losses, take_router_stats)
from engine.train.loss import chunked_head_loss
from engine.train.packing import pack, packed_pass, packing_problem
from engine.train.models import (default_targets, enable_gradient_checkpointing,
                           find_target_linears, hidden_states_and_head, load_base_model,
                           select_device)
from engine.core.prompts import load_template

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
                 targets: list[str], from_config: bool = True):
        self.cfg = cfg
        self.name = cfg.name
        self.data = data
        # False for jobs added to a running engine: a resume restores them from the
        # checkpoint rather than expecting them in the config.
        self.from_config = from_config
        self.data_fingerprint = ckpt.data_fingerprint(data.train, data.val)
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

    def unread(self, indices: list[int]) -> None:
        """Put back the micro-batch just drawn: the next draw returns it, with its masks."""
        self._pending.insert(0, indices)
        self.micro_batches_drawn -= 1

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

    def grad_norm(self) -> float:
        """The L2 norm of this job's accumulated gradients (inf or nan if any is)."""
        grads = [p.grad for p in self.parameters if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def _advance(self) -> None:
        self.step += 1
        if not self._batches and self.step < self.total_steps:
            self.epoch += 1

    def skip_step(self) -> None:
        """Drop this optimizer step (a non-finite loss or gradient): nothing is applied.

        The step's examples count as seen and the schedule moves on, so the job's data order
        and learning rates stay where an applied step would have left them.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self._pending = []
        with warnings.catch_warnings():   # "scheduler.step() before optimizer.step()": meant
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self._advance()
        self._step_started = time.monotonic()

    def optimizer_step(self, grad_norm: float | None = None) -> dict:
        """Clip, step and schedule; returns this step's metrics."""
        if grad_norm is None:
            grad_norm = self.grad_norm()
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(
                self.parameters, self.cfg.max_grad_norm,
                torch.tensor(grad_norm, device=self.parameters[0].device))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._advance()
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
        if cfg.routing_strategy:
            return cfg.routing_strategy
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

    # -- resume ---------------------------------------------------------------------------

    def position(self) -> dict:
        """Everything but tensors a resumed job needs to go on exactly where it was."""
        return {"state": self.state, "reason": self.reason, "step": self.step,
                "epoch": self.epoch, "batches": self._batches, "pending": self._pending,
                "batch_targets": self._batch_targets, "loss_sum": self._loss_sum,
                "tokens": self._tokens, "micro_batches_drawn": self.micro_batches_drawn,
                "history": self.history, "last_metrics": self.last_metrics,
                "eval_loss": self.eval_loss, "step_seconds": self._step_seconds}

    def restore_position(self, saved: dict) -> None:
        self.state, self.reason = saved["state"], saved["reason"]
        self.step, self.epoch = saved["step"], saved["epoch"]
        self._batches, self._pending = saved["batches"], saved["pending"]
        self._batch_targets, self._loss_sum = saved["batch_targets"], saved["loss_sum"]
        self._tokens = saved["tokens"]
        self.micro_batches_drawn = saved["micro_batches_drawn"]
        self.history, self.last_metrics = saved["history"], saved["last_metrics"]
        self.eval_loss, self._step_seconds = saved["eval_loss"], saved["step_seconds"]

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
    """Wall time of a step's phases (synchronising the GPU at each boundary, if any).

    A phase that runs several times in a step (a step of several passes) adds up.
    """

    def __init__(self, device: torch.device):
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.laps[phase] = round(self.laps.get(phase, 0.0) + now - self._last, 6)
        self._last = now


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# A forward pass costs about as much as this many more tokens would (launches, Python,
# smaller matrix products): a step splits into passes only where that saves more padding.
# On a CPU a pass is nearly free beside its arithmetic (measured on SmolLM2-135M, fp32, 4
# jobs: 16 gave 1.06-1.12x the tokens/s of one pass, 256 no gain; one pass per row was
# 0.7x); on a GPU small passes are launch-bound (H200, TinyLlama-1.1B: about 0.15 s a
# pass, some 700 tokens' worth).
PASS_OVERHEAD_TOKENS = {"cpu": 16, "cuda": 1024}
DEFAULT_PASS_OVERHEAD = 256


def plan_passes(widths: list[tuple[int, int]], max_tokens: int = 0,
                overhead: int = DEFAULT_PASS_OVERHEAD) -> list[list[int]]:
    """Group micro-batches into forward passes with little padding.

    ``widths[i]`` is micro-batch i's (rows, padded length). A pass holds micro-batches of
    similar lengths (contiguous in length order) and costs rows x its longest length plus
    ``overhead``; the plan with the least total cost wins, keeping each pass within
    ``max_tokens`` where a single micro-batch allows. Returns index groups, each in the
    order given, groups ordered by their first index.
    """
    order = sorted(range(len(widths)), key=lambda i: (widths[i][1], i))
    n = len(order)
    best = [0.0] + [math.inf] * n        # best[k]: least cost of the first k in length order
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        rows = 0
        for start in range(end - 1, -1, -1):
            rows += widths[order[start]][0]
            tokens = rows * widths[order[end - 1]][1]
            if max_tokens and tokens > max_tokens and end - start > 1:
                break
            cost = best[start] + tokens + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], n
    while end > 0:
        groups.append(sorted(order[cut[end]:end]))
        end = cut[end]
    return sorted(groups)


def _count_targets(labels: list[int]) -> int:
    # Position 0 is never predicted: the loss uses labels shifted by one.
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


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
        self._stop_requested = False
        self.engine_step = 0           # batched steps taken; a resumed engine counts on
        self._split_passes = False     # after running out of memory: one pass per job
        self._checkpointed_step: int | None = None  # the step of the newest checkpoint
        checkpoint = ckpt.latest_checkpoint(self.output_dir) if resume else None
        manifest = ckpt.read_manifest(checkpoint) if checkpoint is not None else None
        if manifest is not None:
            self._check_resumable(checkpoint, manifest)
        self.device = select_device()
        # see plan_passes; tests set it to force one pass
        self.pass_overhead = PASS_OVERHEAD_TOKENS.get(self.device.type, DEFAULT_PASS_OVERHEAD)
        self.model, self.tokenizer, self.model_info = load_base_model(
            config.model, self.device, log=self.log)
        self.decoder, self.lm_head, self.softcap = hidden_states_and_head(self.model)
        if config.train.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.layout = BatchLayout()
        self.packing = self._packing_choice()
        self.model_info["packing"] = self.packing
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

    # -- jobs ---------------------------------------------------------------------------

    def add_job(self, cfg: AdapterConfig, from_config: bool = True,
                restoring: bool = False) -> Job:
        """Build a job's data and adapter; it starts queued.

        ``from_config`` False marks a job added to a running engine; ``restoring`` skips
        ``init_from`` (a checkpoint's weights replace the initial ones).
        """
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
        targets = mixlora_targets(self.model, cfg, targets)  # MixLoRA: + feed-forward defaults
        try:
            linears = list(find_target_linears(self.model, targets))
        except UserError as e:
            raise UserError(f'[adapter "{cfg.name}"] target_modules: {e}') from None
        try:
            # MixLoRA hook: experts and routers take the feed-forward linears; the rest LoRA.
            linears = attach_mixlora(self.model, self.layout, cfg, linears, init_seed=seed,
                                     device=self.device)
            attach_adapter(self.model, self.layout, cfg.name, linears, r=cfg.r,
                           alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, init_seed=seed,
                           device=self.device)
            if cfg.init_from and not restoring:
                _config, state, _meta = read_adapter_folder(cfg.init_from)
                load_adapter_state(self.model, cfg.name, state, source=cfg.init_from)
            params = self._param_groups(cfg.name)
            extend_param_groups(self.model, cfg.name, params)  # MixLoRA: routers, experts
            job = Job(cfg, data, params, seed, sorted(targets), from_config=from_config)
        except BaseException:
            detach_adapter(self.model, cfg.name)    # a job is added whole or not at all
            raise
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
        for job in list(self.jobs.values()):
            if job.state in (QUEUED, RUNNING) and job.step >= job.total_steps:
                self._finish(job)          # trained, but its adapter is not saved yet
        running = [j for j in self.jobs.values() if j.state == RUNNING]
        for job in self.jobs.values():
            if len(running) >= limit:
                break
            if job.state == QUEUED:
                waiting = self._memory_wait(running, job)
                if waiting is not None:
                    if job.reason != waiting:
                        self._set_state(job, QUEUED, waiting)
                    continue
                self._set_state(job, RUNNING)
                job.started()
                running.append(job)
        return running[:limit]

    # -- admission control ------------------------------------------------------------------

    def memory_budget(self) -> int | None:
        """Bytes a step may take: ``memory_limit_gb``, else 90% of the GPU; None: no limit."""
        if self.config.train.memory_limit_gb > 0:
            return int(self.config.train.memory_limit_gb * 2**30)
        if self.device.type == "cuda":
            return int(0.9 * torch.cuda.get_device_properties(self.device).total_memory)
        return None

    def estimate_peak_bytes(self, jobs: list[Job]) -> int | None:
        """The estimated peak memory of a step of ``jobs`` (engine/core/memory.py); None if the
        model's shape is beyond the estimator."""
        from engine.core.memory import JobLoad, estimate_peak_bytes
        loads = [JobLoad(rows=j.cfg.micro_batch_size,
                         seq_len=max((len(e.input_ids) for e in j.data.train), default=1),
                         r=j.cfg.r, target_modules=j.targets, lora_dropout=j.cfg.lora_dropout,
                         optimizer="adamw" if j.cfg.optim == "adamw"
                         else "sgd" if j.cfg.momentum else "sgd0")
                 for j in jobs]
        try:
            return estimate_peak_bytes(
                self.model.config, loads, dtype=self.config.model.dtype,
                device=self.device.type,
                gradient_checkpointing=self.config.train.gradient_checkpointing,
                attn_impl="eager" if self.model_info.get("attn_impl") == "eager" else "sdpa",
                packed=self.packing)
        except (TypeError, ValueError, KeyError, AttributeError):
            return None

    def _memory_wait(self, running: list[Job], job: Job) -> str | None:
        """Why ``job`` must wait for memory, or None when it may start now.

        A job starts when no job runs, whatever the estimate: then only running out of
        memory for real (which pauses it) can tell.
        """
        budget = self.memory_budget()
        if budget is None or not running:
            return None
        need = self.estimate_peak_bytes(running + [job])
        if need is None or need <= budget:
            return None
        return (f"waiting for memory: a step with it and the {len(running)} running job(s) "
                f"needs about {need / 2**30:.2f} GiB, the limit is {budget / 2**30:.2f} GiB; "
                "it starts when a running job ends")

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
                          if j.state in (RUNNING, PAUSED, QUEUED) and j.micro_batches_drawn]
            if unfinished and self._checkpointed_step != self.engine_step:
                self.save_checkpoint()
            if self._stop_requested:
                self.log("stopped on request; checkpoint saved" if unfinished
                         else "stopped on request")
        finally:
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
        clock = _StepClock(self.device)
        micro = []
        for job in jobs:
            try:
                indices = job.next_micro_batch()
                micro.append((job, indices, [job.data.train[i] for i in indices]))
            except Exception as exc:  # noqa: BLE001 - whatever it is, it is this job's alone
                self._fail(job, f"cannot read its next examples: {exc}")
        clock.lap("data")
        groups = self._plan(micro)
        losses: dict[str, float] = {}
        totals = {"rows": 0, "tokens": 0, "cells": 0, "passes": 0, "packed": 0}
        while groups:
            packed, group = groups.pop(0)
            try:
                losses.update(self._forward_backward(packed, group, clock, totals))
            except torch.OutOfMemoryError:
                discard_router_batch(self.model)   # MixLoRA: the pass's partial statistics
                self._free_memory()
                if len(group) > 1:
                    self._split_passes = True
                    self.log(f"step {self.engine_step + 1}: out of memory with "
                             f"{len(group)} jobs in one pass; running one pass per job "
                             "(lower max_tokens_per_step to choose the size)", level="warning")
                    groups = [(packed, [item]) for item in group] + groups
                    continue
                job, indices, _examples = group[0]
                job.unread(indices)
                self._set_state(job, PAUSED, "out of memory: its micro-batch does not fit "
                                "even alone; lower micro_batch_size or cutoff_len, then "
                                "resume it")
        self.engine_step += 1

        stepped, metrics = [], {}
        for job, _indices, _examples in micro:
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
            metrics[job.name] = job.optimizer_step(norm)
            stepped.append(job)
        clock.lap("optimizer")
        save = False
        for job in stepped:
            self.emit("step", job=job.name, **metrics[job.name])
            router_stats = take_router_stats(self.model, job.name)  # MixLoRA: tokens per expert
            if router_stats is not None:
                self.emit("router", job=job.name, step=job.step, **router_stats)
            if job.step >= job.total_steps:
                self._finish(job)
            elif job.step % self.config.train.save_step == 0:
                save = True
        clock.lap("events")        # step events, and evaluating and saving finished jobs
        if save:
            self.save_checkpoint()
            clock.lap("checkpoint")
        cells = max(1, totals["cells"])
        self.emit("batch", jobs=[job.name for job in jobs], rows=totals["rows"],
                  tokens=totals["tokens"], padding=round(1 - totals["tokens"] / cells, 4),
                  passes=totals["passes"], packed=totals["packed"], seconds=clock.laps)

    def _plan(self, micro: list) -> list[tuple[bool, list]]:
        """The step's passes: (packed, micro-batches). With packing, every micro-batch in
        one packed pass, or in as many as ``max_tokens_per_step`` asks; without, padded
        passes of similar lengths (``plan_passes``). After an out-of-memory error, one
        pass per job."""
        if self._split_passes:
            return [(self.packing, [item]) for item in micro]
        budget = self.config.train.max_tokens_per_step
        if not self.packing:
            widths = [(len(examples), max(len(e.input_ids) for e in examples))
                      for _job, _indices, examples in micro]
            return [(False, [micro[i] for i in group])
                    for group in plan_passes(widths, budget, self.pass_overhead)]
        passes: list[tuple[bool, list]] = []
        current, tokens = [], 0
        for item in micro:
            size = sum(len(e.input_ids) for e in item[2])
            if current and budget and tokens + size > budget:
                passes.append((True, current))
                current, tokens = [], 0
            current.append(item)
            tokens += size
        if current:
            passes.append((True, current))
        return passes

    def _forward_backward(self, packed: bool, group: list, clock: _StepClock,
                          totals: dict) -> dict:
        """Forward and backward of one pass; each job's micro-batch loss, by job name.

        Gradients are computed first and added to the jobs' accumulated ones only when the
        whole pass succeeded, so a pass that fails (out of memory) leaves no trace.
        """
        examples = [example for _job, _indices, chunk in group for example in chunk]
        segments, start = [], 0
        for job, _indices, chunk in group:
            if packed:   # token ranges of the packed row; masks drawn per real token
                lengths = torch.tensor([len(e.input_ids) for e in chunk])
                size = int(lengths.sum())
                segments.append(Segment(
                    job.name, start, start + size, None, job.dropout_seed(),
                    token_rows=torch.arange(len(chunk)).repeat_interleave(lengths)
                    if is_mixlora(job.cfg) else None))
                start += size
            else:
                own_width = max(len(e.input_ids) for e in chunk)
                segments.append(Segment(job.name, start, start + len(chunk), own_width,
                                        job.dropout_seed()))
                start += len(chunk)
        inputs, labels, real, context = self._batch(examples, packed)
        # MixLoRA hook: token masks on its segments; record router losses in this forward.
        # First of anything on the device: a pass that fails after it (out of memory) is
        # the one whose router statistics are discarded.
        prepare_router_batch(self.model, segments, real, self.device)
        for seg in segments:
            if seg.token_rows is not None:
                seg.token_rows = seg.token_rows.to(self.device)
        inputs = self._on_device(inputs)
        self.layout.set_segments(segments, packed=packed)
        with context:   # packed attention for the forward and the backward's recomputation
            hidden = self.decoder(**inputs, use_cache=False).last_hidden_state
            router = router_losses(self.model)  # MixLoRA: {job: its router loss}
            job_losses, total = [], None
            for (job, _indices, _chunk), seg in zip(group, segments):
                own = slice(seg.start, seg.end)
                own = (slice(None), own) if packed else own   # positions, or rows
                loss_sum, _count = self._token_loss_sum(hidden[own], labels[own])
                job_loss = loss_sum / job.loss_normalizer()
                job_losses.append(job_loss)
                total = job_loss if total is None else total + job_loss
                if job.name in router:
                    # MixLoRA: the router loss weighs like each target token's loss, so it
                    # is normalised as the LM loss is (docs/mixlora.md); the reported loss
                    # is LM only.
                    total = total + router[job.name] * _count / job.loss_normalizer()
            clock.lap("forward")
            params = [p for job, _indices, _chunk in group for p in job.parameters]
            grads = (torch.autograd.grad(total, params, allow_unused=True)
                     if total is not None and total.requires_grad else [None] * len(params))
        for param, grad in zip(params, grads):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad.add_(grad)
        clock.lap("backward")
        losses = {}
        # One device-to-host copy for the pass's losses (one wait, not one per job).
        values = torch.stack([loss.detach().float() for loss in job_losses]).tolist()
        for (job, _indices, chunk), value in zip(group, values):
            if math.isfinite(value):
                job.record_micro_batch(value, sum(len(e.input_ids) for e in chunk))
            losses[job.name] = value
        totals["rows"] += len(examples)
        totals["tokens"] += int(real.sum())
        totals["cells"] += real.numel()
        totals["passes"] += 1
        totals["packed"] += int(packed)
        return losses

    def _skip(self, job: Job, what: str) -> None:
        job.skip_step()
        self._set_state(job, PAUSED, f"{what}: the step was not applied. Lower lr or check "
                        "the data, then resume or cancel the job")

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _collate(self, examples: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return collate(examples, self.tokenizer.pad_token_id)

    def _batch(self, examples: list, packed: bool):
        """(the decoder's inputs, labels, real-token mask, the context to run it in) of
        ``examples``, on the CPU: one packed row (attention per example inside the
        context), or right-padded rows."""
        if packed:
            row = pack(examples)
            inputs = {"input_ids": row.input_ids, "position_ids": row.position_ids,
                      "attention_mask": None}
            return (inputs, row.labels, row.input_ids.new_ones(row.input_ids.shape),
                    packed_pass(self.model, row.bounds))
        input_ids, labels, real = self._collate(examples)
        return ({"input_ids": input_ids, "attention_mask": real}, labels, real,
                contextlib.nullcontext())

    def _on_device(self, inputs: dict) -> dict:
        return {k: v.to(self.device) if v is not None else None for k, v in inputs.items()}

    def _token_loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor):
        """Summed cross-entropy over the target tokens of these rows, and their count.

        Only target positions go through the LM head, a chunk of tokens at a time, so
        full-vocabulary logits never exist for prompts, padding or other jobs' rows, nor for
        more than a chunk of tokens at once (engine/train/loss.py). ``labels`` stay on the CPU:
        the target positions are found there, so the device never waits for the host.
        """
        shifted = labels[:, 1:]
        rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
        # Position (row, col) predicts label (row, col + 1): its index in the flat rows.
        where = rows * hidden.shape[1] + cols
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(
            0, where.to(hidden.device, non_blocking=True))
        targets = shifted[rows, cols].to(hidden.device, non_blocking=True)
        return (chunked_head_loss(selected, self.lm_head, targets, self.softcap),
                int(where.numel()))

    @torch.no_grad()
    def evaluate(self, job: Job) -> float | None:
        """Mean loss per target token on the job's validation rows (no dropout)."""
        if not job.data.val:
            return None
        self.layout.set_single(job.name)
        total, count = 0.0, 0
        size = job.cfg.micro_batch_size
        for start in range(0, len(job.data.val), size):
            # Laid out as the jobs train (packed or padded).
            inputs, labels, _real, context = self._batch(job.data.val[start:start + size],
                                                         self.packing)
            with context:
                hidden = self.decoder(**self._on_device(inputs),
                                      use_cache=False).last_hidden_state
            loss_sum, n = self._token_loss_sum(hidden, labels)
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
        config.update(mixlora_peft_fields(cfg))  # MixLoRA: peft_type MIXLORA and its fields
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
        files: dict = {}
        jobs = []
        for job in self.jobs.values():
            jobs.append({"name": job.name, "adapter": asdict(job.cfg),
                         "from_config": job.from_config, "data_sha256": job.data_fingerprint,
                         "position": job.position()})
            if job.state == CANCELLED:
                continue           # its adapter left the model
            for name, content in self._adapter_files(job).items():
                files[f"{job.name}/{name}"] = content
            files[f"{job.name}/optimizer.pt"] = _torch_bytes(job.optimizer.state_dict())
            files[f"{job.name}/scheduler.pt"] = _torch_bytes(job.scheduler.state_dict())
            files[f"{job.name}/grads.safetensors"] = {
                str(i): p.grad.detach().cpu().contiguous()
                for i, p in enumerate(job.parameters) if p.grad is not None}
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        files["rng.pt"] = _torch_bytes(rng)
        manifest = {"format": ckpt.FORMAT, "engine_step": self.engine_step,
                    "model": asdict(self.config.model),
                    "train": self._resume_train_settings(),
                    "packed": self.packing,   # the layout decides the dropout masks
                    "jobs": jobs}
        files[ckpt.ENGINE_FILE] = (json.dumps(manifest, indent=1) + "\n").encode()
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

    def _resume_train_settings(self) -> dict:
        """The [train] settings a checkpoint records and a resume must keep."""
        return {k: getattr(self.config.train, k) for k in ckpt.RESUME_TRAIN_FIELDS}

    def _check_resumable(self, path: Path, manifest: dict) -> None:
        """Refuse a resume whose config changed what the checkpoint's jobs compute."""
        problems = []
        changes = ckpt.config_changes(manifest["model"], asdict(self.config.model))
        if changes:
            problems.append("[model] " + "; ".join(changes))
        changes = ckpt.config_changes(manifest["train"], self._resume_train_settings())
        if changes:
            problems.append("[train] " + "; ".join(changes))
        saved_jobs = {saved["name"]: saved for saved in manifest["jobs"]}
        for cfg in self.config.adapters:
            if cfg.name in saved_jobs:
                changes = ckpt.config_changes(saved_jobs[cfg.name]["adapter"], asdict(cfg),
                                              ckpt.RESUME_FREE_FIELDS)
                if changes:
                    problems.append(f'[[adapter]] "{cfg.name}": ' + "; ".join(changes))
        names = {cfg.name for cfg in self.config.adapters}
        for name, saved in saved_jobs.items():
            if saved["from_config"] and name not in names:
                problems.append(f'[[adapter]] "{name}" is in the checkpoint but no longer in '
                                "the config")
        if problems:
            raise UserError(f"cannot resume from {path}: the config changed since it was "
                            "written (settings: checkpoint -> now):\n  "
                            + "\n  ".join(problems)
                            + "\nPut those settings back to resume, or start a new run in "
                              "another output_dir.")

    def _restore(self, path: Path, manifest: dict) -> None:
        """Every job of the checkpoint, exactly where it was."""
        packed = manifest.get("packed")
        if packed is not None and packed != self.packing:
            # Packed and padded passes draw different dropout masks: the run would go on
            # with other masks than it started with. ("auto" packs on a CPU only.)
            raise ConfigError(
                f"cannot resume from {path}: it trained with sequence packing "
                f"{'on' if packed else 'off'}, and this run would train with it "
                f"{'on' if self.packing else 'off'}; set packing = "
                f"\"{'on' if packed else 'off'}\" to resume", table="train", field="packing")
        configs = {cfg.name: cfg for cfg in self.config.adapters}
        for saved in manifest["jobs"]:
            cfg = configs.get(saved["name"]) or AdapterConfig(**saved["adapter"])
            job = self.add_job(cfg, from_config=saved["from_config"], restoring=True)
            if job.data_fingerprint != saved["data_sha256"]:
                raise UserError(f"cannot resume from {path}: the training data of adapter "
                                f"{job.name!r} ({cfg.data}) changed since that checkpoint")
            position = saved["position"]
            if position["state"] == CANCELLED:
                detach_adapter(self.model, job.name)
            else:
                self._load_job(job, path / job.name)
            job.restore_position(position)
            self._set_state(job, job.state, job.reason)
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.engine_step = manifest["engine_step"]
        self.emit("resumed", path=str(path), engine_step=self.engine_step,
                  jobs={job.name: job.step for job in self.jobs.values()})

    def _load_job(self, job: Job, folder: Path) -> None:
        _config, state, _meta = read_adapter_folder(folder)
        load_adapter_state(self.model, job.name, state, source=str(folder))
        try:
            job.optimizer.load_state_dict(torch.load(folder / "optimizer.pt",
                                                     map_location=self.device,
                                                     weights_only=True))
            job.scheduler.load_state_dict(torch.load(folder / "scheduler.pt",
                                                     weights_only=True))
            grads = load_file(str(folder / "grads.safetensors"))
        except Exception as exc:  # noqa: BLE001 - torch and safetensors raise many kinds
            raise UserError(f"{folder}: cannot read this job's checkpoint ({exc})") from None
        for i, param in enumerate(job.parameters):
            grad = grads.get(str(i))
            param.grad = grad.to(param.device) if grad is not None else None

    def _finish(self, job: Job) -> None:
        try:
            eval_loss = self.evaluate(job)
        except torch.OutOfMemoryError:
            self._free_memory()
            eval_loss = None
            self.log(f"{job.name}: out of memory while evaluating; its adapter is saved "
                     "without an eval_loss (lower micro_batch_size to evaluate)",
                     level="warning")
        if eval_loss is not None:
            job.eval_loss = eval_loss
            self.emit("eval", job=job.name, step=job.step, eval_loss=eval_loss)
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
