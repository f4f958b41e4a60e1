"""Adapters on disk in PEFT's format, and attaching adapters to a model.

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
from engine.train.lora import BatchLayout, LoraAdapter, MultiLoraLinear, dense_weight, wrap_linears
from engine.train.mixlora import detach_mixlora, mixlora_tensors

PEFT_PREFIX = "base_model.model."
META_FILE = "mlora_adapter.json"


def attach_adapter(model: nn.Module, layout: BatchLayout, name: str, linear_names: list[str],
                   *, r: int, alpha: float, dropout: float, use_rslora: bool, use_dora: bool,
                   init_seed: int, device: torch.device) -> list[nn.Parameter]:
    """Add adapter ``name`` to the named linears, initialised from ``init_seed``; returns its params.

    Initialisation draws from a CPU generator in module order, so it is the same on every
    device and whichever other adapters exist.
    """
    generator = torch.Generator(device="cpu").manual_seed(init_seed)
    params: list[nn.Parameter] = []
    for module_name, module in wrap_linears(model, linear_names, layout).items():
        if name in module.adapters:
            raise UserError(f"adapter {name!r} is already attached to {module_name}")
        adapter = LoraAdapter(module.in_features, module.out_features, r, alpha, dropout,
                              use_rslora, use_dora)
        adapter.reset(generator, dense_weight(module.base).detach().cpu())
        adapter.to(device)
        module.adapters[name] = adapter
        params.extend(adapter.parameters())
    return params


def detach_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer (the base linears stay wrapped)."""
    for module in model.modules():
        if isinstance(module, MultiLoraLinear) and name in module.adapters:
            del module.adapters[name]
    detach_mixlora(model, name)   # a MixLoRA adapter's routers and experts


def adapter_modules(model: nn.Module, name: str) -> dict[str, LoraAdapter]:
    """The adapter ``name`` on each layer, by the base linear's module name (PEFT's naming)."""
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, MultiLoraLinear) and name in module.adapters:
            found[module_name] = module.adapters[name]
    return found


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (contiguous fp32 CPU copies)."""
    state = {}
    for module_name, adapter in adapter_modules(model, name).items():
        key = PEFT_PREFIX + module_name
        state[f"{key}.lora_A.weight"] = adapter.lora_A.detach().cpu().contiguous().clone()
        state[f"{key}.lora_B.weight"] = adapter.lora_B.detach().cpu().contiguous().clone()
        if adapter.magnitude is not None:
            state[f"{key}.lora_magnitude_vector"] = adapter.magnitude.detach().cpu().clone()
    # A MixLoRA adapter's routers and experts (engine.train.mixlora, docs/mixlora.md).
    for key, tensor in mixlora_tensors(model, name, PEFT_PREFIX).items():
        state[key] = tensor.detach().cpu().contiguous().clone()
    return state


@torch.no_grad()
def load_adapter_state(model: nn.Module, name: str, state: dict[str, torch.Tensor],
                       source: str) -> None:
    """Copy saved tensors into adapter ``name``; any missing, extra or misshapen key is an error."""
    expected = {}
    for module_name, adapter in adapter_modules(model, name).items():
        key = PEFT_PREFIX + module_name
        expected[f"{key}.lora_A.weight"] = adapter.lora_A
        expected[f"{key}.lora_B.weight"] = adapter.lora_B
        if adapter.magnitude is not None:
            expected[f"{key}.lora_magnitude_vector"] = adapter.magnitude
    expected.update(mixlora_tensors(model, name, PEFT_PREFIX))   # MixLoRA routers, experts
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


def _fsync_dir(path: Path) -> None:
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
    _fsync_dir(folder)


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
            _fsync_dir(sub)
        _fsync_dir(tmp)
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)
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
