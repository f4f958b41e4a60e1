"""Convert an m-LoRA JSON config into this project's TOML config.

m-LoRA (TUDB-Labs/mLoRA) and its MixLoRA fork (MoE-PEFT) describe a run as one JSON
object: global fields (``cutoff_len``, ``save_step``, ``train_lora_simultaneously_num``, ...)
and a ``lora`` list with one object per adapter. ``convert_mlora_json`` maps what has an
equivalent here and keeps everything else visible as TOML comments, so nothing is dropped
silently. The output is meant to pass ``engine.core.config.parse_config`` unchanged when the
m-LoRA config was valid and its files exist.

Paths (data, prompt, base_model) are copied as written. m-LoRA resolved them against the
folder it ran in; this project resolves them against the TOML file's folder, which the
header of the output says.

The TOML is written by hand (a few value kinds only) to avoid a dependency.
This module never imports torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from engine.core.config import EXPERT_LORA_FIELDS, MIXLORA_FIELDS, MIXLORA_STRATEGY_ONLY
from engine.core.config_file import read_user_text
from engine.core.errors import ConfigError

# m-LoRA global key -> [train] key.
_TRAIN_KEYS = {
    "cutoff_len": "cutoff_len",
    "save_step": "save_step",
    "train_lora_simultaneously_num": "train_lora_simultaneously_num",
}
# Global keys that have no equivalent, with why.
_GLOBAL_NOTES = {
    "train_lora_candidate_num": "ignored: every adapter here is a candidate; "
                                "train_lora_simultaneously_num limits how many train at once",
    "train_strategy": "no equivalent: adapters are scheduled by train_lora_simultaneously_num",
    "early_stop_test_step": "no equivalent: no early stopping on a test set",
}

# m-LoRA adapter key -> [[adapter]] key. Older m-LoRA spelt lora_alpha/lora_dropout as
# alpha/dropout.
_ADAPTER_KEYS = {
    "name": "name", "optim": "optim", "lr": "lr", "momentum": "momentum",
    "weight_decay": "weight_decay", "batch_size": "batch_size",
    "micro_batch_size": "micro_batch_size", "num_epochs": "num_epochs", "r": "r",
    "lora_alpha": "lora_alpha", "alpha": "lora_alpha",
    "lora_dropout": "lora_dropout", "dropout": "lora_dropout",
    "target_modules": "target_modules", "data": "data", "prompt": "prompt",
    "group_by_length": "group_by_length", "use_dora": "use_dora", "use_rslora": "use_rslora",
    "loraplus_lr_ratio": "loraplus_lr_ratio", "scheduler_type": "scheduler_type",
    "warmup_steps": "warmup_steps", "warmup_ratio": "warmup_ratio",
    "val_set_size": "val_set_size", "cutoff_len": "cutoff_len",
    "train_on_inputs": "train_on_inputs",
}
# The order [[adapter]] keys are written in: identity, data, LoRA shape, optimisation.
_ADAPTER_ORDER = (
    "name", "data", "prompt", "r", "lora_alpha", "lora_dropout", "target_modules",
    "use_rslora", "use_dora", "loraplus_lr_ratio", "optim", "lr", "momentum", "weight_decay",
    "batch_size", "micro_batch_size", "num_epochs", "scheduler_type", "warmup_steps",
    "warmup_ratio", "cutoff_len", "train_on_inputs", "val_set_size", "group_by_length",
)
# MixLoRA (mixture of LoRA experts) fields of m-LoRA and MoE-PEFT: the same names here
# (docs/mixlora.md), written in MIXLORA_FIELDS' order after the LoRA fields.
_MIXLORA_KEYS = set(MIXLORA_FIELDS)
# MixLoRA fields with no equivalent, with why.
_ENTROPY = "no equivalent: MoE-PEFT's entropy router loss is not implemented here"
_MIXLORA_NOTES = {"router_dyn_loss_coef": _ENTROPY, "entropy_index": _ENTROPY,
                  "entropy_type": _ENTROPY, "entropy_eps": _ENTROPY}
# m-LoRA's older routing_strategy names.
_OLD_STRATEGIES = {"mixtral": "mixlora", "switch": "mixlora-switch",
                   "dynamic": "mixlora-dynamic"}
_EXPERT_ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
# m-LoRA's LLaMA module names for the MLP projections.
_OLD_TARGET_NAMES = {"w1_proj": "gate_proj", "w2_proj": "down_proj", "w3_proj": "up_proj"}

_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def convert_mlora_json(path: str | os.PathLike) -> str:
    """Return TOML text equivalent to the m-LoRA JSON config at ``path``.

    Raises ``ConfigError`` naming the file (and line, for bad JSON) if it cannot be read
    as an m-LoRA config.
    """
    source = str(path)
    config = _read_json(Path(path), source)
    if not isinstance(config, dict):
        raise ConfigError("expected a JSON object with a \"lora\" list", file=source)
    loras = config.get("lora")
    if loras is None:
        newer = {"adapters", "tasks", "datasets"} & config.keys()
        hint = (" (this looks like the newer m-LoRA YAML-style format with "
                f"{', '.join(sorted(newer))}, which is not supported)" if newer else "")
        raise ConfigError(f"no \"lora\" list: not an m-LoRA config{hint}", file=source)
    if not isinstance(loras, list) or not all(isinstance(x, dict) for x in loras):
        raise ConfigError("expected \"lora\" to be a list of objects", file=source, field="lora")

    out = [
        f"# Converted from the m-LoRA config {Path(path).name}.",
        "# Paths are copied as written: m-LoRA resolved them against the folder it ran in,",
        "# this file's paths are resolved against this file's folder.",
        "",
    ]
    out += _model_section(config)
    out += _train_section(config)
    for lora in loras:
        out += _adapter_section(lora)
    return "\n".join(out).rstrip("\n") + "\n"


def _read_json(path: Path, source: str) -> Any:
    text = read_user_text(path, source, kind="JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}",
                          file=source) from None


def _model_section(config: dict) -> list[str]:
    lines = ["[model]"]
    if "base_model" in config:
        lines.append(_assign("base_model", config["base_model"]))
    else:
        lines.append("# base_model: m-LoRA took it on the command line (--base_model); "
                     "set it here (default: the bundled demo model)")
    return lines + [""]


def _train_section(config: dict) -> list[str]:
    lines = ["[train]"]
    for key, value in config.items():
        if key in _TRAIN_KEYS:
            lines.append(_assign(_TRAIN_KEYS[key], value))
        elif key in _GLOBAL_NOTES:
            lines.append(_commented(key, value, _GLOBAL_NOTES[key]))
        elif key not in ("lora", "base_model"):
            lines.append(_commented(key, value, "m-LoRA field with no equivalent here"))
    return lines + [""]


def _adapter_section(lora: dict) -> list[str]:
    mapped: dict[str, Any] = {}
    notes: list[str] = []          # comment lines inside the adapter's table
    unmapped: list[str] = []
    mixlora: dict[str, Any] = {}
    for key, value in lora.items():
        if key in _MIXLORA_KEYS or key == "router_loss":
            mixlora[key] = value
        elif key in _MIXLORA_NOTES:
            unmapped.append(_commented(key, value, _MIXLORA_NOTES[key]))
        elif key in _ADAPTER_KEYS:
            new_key = _ADAPTER_KEYS[key]
            if new_key in mapped:  # e.g. both "alpha" and "lora_alpha"; the first one wins
                unmapped.append(_commented(key, value, f"duplicate of {new_key}"))
                continue
            mapped[new_key] = value
        else:
            unmapped.append(_commented(key, value))

    if "target_modules" in mapped:
        mapped["target_modules"], renamed = _targets(mapped["target_modules"])
        if renamed:
            notes.append("# target_modules: m-LoRA's w1_proj/w2_proj/w3_proj are LLaMA's "
                         "gate_proj/down_proj/up_proj")
    if "momentum" in mapped and mapped.get("optim") != "sgd":
        unmapped.append(_commented("momentum", mapped.pop("momentum"), "only used with sgd"))
    warmup = mapped.get("warmup_steps")
    if isinstance(warmup, float):
        if warmup.is_integer():
            mapped["warmup_steps"] = int(warmup)
        else:
            unmapped.append(_commented("warmup_steps", mapped.pop("warmup_steps"),
                                       "not a whole number of steps: set warmup_steps or "
                                       "warmup_ratio by hand"))
    if mapped.get("warmup_steps") == 0 and not mapped.get("warmup_ratio"):
        del mapped["warmup_steps"]  # m-LoRA templates write 0; leaving it out means the same

    if "data" not in mapped:
        task = lora.get("task_name")
        why = f" (m-LoRA task {task!r})" if task else ""
        notes.append(f"# data: missing in the m-LoRA config{why}; set a data file")

    lines = ["[[adapter]]"]
    for key in _ADAPTER_ORDER:
        if key in mapped:
            lines.append(_assign(key, mapped[key]))
    mix_mapped, mix_notes = _mixlora(mixlora)
    if mix_mapped or mix_notes:
        lines.append("# MixLoRA: a mixture of LoRA experts on the feed-forward (docs/mixlora.md)")
    for key in MIXLORA_FIELDS:
        if key in mix_mapped:
            lines.append(_assign(key, mix_mapped[key]))
    lines += mix_notes
    lines += notes
    if unmapped:
        lines.append("# m-LoRA fields with no equivalent here:")
        lines += unmapped
    return lines + [""]


def _mixlora(fields: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """An m-LoRA adapter's MixLoRA fields as [[adapter]] keys, and comments on the rest."""
    mapped: dict[str, Any] = {}
    notes: list[str] = []
    strategy = fields.get("routing_strategy")
    if strategy is None:
        for key, value in fields.items():
            notes.append(_commented(key, value, "MixLoRA field without routing_strategy: "
                                                "this adapter trains as plain LoRA"))
        return mapped, notes
    if isinstance(strategy, str) and strategy in _OLD_STRATEGIES:
        notes.append(f"# routing_strategy: m-LoRA's {strategy!r} is "
                     f"{_OLD_STRATEGIES[strategy]!r} here")
        strategy = _OLD_STRATEGIES[strategy]
    for key, value in fields.items():
        if key == "routing_strategy":
            mapped[key] = strategy
        elif key == "router_loss":
            if value is False:
                mapped["router_aux_loss_coef"] = mapped["router_z_loss_coef"] = 0.0
                notes.append(_commented(key, value, "router losses off: their coefs are 0"))
            else:
                notes.append(_commented(key, value, "the default here: router losses on"))
        elif key in ("router_aux_loss_coef", "router_z_loss_coef") and fields.get(
                "router_loss") is False:
            notes.append(_commented(key, value, "router_loss = false turns it off"))
        elif key in MIXLORA_STRATEGY_ONLY and MIXLORA_STRATEGY_ONLY[key] != strategy:
            notes.append(_commented(key, value, f"not used by routing_strategy {strategy!r}"))
        elif key == "expert_lora" and isinstance(value, dict):
            expert = {}
            for name, item in value.items():
                name_here = _EXPERT_ALIASES.get(name, name)
                if name_here in EXPERT_LORA_FIELDS and name_here not in expert:
                    expert[name_here] = item
                else:
                    notes.append(_commented(f"expert_lora.{name}", item,
                                            "no equivalent in expert_lora here"))
            mapped[key] = expert
        else:
            mapped[key] = value
    return mapped, notes


