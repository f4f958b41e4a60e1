"""Checking one value of a config file: its TOML type, its range or choices, the files it names.

Each check raises a ``ConfigError`` that names the file, the table and the field, and shows
the value as it was written. Which rule applies to which field is decided by the tables in
``engine.core.config``; this module holds the rules themselves.
"""

from __future__ import annotations

import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine.core.config_file import Where, describe, show, suggestion
from engine.core.prompts import BUILTIN_TEMPLATE_NAMES

# Only the linear layers inside decoder blocks can carry an adapter.
UNSUPPORTED_TARGETS = ("lm_head", "embed_tokens")
_TARGET_NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")


# --- types --------------------------------------------------------------------------------

def convert_value(value: Any, hint: Any, where: Where, key: str) -> Any:
    """``value`` as read from TOML, checked against the field's type ``hint``."""
    # Optional[X] or X | None: TOML has no null, so the value is an X.
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise where.error(key, f"expected true or false, got {describe(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise where.error(key, f"expected an integer, got {describe(value)}")
    if hint is float:
        # Integers are fine where a number is expected (lora_alpha = 16).
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise where.error(key, f"expected a finite number, got {show(value)}")
            return float(value)
        raise where.error(key, f"expected a number, got {describe(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise where.error(key, f"expected a string, got {describe(value)}")
    raise TypeError(f"no conversion for field type {hint!r}")  # a new field type: add it here


def convert_targets(value: Any, where: Where) -> list[str]:
    """A list of module names, or m-LoRA's table of name = true/false (the true ones kept)."""
    key = "target_modules"
    if isinstance(value, dict):
        for name, enabled in value.items():
            if not isinstance(enabled, bool):
                raise where.error(key, f"expected true or false for module {show(name)}, "
                                       f"got {describe(enabled)}")
        names = [name for name, enabled in value.items() if enabled]
        if not names:
            raise where.error(key, "expected at least one module set to true, got none; leave "
                                   "target_modules out to use the model family's defaults")
    elif isinstance(value, list):
        if not value:
            raise where.error(key, "expected a non-empty list of module names; leave "
                                   "target_modules out to use the model family's defaults")
        names = []
        for item in value:
            if not isinstance(item, str):
                raise where.error(key, f"expected a list of strings, got an item {describe(item)}")
            if item in names:
                raise where.error(key, f"expected unique module names, got {show(item)} twice")
            names.append(item)
    else:
        raise where.error(key, 'expected a list of module names such as ["q_proj", "v_proj"] '
                               f"(or a table of name = true/false), got {describe(value)}")
    for name in names:
        if name in UNSUPPORTED_TARGETS:
            raise where.error(key, f"{show(name)} cannot be a target: only linear layers inside "
                                   "decoder blocks (e.g. q_proj, v_proj, up_proj) are supported")
        if not _TARGET_NAME_RE.match(name):
            raise where.error(key, f"expected module names of letters, digits, '_' and '.', "
                                   f"got {show(name)}")
    return names


# --- value rules --------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    expected: str        # completes "expected ...", e.g. "an integer >= 1"
    choices: tuple = ()  # for "did you mean" on enumerations


def int_at_least(low: int) -> Rule:
    return Rule(lambda v: v >= low, f"an integer >= {low}")


def int_between(low: int, high: int) -> Rule:
    return Rule(lambda v: low <= v <= high, f"an integer from {low} to {high}")


def number(low: float, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False) -> Rule:
    def ok(v: float) -> bool:
        above = v > low if low_open else v >= low
        below = high is None or (v < high if high_open else v <= high)
        return above and below
    text = f"a number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        text += f" and {'<' if high_open else '<='} {high:g}"
    return Rule(ok, text)


def one_of(choices: tuple[str, ...]) -> Rule:
    return Rule(lambda v: v in choices, "one of " + ", ".join(f'"{c}"' for c in choices), choices)


NON_EMPTY = Rule(lambda v: v.strip() != "", "a non-empty string")


def apply_rules(obj: Any, rules: dict[str, Rule], where: Where, raw: dict) -> None:
    for key, rule in rules.items():
        value = getattr(obj, key)
        if value is None or rule.ok(value):  # None: an optional field left out
            continue
        # Show the value as written ("lr = 10" -> 10, not the converted 10.0).
        message = f"expected {rule.expected}, got {show(raw.get(key, value))}"
        if rule.choices:
            message += suggestion(str(value), rule.choices)
        raise where.error(key, message)


# --- paths --------------------------------------------------------------------------------

def resolve_path(value: str, base_dir: Path) -> Path:
    return Path(os.path.abspath(base_dir / os.path.expanduser(value)))


def check_data(value: str, base_dir: Path, where: Where) -> str:
    if not value.strip():
        raise where.error("data", "expected a path to a data file, got an empty string")
    path = resolve_path(value, base_dir)
    if not path.exists():
        raise where.error("data", f"file not found: {value} (looked for {path})")
    if not path.is_file():
        raise where.error("data", f"expected a file, got a folder: {path}")
    if path.stat().st_size == 0:
        raise where.error("data", f"the data file is empty: {path}")
    return str(path)


def check_prompt(value: str, base_dir: Path, where: Where) -> str:
    if value in BUILTIN_TEMPLATE_NAMES:
        return value
    names = ", ".join(f'"{n}"' for n in sorted(BUILTIN_TEMPLATE_NAMES))
    looks_like_path = value.lower().endswith(".json") or "/" in value or os.sep in value
    if not looks_like_path:
        raise where.error("prompt", f"expected a built-in template ({names}) or a path to a "
                                    f"template JSON file, got {show(value)}"
                                    + suggestion(value, sorted(BUILTIN_TEMPLATE_NAMES)))
    path = resolve_path(value, base_dir)
    if not path.is_file():
        raise where.error("prompt", f"template file not found: {value} (looked for {path}); "
                                    f"built-in templates are {names}")
    return str(path)


def check_init_from(value: str, base_dir: Path, where: Where) -> str:
    if value == "":
        return value
    path = resolve_path(value, base_dir)
    if not path.is_dir():
        raise where.error("init_from", f"expected a PEFT adapter folder, got {show(value)}: "
                                       f"no folder at {path}")
    if not (path / "adapter_config.json").is_file():
        raise where.error("init_from", f"expected an adapter folder holding adapter_config.json, "
                                       f"got {path} (no adapter_config.json there)")
    return str(path)


# --- experiment trackers ([train] report_to; engine/train/trackers.py) ----------------------

# Each tracker: the module its library imports as, and the extra that installs it.
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}


def convert_report_to(value: Any, where: Where) -> list[str]:
    """A list of tracker names, each one's library importable (found, not imported)."""
    import importlib.util

    key = "report_to"
    names = ", ".join(f'"{n}"' for n in TRACKERS)
    if not isinstance(value, list):
        raise where.error(key, f"expected a list of tracker names (any of {names}), "
                               f"got {describe(value)}")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise where.error(key, f"expected a list of strings, got an item {describe(item)}")
        if item not in TRACKERS:
            raise where.error(key, f"unknown tracker {show(item)}; expected any of {names}"
                                   + suggestion(item, TRACKERS))
        if item in out:
            raise where.error(key, f"expected unique tracker names, got {show(item)} twice")
        module, extra = TRACKERS[item]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise where.error(key, f"{show(item)} needs the {module} package, which is not "
                                   f"installed: pip install 'mlora-tui[{extra}]'")
        out.append(item)
    return out
