"""One job: one adapter being trained, with its data order, optimizer, schedule and progress.

A job knows nothing of the other jobs in the batch: the engine (engine/train/engine.py)
draws a micro-batch from each, and each job steps its own optimizer when its gradient
accumulation is complete. ``position`` and ``restore_position`` carry everything but its
tensors through a checkpoint (engine/train/resume.py).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict

import torch

from engine.core import checkpoints as ckpt
from engine.core.config import AdapterConfig
from engine.core.data import JobData
from engine.core.errors import UserError
from engine.core.jobs import FINAL_STATES, QUEUED
from engine.train.lora import mix_seed
from engine.train.schedules import make_scheduler
from engine.train.variants import Variant


class Job:
    """One adapter being trained: its data, weights, optimizer, schedule and progress."""

    def __init__(self, cfg: AdapterConfig, data: JobData, adapter: Variant,
                 params: dict[str, list], seed: int, targets: list[str],
                 from_config: bool = True):
        self.cfg = cfg
        self.adapter = adapter   # its variant: what the step asks of its kind of adapter
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
        self.scores: dict[str, dict] = {}   # {[[eval]] task: its metrics}, the latest of each
        # Counts micro-batches drawn: with the seed it names each micro-batch's dropout masks.
        self.micro_batches_drawn = 0
        self.parameters = params["A"] + params["B"] + params["magnitude"]
        self.optimizer = self._make_optimizer(params)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.total_steps)

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
            self._batch_targets = sum(self.data.train[i].num_targets for i in batch)
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
        return self.adapter.label()

    def summary(self) -> dict:
        """What a client shows of this job (protocol ``status``)."""
        last = self.last_metrics
        return {"name": self.name, "state": self.state, "reason": self.reason,
                "step": self.step, "total_steps": self.total_steps,
                "epoch": self.epoch_progress(), "variant": self.variant, "r": self.cfg.r,
                "loss": last.get("loss"), "eval_loss": self.eval_loss, "scores": self.scores,
                "lr": last.get("lr"),
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
                "eval_loss": self.eval_loss, "scores": self.scores,
                "step_seconds": self._step_seconds}

    def restore_position(self, saved: dict) -> None:
        self.state, self.reason = saved["state"], saved["reason"]
        self.step, self.epoch = saved["step"], saved["epoch"]
        self._batches, self._pending = saved["batches"], saved["pending"]
        self._batch_targets, self._loss_sum = saved["batch_targets"], saved["loss_sum"]
        self._tokens = saved["tokens"]
        self.micro_batches_drawn = saved["micro_batches_drawn"]
        self.history, self.last_metrics = saved["history"], saved["last_metrics"]
        self.eval_loss, self._step_seconds = saved["eval_loss"], saved["step_seconds"]
        self.scores = saved.get("scores", {})     # checkpoints from before evaluation tasks

    def epoch_progress(self) -> float:
        per_epoch = self.data.steps_per_epoch
        return round(self.step / per_epoch, 3) if per_epoch else 0.0
