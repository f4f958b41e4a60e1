"""The one check before an engine starts: config, data files and output folder. No torch.

`mlora run`, `mlora validate`, `mlora-tui CONFIG` and the launcher (``ensure_engine``) all
call ``preflight`` and nothing else, so a mistake gets the same message (and exit code 2)
whichever front end meets it, before any process starts or any model loads, and each data
file is read once in the front end (the engine reads it again, to tokenize it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.config import RunConfig, apply_model_overrides, load_config
from engine.core.config_eval import load_eval_tasks
from engine.core.data_files import load_data_file
from engine.core.errors import UserError
from engine.core.outputs import check_output_dir, set_aside_run
from engine.core.runtime import EngineRecord, find_engine


@dataclass(frozen=True)
class DataSummary:
    """What one adapter's data file holds (`mlora validate` prints it)."""

    adapter: str
    path: str
    rows: int
    kind: str        # alpaca | chat | text (engine.core.data_files.row_kind)


@dataclass(frozen=True)
class Preflight:
    """A config that passed the checks, and what the checks found."""

    config: RunConfig
    data: list[DataSummary]
    output_dir: Path                    # absolute
    # The engine already serving output_dir when the folder was looked at: a caller
    # attaches to it, and the folder was not checked (it is that engine's run).
    running: EngineRecord | None = None
    moved: Path | None = None           # where --overwrite moved the previous run
    output_checked: bool = False


def preflight(config_path: str | os.PathLike, *, model_overrides: dict[str, Any] | None = None,
              resume: bool = False, overwrite: bool = False,
              check_output: bool = True) -> Preflight:
    """Load the config, apply ``model_overrides`` (``[model]`` fields from the command
    line), read every adapter's data file once, and, with ``check_output``, look at the
    output folder: skipped when an engine already serves it; else refused when it holds
    another run, unless ``resume`` (same settings) or ``overwrite`` (the old run is moved
    into ``replaced-TIME/`` here). Raises UserError naming the file, table and field.
    """
    config = load_config(config_path)
    if model_overrides:
        apply_model_overrides(config, model_overrides)
    data = [_summary(adapter.name, adapter.data) for adapter in config.adapters]
    for sweep in config.sweeps:     # every data file a trial may train on
        files = sweep.grid.get("data") if sweep.grid and "data" in sweep.grid else [
            sweep.base.get("data")]
        data += [_summary(f"sweep {sweep.name}", path) for path in files if path]
    load_eval_tasks(config.evals, config.source)    # a bad [[eval]] task file stops it here
    output_dir = Path(os.path.abspath(config.train.output_dir))
    if not check_output:
        return Preflight(config, data, output_dir)
    running = find_engine(output_dir=output_dir)
    if running is not None:
        return Preflight(config, data, output_dir, running=running)
    check_output_dir(config, resume=resume, overwrite=overwrite)
    moved = None
    if overwrite:
        try:
            moved = set_aside_run(output_dir)
        except OSError as e:
            raise UserError(f"cannot set the previous run in {output_dir} aside: {e}") from None
    return Preflight(config, data, output_dir, moved=moved, output_checked=True)


def _summary(adapter: str, path: str) -> DataSummary:
    try:
        data = load_data_file(path)
    except UserError as e:
        raise UserError(f"{e} (data of adapter {adapter!r})") from None
    return DataSummary(adapter, data.path, len(data.rows), data.kind)
