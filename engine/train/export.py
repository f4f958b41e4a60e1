"""`mlora export --merge`: the base model with one adapter merged in, as an ordinary
transformers folder (safetensors weights, config, tokenizer, generation config) that
``AutoModelForCausalLM.from_pretrained(OUT)`` loads with no PEFT and no mlora.

The adapter is read and checked as every saved adapter is (engine/train/adapter_set.py:
this product's folders and PEFT's own, list, regex or ``all-linear`` targets) and attached to
the unquantized base through the engine's own variant pieces, so its scaling (LoRA's
alpha / r, rsLoRA's alpha / sqrt(r)) and DoRA's row norm are the engine's one definition.
Each targeted linear's merged weight is then computed in fp32 as PEFT's
``merge_and_unload`` computes it:

- LoRA, rsLoRA: ``W + s * (B @ A)``;
- DoRA: ``(m / ||W + s * (B @ A)||) * (W + s * (B @ A))``, the norm of each output row
  (PEFT's ``DoraLinearLayer.get_weight_norm``, ``dim=1``), detached,

and cast to the export dtype. A MixLoRA adapter has no such weight (a router chooses its
experts per token) and is refused.

The folder is written into a temporary sibling and renamed into place; an existing folder
is moved aside first and removed only once the new one is in place, so ``OUT`` is at every
moment absent, the old folder or the whole new one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from engine.core.config import ModelConfig
from engine.core.errors import UserError
from engine.train.adapter_set import attach_saved, base_model_path, check_supported
from engine.train.adapters import fsync_dir, read_adapter_folder
from engine.train.lora import BatchLayout, LoraAdapter, MultiLoraLinear, dense_weight
from engine.train.models import _DTYPES, load_base_model
from engine.train.variants import variant_for
from engine.train.variants.dora import DoraAdapter

Log = Callable[[str], None]
_NAME = "export"   # the adapter's name inside the model while it is merged


@dataclass
class ExportResult:
    out: Path
    base_model: Path
    dtype: str
    variant: str
    merged: int            # how many linears took the adapter


def export_merged(adapter_dir: str | Path, out: str | Path, *, dtype: Optional[str] = None,
                  base_model: Optional[str] = None, overwrite: bool = False,
                  log: Optional[Log] = None) -> ExportResult:
    """Merge the adapter in ``adapter_dir`` into its base model and write the result to ``out``.

    ``dtype``: fp32, bf16 or fp16; default the adapter's training dtype (mlora_adapter.json),
    else fp32. ``base_model`` overrides the base model the adapter records. Every user
    mistake raises ``UserError``; on any failure ``out`` is left as it was.
    """
    log = log or (lambda message: None)
    adapter_dir, out = Path(adapter_dir), Path(out)
    _check_out(out, overwrite)
    if not adapter_dir.is_dir():
        raise UserError(f"{adapter_dir}: no such adapter folder")
    config, state, meta = read_adapter_folder(adapter_dir)
    refuse_unmergeable(config, adapter_dir)
    check_supported(config, adapter_dir)
    base = base_model_path(base_model, config, meta, adapter_dir, log)
    dtype = dtype or meta.get("dtype") or "fp32"
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    quantize = meta.get("quantize") or "none"
    if quantize != "none":
        log(f"note: this adapter was trained on a {quantize} quantized base; it is merged "
            f"into the unquantized base weights ({dtype}), so the exported model differs "
            f"slightly from the quantized model it was trained with (that model computed "
            f"with the {quantize} rounding of every base weight, the export with the "
            f"original weights)")

    model, _tokenizer, _info = load_base_model(
        ModelConfig(base_model=str(base), dtype=dtype, quantize="none"), torch.device("cpu"),
        log=log)
    attach_saved(model, BatchLayout(), _NAME, config, state, adapter_dir, torch.device("cpu"))
    variant = variant_for(_NAME, config)
    merged = merge_into_base(model, _NAME)
    log(f"merged {variant.label()} adapter {adapter_dir} into {merged} linears of {base} "
        f"({dtype})")

    def write(folder: Path) -> None:
        from transformers import AutoTokenizer

        model.save_pretrained(folder, safe_serialization=True)
        # The tokenizer as the base model has it (load_base_model's copy may have been
        # given a pad token for batching).
        AutoTokenizer.from_pretrained(base, local_files_only=True).save_pretrained(folder)

    write_dir_atomically(out, write)
    log(f"wrote {out}")
    return ExportResult(out, base, dtype, variant.label(), merged)


def refuse_unmergeable(config: dict, adapter_dir: Path) -> None:
    """A MixLoRA adapter cannot become one weight per layer: say so and why."""
    if config.get("peft_type") == "MIXLORA" or config.get("routing_strategy"):
        raise UserError(
            f"{adapter_dir} is a MixLoRA adapter, which cannot be merged into the base model: "
            f"a router chooses its experts for each token, so there is no single weight to "
            f"fold into each layer. Use it with mlora generate / mlora evaluate instead")


@torch.no_grad()
def merge_into_base(model: nn.Module, name: str) -> int:
    """Fold adapter ``name`` into the base linears it is attached to and put the plain
    linears back in place of the multi-adapter layers; returns how many were merged."""
    hosts = [(module_name, host) for module_name, host in model.named_modules()
             if isinstance(host, MultiLoraLinear)]
    for module_name, host in hosts:
        base = host.base
        if type(base) is not nn.Linear:
            raise UserError(f"the base model's {module_name} is a {type(base).__name__}, not "
                            f"a plain linear layer (a quantized checkpoint?); export needs an "
                            f"unquantized base model folder (--base-model)")
        adapter = host.adapters[name]
        merged = merged_weight(dense_weight(base), adapter)
        if not torch.isfinite(merged).all():
            raise UserError(f"the merged weight of {module_name} is not finite (NaN or inf); "
                            f"the adapter's weights are broken")
        base.weight.copy_(merged.to(base.weight.dtype))
        parent_name, _, attr = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, base)
    return len(hosts)


def merged_weight(weight: torch.Tensor, adapter: LoraAdapter) -> torch.Tensor:
    """The fp32 weight that computes ``weight`` (fp32, out x in) with ``adapter`` applied,
    as PEFT's merge computes it."""
    delta = (adapter.lora_B @ adapter.lora_A) * adapter.scaling
    if type(adapter) is LoraAdapter:
        return weight + delta
    if type(adapter) is DoraAdapter:
        # PEFT's DoraLinearVariant.merge: the row norms of the unmerged W + delta, detached.
        scale = adapter.magnitude / adapter.weight_norm(weight)
        return scale.view(-1, 1) * (weight + delta)
    raise UserError(f"a {type(adapter).__name__} adapter cannot be merged")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another -o")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite to replace "
                        f"it, or choose another -o")


def write_dir_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder with ``write(tmp)``, fsync it, then rename it to
    ``folder`` (an existing ``folder`` is moved aside first and removed once the new one is
    in place). On any failure the temporary folder is removed and ``folder`` is untouched.

    engine.train.adapters.write_folder_atomically does the same for files given as bytes;
    this one lets a writer (``save_pretrained``) fill the folder itself.
    """
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # mkdir, not mkdtemp: the folder gets the umask's permissions, as a model folder should.
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"cannot write {folder}: {e}") from None
    old = None
    try:
        write(tmp)
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb+") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(Path(root))
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except BaseException:
            if old is not None:
                os.replace(old, folder)
                old = None
            raise
        fsync_dir(folder.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {folder}: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
