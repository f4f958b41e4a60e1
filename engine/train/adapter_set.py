"""Several saved adapters on one base model, each a row of a comparison (evaluation, generation).

``load_adapter_set`` reads adapter folders (this product's, or PEFT's own), checks they were
trained on one base model in one dtype and quantization, loads that base once and attaches
every adapter to it through the engine's multi-adapter layers, so one forward pass serves
them all: the rows of a batch are split among the adapters by ``BatchLayout`` segments
(a segment with adapter None is the base model alone).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from engine.core.config import ModelConfig
from engine.core.errors import ConfigError, UserError
from engine.core.prompts import PromptTemplate, load_template
from engine.train.adapters import load_adapter_state, read_adapter_folder
from engine.train.lora import BatchLayout, MultiLoraLinear
from engine.train.models import (_decoder_layers_prefix, find_target_linears, load_base_model,
                                 resolve_base_model, select_device)
from engine.train.variants import variant_for

Log = Callable[[str], None]
BASE_ROW = "base"   # the row of the base model alone; no adapter row may take this name


@dataclass
class AdapterRow:
    """One row of a comparison: an adapter (``adapter`` its name inside the model) or the
    base model alone (``adapter`` None)."""
    name: str
    adapter: Optional[str]
    folder: Optional[Path] = None
    meta: dict = field(default_factory=dict)

    def template(self) -> PromptTemplate:
        return saved_template(self.meta, self.folder)


def saved_template(meta: dict, folder: Optional[Path]) -> PromptTemplate:
    """The prompt template an adapter was trained with (Alpaca when none is recorded)."""
    name = meta.get("prompt") or (meta.get("adapter") or {}).get("prompt") or "alpaca"
    try:
        return load_template(name)
    except ConfigError as e:
        raise UserError(f"{folder}: the adapter was trained with prompt template {name!r}, "
                        f"which cannot be loaded ({e})") from None


@dataclass
class AdapterSet:
    model: torch.nn.Module
    tokenizer: object
    layout: BatchLayout
    rows: list[AdapterRow]
    device: torch.device
    info: dict


@dataclass
class _Saved:
    folder: Path
    config: dict
    state: dict
    meta: dict
    base: Path
    dtype: str
    quantize: str


def row_names(folders: list[Path]) -> list[str]:
    """Each folder's row name: its own name, or ``parent/name`` where two share a name."""
    names = [f.name for f in folders]
    out = []
    for folder, name in zip(folders, names):
        out.append(f"{folder.parent.name}/{name}" if names.count(name) > 1 else name)
    if len(set(out)) != len(out):
        dup = next(n for n in out if out.count(n) > 1)
        raise UserError(f"two adapters would both be named {dup!r}; give each folder a "
                        "distinct name (or parent folder)")
    if BASE_ROW in out:
        raise UserError(f"an adapter folder is named {BASE_ROW!r}, the name reserved for the "
                        "base model's row; rename or move the folder")
    return out


