"""What ``mlora evaluate CONFIG`` evaluates: a run config's saved adapters on its tasks.

``config_evaluation`` reads the config (validated as for training), finds the adapters the
run has saved (``output_dir/<name>`` holding ``adapter_config.json``) and turns its
``[[eval]]`` tables into ``TaskSpec``s. No torch: the CLI plans before loading a model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from engine.core.config import load_config
from engine.core.errors import UserError
from engine.core.eval_tasks import TaskSpec

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class EvalPlan:
    adapters: list[Path]         # saved adapter folders, in the config's order
    tasks: list[TaskSpec]        # one per [[eval]] table
    base_model: str              # [model] base_model: the demo model's name or a local folder
    dtype: str = "fp32"
    quantize: str = "none"
    missing: list[str] = field(default_factory=list)   # adapters of the config not saved yet


def config_evaluation(config_path: str | os.PathLike, limit: Optional[int] = None) -> EvalPlan:
    """The plan of evaluating ``config_path``'s run; ``limit`` overrides every task's.

    ``ConfigError`` for a bad config; ``UserError`` when no adapter is saved yet or the
    config has no ``[[eval]]`` table.
    """
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    config = load_config(config_path)
    output_dir = Path(config.train.output_dir)
    saved, missing = [], []
    for adapter in config.adapters:
        folder = output_dir / adapter.name
        if (folder / ADAPTER_CONFIG).is_file():
            saved.append(folder)
        else:
            missing.append(adapter.name)
    if not saved:
        names = ", ".join(a.name for a in config.adapters)
        raise UserError(f"{config_path}: no adapter of this run is saved yet (looked for "
                        f"{output_dir}/<name>/{ADAPTER_CONFIG} for {names}); train it first "
                        "(mlora run / mlora serve), or evaluate adapter folders with "
                        "--adapter and --task")
    if not config.evals:
        raise UserError(f"{config_path}: the config has no [[eval]] table; add one (name, "
                        "format, data) or give tasks with --task")
    return EvalPlan(adapters=saved, tasks=[e.spec(limit) for e in config.evals],
                    base_model=config.model.base_model, dtype=config.model.dtype,
                    quantize=config.model.quantize, missing=missing)
