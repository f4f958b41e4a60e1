"""A job's learning-rate schedule: transformers' own, chosen by ``scheduler_type``.

``constant`` is transformers' ``constant`` without warm-up and ``constant_with_warmup``
with it (transformers' ``constant`` ignores warm-up); ``linear`` and ``cosine`` are
``linear`` and ``cosine`` with warm-up. Warm-up starts at rate 0: with 2 warm-up steps the
multipliers are 0, 0.5, then 1.
"""

from __future__ import annotations

import math

import torch
from transformers import (get_constant_schedule, get_constant_schedule_with_warmup,
                          get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup)

from engine.core.config import AdapterConfig

# Recorded in every checkpoint: a checkpoint whose schedules came from elsewhere (the
# hand-written ones before, with other warm-up rates) is refused by --resume.
SCHEDULE_SOURCE = "transformers"


def warmup_steps(cfg: AdapterConfig, total_steps: int) -> int:
    """``warmup_steps``, else ``warmup_ratio`` of the job's optimizer steps, rounded up."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return math.ceil(cfg.warmup_ratio * total_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: AdapterConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The scheduler of a job with ``total_steps`` optimizer steps."""
    warmup = warmup_steps(cfg, total_steps)
    if cfg.scheduler_type == "constant":
        if warmup == 0:
            return get_constant_schedule(optimizer)
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if cfg.scheduler_type == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
