"""Adapters on disk in PEFT's format, and an adapter's pieces in a model, whatever its variant.

A saved adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with
PEFT's key names, so ``peft.PeftModel.from_pretrained(base, folder)`` loads it with no
missing or unexpected keys; ``mlora_adapter.json`` beside them records what PEFT has no
field for (the prompt template, the run that made it). Files are written atomically: a
reader sees the old folder or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.core.errors import UserError
from engine.train.lora import BatchLayout, adapter_hosts

PEFT_PREFIX = "base_model.model."
META_FILE = "mlora_adapter.json"


def adapter_modules(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """What adapter ``name`` holds in each AdapterHost of the model (a LoraAdapter per
    linear, MixLoRA's router and experts per feed-forward block), by the host's module name."""
    return {module_name: host.adapters[name] for module_name, host in adapter_hosts(model).items()
            if name in host.adapters}


def attach_adapter(model: nn.Module, layout: BatchLayout, name: str, linear_names: list[str],
                   *, r: int, alpha: float, dropout: float, use_rslora: bool, use_dora: bool,
                   init_seed: int, device: torch.device) -> None:
    """Attach a LoRA, rsLoRA or DoRA adapter given its fields, through its variant (the
    engine makes the variant from the whole AdapterConfig: ``variant_for``)."""
    # Imported here, not above: the variants build on this module.
    from engine.train.variants import variant_for

    fields = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                  use_dora=use_dora)
    variant_for(name, fields).attach(model, layout, linear_names, init_seed=init_seed,
                                     device=device)


def detach_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every module that holds it (the hosts stay in place)."""
    for host in adapter_hosts(model).values():
        if name in host.adapters:
            del host.adapters[name]


def adapter_tensors(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter ``name``'s tensors by their saved key names, PEFT's for LoRA and DoRA
    (``base_model.model.<module>.lora_A.weight``), docs/mixlora.md's for MixLoRA."""
    found = {}
    for module_name, host in adapter_hosts(model).items():
        if name in host.adapters:
            prefix = PEFT_PREFIX + host.saved_name(module_name)
            for key, tensor in host.adapters[name].tensors().items():
                found[f"{prefix}.{key}"] = tensor
    return found


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their saved key names (contiguous fp32 CPU copies)."""
    return {key: tensor.detach().cpu().contiguous().clone()
            for key, tensor in adapter_tensors(model, name).items()}


@torch.no_grad()
def load_adapter_state(model: nn.Module, name: str, state: dict[str, torch.Tensor],
                       source: str) -> None:
    """Copy saved tensors into adapter ``name``; any missing, extra or misshapen key is an error."""
    expected = adapter_tensors(model, name)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise UserError(f"{source}: adapter weights do not match this adapter's layers: "
                        + "; ".join(parts)
                        + ". Check r, target_modules and use_dora (and a MixLoRA adapter's "
                        "routing_strategy, num_experts and expert_lora) against the saved "
                        "adapter.")
    for key, param in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != tuple(param.shape):
            raise UserError(f"{source}: {key} has shape {tuple(tensor.shape)}, this adapter "
                            f"expects {tuple(param.shape)} (is r the same?)")
        param.copy_(tensor.to(param.device, torch.float32))


def peft_config(*, r: int, alpha: float, dropout: float, target_modules: list[str],
                use_rslora: bool, use_dora: bool, base_model: str) -> dict:
    """A LoraConfig dict PEFT reads; fields we leave out take PEFT's defaults."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(target_modules),
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, content: bytes | dict[str, torch.Tensor]) -> None:
    if isinstance(content, dict):
        save_file(content, str(path))
    else:
        path.write_bytes(content)
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def write_files_atomically(folder: Path, files: dict[str, bytes | dict[str, torch.Tensor]]) -> None:
    """Write each file beside its final name, fsync, then rename over it.

    For a folder that holds other things too (an adapter folder holds its checkpoints):
    each file is whole at every instant. Weights are written before the config that
    describes them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(files, key=lambda n: n != "adapter_model.safetensors"):
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        try:
            _write_file(tmp, files[name])
            os.replace(tmp, folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fsync_dir(folder)


def write_folder_atomically(folder: Path, files: dict[str, bytes | dict[str, torch.Tensor]]) -> None:
    """Write ``files`` (name -> bytes, or name -> tensors for safetensors) as ``folder``.

    A name may hold one ``/`` ("job/adapter_config.json"): a folder inside ``folder``.

    Everything goes to a temporary sibling first, is fsynced, then replaces ``folder`` by
    rename; an existing folder is moved aside first and removed only after the new one is
    in place, so a crash leaves one whole version.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        subfolders = set()
        for name, content in files.items():
            target = tmp / name
            if target.parent != tmp:          # "job/file": a folder inside the folder
                target.parent.mkdir(parents=True, exist_ok=True)
                subfolders.add(target.parent)
            _write_file(target, content)
        for sub in subfolders:
            fsync_dir(sub)
        fsync_dir(tmp)
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def adapter_files(model: nn.Module, name: str, config: dict, meta: dict) -> dict:
    """The files of a saved adapter folder, ready for ``write_folder_atomically``."""
    return {
        "adapter_model.safetensors": adapter_state_dict(model, name),
        "adapter_config.json": (json.dumps(config, indent=2) + "\n").encode(),
        META_FILE: (json.dumps(meta, indent=2) + "\n").encode(),
    }


def read_adapter_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(PEFT config, tensors, our metadata or {}) of a saved adapter folder."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    weights_path = folder / "adapter_model.safetensors"
    if not config_path.is_file():
        raise UserError(f"{folder}: not an adapter folder (no adapter_config.json)")
    if not weights_path.is_file():
        raise UserError(f"{folder}: adapter_model.safetensors is missing")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{config_path}: cannot read it as JSON ({exc})") from None
    if config.get("peft_type", "LORA") not in ("LORA", "MIXLORA"):
        raise UserError(f"{config_path}: peft_type {config.get('peft_type')!r} is not supported "
                        "(expected LORA or MIXLORA)")
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise UserError(f"{weights_path}: cannot read the weights ({exc})") from None
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return config, state, meta
