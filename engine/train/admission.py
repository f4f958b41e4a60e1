"""Admission: which queued jobs may join the running ones, by slots and by memory.

A queued job starts while ``train_lora_simultaneously_num`` allows and the estimated peak
memory of a step with it and the running jobs (engine/core/memory.py) fits the budget:
``memory_limit_gb``, else 90% of the GPU. A job starts when no job runs, whatever the
estimate: then only running out of memory for real (which pauses it) can tell.
"""

from __future__ import annotations

from typing import Iterable

import torch

from engine.core.config import RunConfig
from engine.core.jobs import QUEUED
from engine.core.memory import JobLoad, estimate_peak_bytes
from engine.train.job import Job


class Admission:
    """Decides, between steps, which queued jobs start; the engine applies the decisions."""

    def __init__(self, config: RunConfig, model: torch.nn.Module, model_info: dict,
                 device: torch.device, packing: bool):
        self.config = config
        self.model = model
        self.model_info = model_info
        self.device = device
        self.packing = packing

    def memory_budget(self) -> int | None:
        """Bytes a step may take: ``memory_limit_gb``, else 90% of the GPU; None: no limit."""
        if self.config.train.memory_limit_gb > 0:
            return int(self.config.train.memory_limit_gb * 2**30)
        if self.device.type == "cuda":
            return int(0.9 * torch.cuda.get_device_properties(self.device).total_memory)
        return None

    def estimate_peak_bytes(self, jobs: list[Job]) -> int | None:
        """The estimated peak memory of a step of ``jobs``; None if the model's shape is
        beyond the estimator."""
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

    def memory_wait(self, running: list[Job], job: Job) -> str | None:
        """Why ``job`` must wait for memory, or None when it may start now."""
        budget = self.memory_budget()
        if budget is None or not running:
            return None
        need = self.estimate_peak_bytes(running + [job])
        if need is None or need <= budget:
            return None
        return (f"waiting for memory: a step with it and the {len(running)} running job(s) "
                f"needs about {need / 2**30:.2f} GiB, the limit is {budget / 2**30:.2f} GiB; "
                "it starts when a running job ends")

    def admit(self, jobs: Iterable[Job], running: list[Job]) -> list[tuple[Job, str | None]]:
        """For each queued job in order while slots are free: (job, None) if it starts,
        (job, why it waits) if not. Each decision counts the jobs started before it."""
        limit = self.config.train.train_lora_simultaneously_num
        running = list(running)
        decisions: list[tuple[Job, str | None]] = []
        for job in jobs:
            if len(running) >= limit:
                break
            if job.state == QUEUED:
                waiting = self.memory_wait(running, job)
                decisions.append((job, waiting))
                if waiting is None:
                    running.append(job)
        return decisions
