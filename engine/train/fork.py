"""Forking a job: a new job that starts from another's exact state at this step boundary.

``fork_job(engine, NAME, NEW, changes)`` runs between two steps (``Engine.fork``, the
protocol's ``fork`` request). NEW gets a copy of everything NAME's future depends on:

- its adapter weights (copied tensors, NEW's own parameters);
- its optimizer state (AdamW's moments and step counts, SGD's momentum buffers), deep-copied
  onto NEW's parameters; NEW's optimizer keeps its own hyperparameters (lr, weight_decay,
  momentum, LoRA+ ratio) from its own config;
- its accumulated gradients, when NAME is part-way through an optimizer batch (an engine
  step takes one micro-batch of each job, so a step boundary can fall inside an
  accumulation), with the micro-batches still pending and the batch's loss so far;
- its data position: epoch, the epoch's remaining batches, the pending micro-batches;
- its dropout seeds: a micro-batch's masks derive from (job seed, micro-batches drawn, layer),
  never from the job's name, so NEW gets NAME's seed and count and draws NAME's masks;
- its step, history and latest metrics (NEW's curves start with NAME's).

``changes`` may set the fields in ``CHANGEABLE``; they apply from the fork's step on, as if
they had been set from the start: NEW's scheduler is built from its own config (its own
total steps, warm-up, base rates) and stepped to NAME's step, so at each later step its
learning rate is the one a job configured that way from the start has there. Fields that
would make NAME's state meaningless for NEW (its shape, scaling, data, batching, optimizer
kind, seed) are refused with the reason. With no changes, NEW trains bit for bit as NAME.

NEW is an ordinary job added at runtime (``from_config`` False): checkpoints hold it with
its AdapterConfig, and it resumes like any other.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.core.config import MIXLORA_FIELDS, parse_adapter_tables
from engine.core.errors import UserError
from engine.core.jobs import PAUSED, PRUNED, QUEUED, RUNNING

if TYPE_CHECKING:
    from engine.train.engine import Engine
    from engine.train.job import Job

# Fields a fork may change: they act on future steps only.
CHANGEABLE = ("lr", "scheduler_type", "warmup_ratio", "warmup_steps", "max_grad_norm",
              "lora_dropout", "num_epochs", "eval_steps", "eval_tasks", "weight_decay",
              "momentum", "loraplus_lr_ratio")

_SHAPE = "the adapter's shape would change, so its weights and optimizer state cannot carry over"
_SCALE = "the adapter's scaling would change, so its trained weights would mean something else"
_DATA = "the job's data and its position in it would change, so NAME's data position cannot carry over"
# Fields a fork may not change, with the reason.
REFUSED = {
    "name": "the new job's name is given by --as (the \"as\" parameter)",
    "r": _SHAPE, "target_modules": _SHAPE, "use_dora": _SHAPE,
    "lora_alpha": _SCALE, "use_rslora": _SCALE,
    "data": _DATA, "prompt": _DATA, "cutoff_len": _DATA, "train_on_inputs": _DATA,
    "val_set_size": _DATA, "group_by_length": _DATA,
    "batch_size": "the optimizer batches (and a half-accumulated one) would change",
    "micro_batch_size": "the micro-batches drawn (and their dropout masks) would change",
    "optim": "the optimizer's state (AdamW's moments, SGD's momentum) does not carry over to "
             "another optimizer",
    "seed": "the data order and dropout masks derive from it: a fork keeps NAME's",
    "init_from": "a fork starts from NAME's weights at this step",
    **{f: "the MixLoRA routing (experts, router) would change, so the weights and optimizer "
          "state cannot carry over" for f in MIXLORA_FIELDS},
}
# A pruned sweep trial too: its adapter and state stay in the engine, and a fork trains on.
FORKABLE_STATES = (RUNNING, QUEUED, PAUSED, PRUNED)
# Settings a fork may unset (None: no clipping, warm-up by warmup_ratio, no periodic eval).
UNSETTABLE = ("max_grad_norm", "warmup_steps", "eval_steps")


def fork_config(engine: "Engine", src: "Job", new: str, changes: dict[str, Any]):
    """NEW's AdapterConfig: NAME's with ``changes``, validated as a config file's table."""
    taken = {name.lower(): name for name in engine.jobs}
    if new.lower() in taken:
        raise UserError(f"cannot fork {src.name!r} as {new!r}: an adapter named "
                        f"{taken[new.lower()]!r} is already in this engine; names must be "
                        "unique, ignoring case (each is a folder under output_dir)")
    for field in changes:
        if field in REFUSED:
            reason = REFUSED[field].replace("NAME", repr(src.name))
            raise UserError(f"cannot fork {src.name!r} with a new {field}: {reason}. A fork "
                            "may change " + ", ".join(CHANGEABLE))
        if field not in CHANGEABLE:
            raise UserError(f"cannot fork {src.name!r}: {field!r} is not an adapter setting a "
                            "fork can change; it may change " + ", ".join(CHANGEABLE))
    raw = {k: v for k, v in asdict(src.cfg).items() if v is not None}
    raw.update(name=new, seed=src.seed, init_from="")
    # One of warmup_steps / warmup_ratio: setting one replaces the other.
    if "warmup_steps" in changes and "warmup_ratio" not in changes:
        raw["warmup_ratio"] = 0.0
    if "warmup_ratio" in changes and "warmup_steps" not in changes:
        raw.pop("warmup_steps", None)
    for field, value in changes.items():
        if value is None:            # back to the default (no clipping, no eval_steps, ...)
            if field not in UNSETTABLE:
                raise UserError(f"cannot fork {src.name!r} with no {field}: only "
                                + ", ".join(UNSETTABLE) + " can be unset")
            raw.pop(field, None)
        else:
            raw[field] = value
    source = f"fork of {src.name!r}"
    (cfg,) = parse_adapter_tables([raw], source, engine.config.train, Path.cwd())
    return cfg