def _targets(value: Any) -> tuple[Any, bool]:
    """m-LoRA's targets as a list of enabled names, old MLP names renamed."""
    if isinstance(value, dict):
        names = [name for name, enabled in value.items() if enabled is True]
    elif isinstance(value, list):
        names = list(value)
    else:
        return value, False  # left for the validator to report
    renamed = [_OLD_TARGET_NAMES.get(n, n) if isinstance(n, str) else n for n in names]
    return renamed, renamed != names


# --- a small TOML writer ----------------------------------------------------------------

def toml_assignment(key: str, value: Any) -> str:
    """One ``key = value`` line of TOML (a comment when TOML cannot hold the value)."""
    return _assign(key, value)


def _assign(key: str, value: Any) -> str:
    text = _toml_value(value)
    if text is None:
        return _commented(key, value, "no TOML equivalent for null")
    return f"{_toml_key(key)} = {text}"


def _commented(key: str, value: Any, note: str = "") -> str:
    text = _toml_value(value)
    line = f"# {_toml_key(key)} = {text if text is not None else json.dumps(value)}"
    return f"{line}  # {note}" if note else line


def _toml_key(key: str) -> str:
    return key if _BARE_KEY_RE.match(key) else _toml_string(key)


def _toml_value(value: Any) -> str | None:
    """``value`` as TOML, or None when TOML cannot hold it (null, or a list holding null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # repr gives "0.0001" / "1e-05": both valid TOML floats
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        items = [_toml_value(v) for v in value]
        return None if None in items else "[" + ", ".join(items) + "]"
    if isinstance(value, dict):
        items = [(k, _toml_value(v)) for k, v in value.items()]
        if any(text is None for _, text in items):
            return None
        return "{ " + ", ".join(f"{_toml_key(k)} = {text}" for k, text in items) + " }" \
            if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:  # other control characters are not allowed raw
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
