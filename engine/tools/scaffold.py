"""`mlora gen`: a ready run config from a template and task files, as m-LoRA's `launch.py gen`.

A template (``configs/templates/NAME.toml``, or any file of that shape) holds ``[model]``,
``[train]`` and one ``[adapter]`` table of defaults. Each task file (a JSON or JSONL data
file) becomes one ``[[adapter]]``: named after the file, its data the file, its target
modules the base model family's defaults unless the template sets them. The result is
checked by the config loader before it is returned, so a generated config always
validates. No torch.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from engine.core.config import ADAPTER_NAME_RE, DEMO_MODEL, parse_config
from engine.tools.convert import toml_assignment
from engine.core.errors import ConfigError, UserError
from engine.core.families import DEFAULT_TARGETS, model_type_of

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "configs" / "templates"
_SECTIONS = ("model", "train", "adapter")
# The feed-forward projections of each family: a MixLoRA adapter's experts go there, so a
# MixLoRA template's adapters target them besides the family's default (attention) targets.
_GATED = ["gate_proj", "up_proj", "down_proj"]
FEED_FORWARD_TARGETS: dict[str, list[str]] = {
    **{t: _GATED for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                           "gemma3_text", "gemma3")},
    "phi": ["fc1", "fc2"],
    **{t: ["gate_up_proj", "down_proj"] for t in ("phi3", "glm", "glm4")},
}


def list_templates() -> dict[str, str]:
    """Template name -> its description, for the templates shipped in configs/templates."""
    found = {}
    for path in sorted(TEMPLATES_DIR.glob("*.toml")):
        found[path.stem] = str(_read_template(path).get("description", ""))
    return found


def generate_config(template: str, tasks: list[str], *, out_path: str | os.PathLike,
                    model: dict[str, Any] | None = None, train: dict[str, Any] | None = None,
                    adapter: dict[str, Any] | None = None) -> str:
    """The TOML text of a config made from ``template`` with one adapter per task file.

    ``model``, ``train`` and ``adapter`` override the template's tables. Data paths are
    written relative to the folder of ``out_path`` (where the config will be saved), which
    is how the config loader resolves them.
    """
    doc = _read_template(_template_path(template))
    sections = {name: {**doc.get(name, {}), **(overrides or {})}
                for name, overrides in (("model", model), ("train", train),
                                        ("adapter", adapter))}
    if not tasks:
        raise UserError("give at least one task file (--tasks a.json;b.jsonl)")
    config_dir = Path(os.path.abspath(out_path)).parent
    base_model = str(sections["model"].get("base_model", DEMO_MODEL))
    if model and "base_model" in model and base_model != DEMO_MODEL:
        # Typed on a command line: relative to the current directory, not to the config.
        sections["model"]["base_model"] = _path_from(config_dir, Path(os.path.abspath(base_model)))
    targets = sections["adapter"].get("target_modules")
    model_type = model_type_of(base_model)
    if targets is None and model_type in DEFAULT_TARGETS:
        targets = DEFAULT_TARGETS[model_type]
        if sections["adapter"].get("routing_strategy"):   # MixLoRA: experts on the FFN
            targets = list(targets) + FEED_FORWARD_TARGETS.get(model_type, [])

    adapters, names = [], set()
    for task in tasks:
        path = Path(os.path.abspath(task))
        if not path.is_file():
            raise UserError(f"task file {task}: no such file")
        name = _unique(_adapter_name(path), names)
        names.add(name.lower())
        table = {"name": name, "data": _path_from(config_dir, path), **sections["adapter"]}
        if targets is not None:
            table["target_modules"] = list(targets)
        adapters.append(table)

    lines = [f"# Made by `mlora gen --template {template}` from {len(tasks)} task file(s).",
             "# Paths are relative to this file; output_dir to where mlora runs."]
    if targets is None:
        lines.append(f"# target_modules: no default known for model type {model_type!r}; "
                     f"each adapter needs them.")
    for name in ("model", "train"):
        lines += ["", f"[{name}]"] + [toml_assignment(k, v) for k, v in sections[name].items()]
    for table in adapters:
        lines += ["", "[[adapter]]"] + [toml_assignment(k, v) for k, v in table.items()]
    text = "\n".join(lines) + "\n"
    # What we write must load: check it with the loader itself, resolving paths from
    # where the file will be.
    parse_config(tomllib.loads(text), str(out_path), config_dir)
    return text


def _path_from(config_dir: Path, path: Path) -> str:
    """``path`` as the config will hold it: relative when it lies below the config's folder."""
    relative = os.path.relpath(path, config_dir)
    return str(path) if relative.startswith("..") else relative


def _template_path(template: str) -> Path:
    if template.endswith(".toml"):
        path = Path(template)
        if not path.is_file():
            raise UserError(f"template file {template}: no such file")
        return path
    path = TEMPLATES_DIR / f"{template}.toml"
    if not path.is_file():
        names = list(list_templates())
        close = difflib.get_close_matches(template, names, n=1)
        hint = f'; did you mean "{close[0]}"?' if close else ""
        raise UserError(f"unknown template {template!r}{hint} Templates: "
                        f"{', '.join(names) or 'none'} (mlora gen --list), or a path to a "
                        f".toml template")
    return path


def _read_template(path: Path) -> dict[str, Any]:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the template: {exc}", file=str(path)) from None
    for key, value in doc.items():
        if key == "description":
            continue
        if key not in _SECTIONS or not isinstance(value, dict):
            raise ConfigError(f"a template holds description, [model], [train] and one "
                              f"[adapter] table; got {key!r}", file=str(path))
    return doc


def _adapter_name(path: Path) -> str:
    """A valid adapter name from a file name ("my task.jsonl" -> "my_task")."""
    stem = path.name.split(".")[0]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._-")[:64] or "task"
    return name if ADAPTER_NAME_RE.match(name) else f"task_{name}"[:64]


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate.lower() in taken:
        candidate = f"{name}_{n}"
        n += 1
    return candidate