def load_adapter_set(folders: list[str | Path], *, include_base: bool = False,
                     base_model: Optional[str] = None, dtype: Optional[str] = None,
                     quantize: Optional[str] = None, attn_impl: str = "auto",
                     log: Optional[Log] = None) -> AdapterSet:
    """The base model with every adapter of ``folders`` attached (see the module's doc).

    ``base_model``, ``dtype`` and ``quantize`` override what the folders record; without
    them the folders must agree. Every user mistake raises ``UserError``.
    """
    folders = [Path(f) for f in folders]
    if not folders and not include_base:
        raise UserError("nothing to compare: give at least one --adapter (or --base)")
    names = row_names(folders)
    saved = [_read(folder, base_model, dtype, quantize, log) for folder in folders]
    if saved:
        _check_same(saved, "base model", lambda s: str(s.base.resolve()), "--base-model")
        _check_same(saved, "dtype", lambda s: s.dtype, "--dtype")
        _check_same(saved, "quantization", lambda s: s.quantize, "--quantize")
        model_cfg = ModelConfig(base_model=str(saved[0].base), dtype=saved[0].dtype,
                                quantize=saved[0].quantize, attn_impl=attn_impl)
    elif base_model:
        model_cfg = ModelConfig(base_model=base_model, dtype=dtype or "fp32",
                                quantize=quantize or "none", attn_impl=attn_impl)
    else:
        raise UserError("--base alone needs --base-model (no adapter names a base model)")
    device = select_device()
    model, tokenizer, info = load_base_model(model_cfg, device, log=log)
    layout = BatchLayout()
    rows = [AdapterRow(BASE_ROW, None)] if include_base else []
    for index, (name, item) in enumerate(zip(names, saved)):
        internal = f"a{index}"
        attach_saved(model, layout, internal, item.config, item.state, item.folder, device)
        rows.append(AdapterRow(name, internal, item.folder, item.meta))
    model.eval()
    return AdapterSet(model, tokenizer, layout, rows, device, info)


def _read(folder: Path, base_model: Optional[str], dtype: Optional[str],
          quantize: Optional[str], log: Optional[Log]) -> _Saved:
    config, state, meta = read_adapter_folder(folder)
    check_supported(config, folder)
    return _Saved(folder, config, state, meta,
                  base_model_path(base_model, config, meta, folder, log),
                  dtype or meta.get("dtype", "fp32"), quantize or meta.get("quantize", "none"))


def _check_same(saved: list[_Saved], what: str, key, flag: str) -> None:
    first = saved[0]
    for other in saved[1:]:
        if key(other) != key(first):
            raise UserError(f"the adapters were trained on different {what}s: {first.folder} "
                            f"on {key(first)}, {other.folder} on {key(other)}; compare "
                            f"adapters of one {what} (or give {flag} to use one for all)")


def base_model_path(override: Optional[str], peft_cfg: dict, meta: dict, adapter_dir: Path,
                    log: Optional[Log]) -> Path:
    """The local folder of the base model: the override, else what the adapter recorded
    (``mlora_adapter.json``, else PEFT's ``base_model_name_or_path``)."""
    name = override or meta.get("base_model") or peft_cfg.get("base_model_name_or_path")
    if not name:
        raise UserError(f"{adapter_dir}: the adapter does not say which base model it was "
                        f"trained on; pass --base-model")
    try:
        return resolve_base_model(str(name), log)
    except UserError as e:
        if override:
            raise
        raise UserError(f"{e} (the base model recorded in {adapter_dir}); pass --base-model "
                        f"to use another copy of it") from None


# PEFT LoraConfig fields this loader cannot honour, with the value that means "unused".
_UNSUPPORTED = {
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, [], ()),
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "use_qalora": (False, None),
}


def check_supported(peft_cfg: dict, adapter_dir: Path) -> None:
    """Refuse, naming the field, a PEFT config whose meaning the engine's layers would drop."""
    path = adapter_dir / "adapter_config.json"
    for key, unused in _UNSUPPORTED.items():
        value = peft_cfg.get(key)
        if value not in unused:
            raise UserError(f"{path}: {key} = {value!r} is not supported (only "
                            f"{unused[0]!r}); this adapter cannot be loaded here")
    r = peft_cfg.get("r")
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise UserError(f"{path}: r must be a positive integer, got {r!r}")