def fork_job(engine: "Engine", name: str, new: str, changes: dict[str, Any]) -> "Job":
    """Add job ``new``: job ``name``'s state at this step boundary, with ``changes``."""
    src = engine.job(name)
    if src.state not in FORKABLE_STATES:
        raise UserError(f"job {name!r} is {src.state}; only running, queued, paused or pruned "
                        "jobs fork")
    cfg = fork_config(engine, src, new, dict(changes))
    total = src.data.total_steps(cfg.num_epochs)
    if total < src.step:
        raise UserError(f"cannot fork {name!r} with num_epochs = {cfg.num_epochs}: that is "
                        f"{total} steps, and {name!r} has already taken {src.step}")
    job = engine.add_job(cfg, from_config=False, restoring=True)
    try:
        _copy_state(src, job)
    except BaseException:
        engine.jobs.pop(job.name, None)      # added whole or not at all
        job.adapter.detach(engine.model)
        raise
    reason = f"forked from {name} at step {src.step}"
    engine.log(f"job {new!r} {reason}" + (
        ": " + ", ".join(f"{k} = {v!r}" for k, v in changes.items()) if changes else ""))
    engine._set_state(job, QUEUED, reason)
    return job


def _copy_state(src: "Job", job: "Job") -> None:
    if job.data_fingerprint != src.data_fingerprint:
        raise UserError(f"cannot fork {src.name!r}: its data file ({src.cfg.data}) changed "
                        "since the job started, so the fork would not see the same examples")
    if len(job.parameters) != len(src.parameters):
        raise UserError(f"cannot fork {src.name!r}: the new adapter has other tensors")
    with torch.no_grad():
        for mine, theirs in zip(job.parameters, src.parameters):
            if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
                raise UserError(f"cannot fork {src.name!r}: the new adapter's tensors differ "
                                f"({tuple(mine.shape)} vs {tuple(theirs.shape)})")
            mine.copy_(theirs)
            mine.grad = None if theirs.grad is None else theirs.grad.detach().clone()
    # The schedule NEW's own settings define, at NAME's step: as a job configured this way
    # from the start (a fresh job steps its scheduler once per optimizer step, skipped or not).
    with warnings.catch_warnings():   # "scheduler.step() before optimizer.step()": meant
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(src.scheduler.last_epoch - job.scheduler.last_epoch):
            job.scheduler.step()
    # NAME's optimizer state on NEW's parameters, under NEW's hyperparameters.
    state = job.optimizer.state_dict()
    state["state"] = copy.deepcopy(src.optimizer.state_dict()["state"])
    job.optimizer.load_state_dict(state)
    position = copy.deepcopy(src.position())
    position.update(state=QUEUED, reason=None)
    job.restore_position(position)
