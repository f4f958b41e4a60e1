"""Checkpoint contents and exact resume: what a checkpoint holds, and the checks and loads
that put every job back where it was.

The folder layout, listing and pruning are engine/core/checkpoints.py (no torch); the
engine (engine/train/engine.py) decides when to write and adds the restored jobs.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file

from engine.core import checkpoints as ckpt
from engine.core.config import RunConfig
from engine.core.errors import ConfigError, UserError
from engine.core.jobs import CANCELLED
from engine.train.adapters import load_adapter_state, read_adapter_folder
from engine.train.job import Job
from engine.train.schedules import SCHEDULE_SOURCE


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def resume_train_settings(config: RunConfig) -> dict:
    """The [train] settings a checkpoint records and a resume must keep."""
    return {k: getattr(config.train, k) for k in ckpt.RESUME_TRAIN_FIELDS}


def checkpoint_files(engine_step: int, config: RunConfig, packing: bool, jobs: Iterable[Job],
                     adapter_files: Callable[[Job], dict], device: torch.device,
                     sweeps: dict | None = None) -> dict:
    """Every file of a checkpoint of ``jobs`` at ``engine_step``, by path in its folder."""
    files: dict = {}
    saved_jobs = []
    for job in jobs:
        saved_jobs.append({"name": job.name, "adapter": asdict(job.cfg),
                           "from_config": job.from_config, "data_sha256": job.data_fingerprint,
                           "position": job.position()})
        if job.state == CANCELLED:
            continue           # its adapter left the model
        for name, content in adapter_files(job).items():
            files[f"{job.name}/{name}"] = content
        files[f"{job.name}/optimizer.pt"] = _torch_bytes(job.optimizer.state_dict())
        files[f"{job.name}/scheduler.pt"] = _torch_bytes(job.scheduler.state_dict())
        files[f"{job.name}/grads.safetensors"] = {
            str(i): p.grad.detach().cpu().contiguous()
            for i, p in enumerate(job.parameters) if p.grad is not None}
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    files["rng.pt"] = _torch_bytes(rng)
    manifest = {"format": ckpt.FORMAT, "engine_step": engine_step,
                "model": asdict(config.model),
                "train": resume_train_settings(config),
                "packed": packing,   # the layout decides the dropout masks
                "schedule": SCHEDULE_SOURCE,
                "jobs": saved_jobs,
                "sweeps": sweeps or {}}    # every trial of every sweep (engine/train/sweeps.py)
    files[ckpt.ENGINE_FILE] = (json.dumps(manifest, indent=1) + "\n").encode()
    return files


def check_schedule(path: Path, manifest: dict) -> None:
    """Refuse a checkpoint whose learning-rate schedules are not the ones this engine uses:
    its jobs would go on along another curve than they started on."""
    if manifest.get("schedule") != SCHEDULE_SOURCE:
        raise UserError(
            f"cannot resume from {path}: it was written by an older mlora whose "
            "learning-rate schedules were its own, not transformers' (warm-up gave other "
            "rates), so its jobs would go on along another schedule than they started on. "
            "Start the run again (without --resume, or in another output_dir).")


def check_resumable(path: Path, manifest: dict, config: RunConfig) -> None:
    """Refuse a resume whose config changed what the checkpoint's jobs compute."""
    check_schedule(path, manifest)
    problems = []
    changes = ckpt.config_changes(manifest["model"], asdict(config.model))
    if changes:
        problems.append("[model] " + "; ".join(changes))
    changes = ckpt.config_changes(manifest["train"], resume_train_settings(config))
    if changes:
        problems.append("[train] " + "; ".join(changes))
    saved_jobs = {saved["name"]: saved for saved in manifest["jobs"]}
    for cfg in config.adapters:
        if cfg.name in saved_jobs:
            changes = ckpt.config_changes(saved_jobs[cfg.name]["adapter"], asdict(cfg),
                                          ckpt.RESUME_FREE_FIELDS)
            if changes:
                problems.append(f'[[adapter]] "{cfg.name}": ' + "; ".join(changes))
    names = {cfg.name for cfg in config.adapters}
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


def check_layout(path: Path, manifest: dict, packing: bool) -> None:
    """Refuse to go on with the other layout of passes than the checkpoint trained with."""
    packed = manifest.get("packed")
    if packed is not None and packed != packing:
        # Packed and padded passes draw different dropout masks: the run would go on
        # with other masks than it started with. ("auto" packs on a CPU only.)
        raise ConfigError(
            f"cannot resume from {path}: it trained with sequence packing "
            f"{'on' if packed else 'off'}, and this run would train with it "
            f"{'on' if packing else 'off'}; set packing = "
            f"\"{'on' if packed else 'off'}\" to resume", table="train", field="packing")


def check_data(path: Path, job: Job, saved: dict) -> None:
    if job.data_fingerprint != saved["data_sha256"]:
        raise UserError(f"cannot resume from {path}: the training data of adapter "
                        f"{job.name!r} ({job.cfg.data}) changed since that checkpoint")


def load_job_state(model: torch.nn.Module, job: Job, folder: Path,
                   device: torch.device) -> None:
    """The job's adapter weights, optimizer, schedule and accumulated gradients."""
    _config, state, _meta = read_adapter_folder(folder)
    load_adapter_state(model, job.name, state, source=str(folder))
    try:
        job.optimizer.load_state_dict(torch.load(folder / "optimizer.pt",
                                                 map_location=device,
                                                 weights_only=True))
        job.scheduler.load_state_dict(torch.load(folder / "scheduler.pt",
                                                 weights_only=True))
        grads = load_file(str(folder / "grads.safetensors"))
    except Exception as exc:  # noqa: BLE001 - torch and safetensors raise many kinds
        raise UserError(f"{folder}: cannot read this job's checkpoint ({exc})") from None
    for i, param in enumerate(job.parameters):
        grad = grads.get(str(i))
        param.grad = grad.to(param.device) if grad is not None else None


def restore_rng(path: Path, device: torch.device) -> None:
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