def target_linears(model, peft_cfg: dict, adapter_dir: Path) -> list[str]:
    """Full module names of the linears the adapter targets, as PEFT resolves
    ``target_modules``: a list of name endings, a regular expression matched in full against
    each module's name, or ``"all-linear"`` (every decoder linear)."""
    path = adapter_dir / "adapter_config.json"
    targets = peft_cfg.get("target_modules")
    is_list = isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    if is_list and targets and not any("." in t for t in targets):
        return list(find_target_linears(model, targets))
    if not (is_list and targets) and not (isinstance(targets, str) and targets):
        raise UserError(f"{path}: target_modules must be a list of module names, a regular "
                        f"expression or 'all-linear', got {targets!r}")
    prefix = _decoder_layers_prefix(model)
    # A linear already wrapped for another adapter counts under its own name.
    linears = [name for name, module in model.named_modules()
               if isinstance(module, (torch.nn.Linear, MultiLoraLinear))
               and name.startswith(prefix) and not name.endswith(".base")]
    if targets == "all-linear":
        return linears
    if is_list:     # dotted names (PEFT writes all-linear out so): a name or its ending
        found = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in found)]
        if missing:
            raise UserError(f"{path}: target module {missing[0]!r} is not a linear layer of "
                            f"the base model's decoder")
        return found
    try:
        found = [name for name in linears if re.fullmatch(targets, name)]
    except re.error as e:
        raise UserError(f"{path}: target_modules {targets!r} is not a valid regular "
                        f"expression ({e})") from None
    if not found:
        raise UserError(f"{path}: target_modules {targets!r} matches no linear layer of the "
                        f"base model (e.g. {linears[0] if linears else 'none'})")
    return found


def attach_saved(model, layout: BatchLayout, name: str, peft_cfg: dict, state: dict,
                 adapter_dir: str | Path, device: torch.device) -> None:
    """Attach a saved adapter (``read_adapter_folder``'s config and tensors) as ``name``.

    Of any variant the config describes (engine/train/variants: LoRA, DoRA, MixLoRA with
    peft_type MIXLORA). PEFT's ``rank_pattern`` and ``alpha_pattern`` give some modules
    their own rank and alpha: those modules are attached with their own fields.
    """
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / "adapter_config.json"
    check_supported(peft_cfg, adapter_dir)
    linears = target_linears(model, peft_cfg, adapter_dir)
    groups = _pattern_groups(peft_cfg, linears, path)
    for fields, members in groups.items():
        try:
            variant = variant_for(name, dict(peft_cfg, r=fields[0], lora_alpha=fields[1]))
        except (ValueError, TypeError) as e:   # fields the config could not resolve
            raise UserError(f"{path}: not a valid adapter config ({e})") from None
        variant.attach(model, layout, members, init_seed=0, device=device)
    load_adapter_state(model, name, state, source=str(adapter_dir))


def _pattern_groups(peft_cfg: dict, linears: list[str], path: Path) -> dict[tuple, list[str]]:
    """The target linears grouped by their (r, lora_alpha), as PEFT resolves
    ``rank_pattern``/``alpha_pattern``: the first key ``k`` for which
    ``re.match(rf"(.*\\.)?({k})$", module name)`` matches (PEFT's ``get_pattern_key``),
    else the config's own r and lora_alpha."""
    r, alpha = peft_cfg.get("r"), peft_cfg.get("lora_alpha", peft_cfg.get("r"))
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        value = peft_cfg.get(key) or {}
        if not isinstance(value, dict):
            raise UserError(f"{path}: {key} must be a mapping of module patterns to numbers")
        patterns[key] = value
    if (patterns["rank_pattern"] or patterns["alpha_pattern"]) and peft_cfg.get("routing_strategy"):
        raise UserError(f"{path}: rank_pattern/alpha_pattern are not supported on a MixLoRA "
                        "adapter")
    groups: dict[tuple, list[str]] = {}
    for module in linears:
        own_r = _pattern_value(patterns["rank_pattern"], module, r, path)
        own_alpha = _pattern_value(patterns["alpha_pattern"], module, alpha, path)
        groups.setdefault((own_r, own_alpha), []).append(module)
    return groups


def _pattern_value(pattern: dict, module: str, default, path: Path):
    for key, value in pattern.items():
        try:
            matched = re.match(rf"(.*\.)?({key})$", module)
        except re.error as e:
            raise UserError(f"{path}: pattern {key!r} is not a valid regular expression "
                            f"({e})") from None
        if matched:
            return value
    return default
