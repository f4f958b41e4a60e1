"""The evaluation part of a run config: ``[[eval]]`` tables and the adapters' eval fields.

An ``[[eval]]`` table names a task the engine can score adapters on (``mlora evaluate
CONFIG``, and during training for adapters that list it in ``eval_tasks``)::

    [[eval]]
    name = "sentiment"          # what adapters' eval_tasks and the scores call it
    format = "mc"               # one of engine.core.eval_tasks.FORMAT_NAMES
    data = "data/sentiment_eval.jsonl"   # relative to the config file
    limit = 200                 # optional: the first N rows only
    method = "loglik"           # loglik (lm-evaluation-harness's) | letter (m-LoRA's)

An ``[[adapter]]`` may set ``eval_tasks = ["sentiment", ...]`` and ``eval_steps = N``
(evaluate every N optimizer steps and after the last; with neither tasks nor a validation
set there is nothing to evaluate, which is an error). The task files' rows are read by the
engine before training starts (``load_task``); here only what the config says is checked.
No torch: the CLI validates configs without it.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from engine.core.config_file import Where, describe, show, suggestion
from engine.core.config_values import check_data, convert_value
from engine.core.errors import ConfigError, UserError
from engine.core.eval_tasks import FORMAT_NAMES, METHODS, TaskSpec, check_task_spec, load_task


@dataclass
class EvalConfig:
    name: str
    format: str
    data: str                       # resolved against the config's folder
    limit: Optional[int] = None     # None: every row
    method: str = "loglik"          # loglik | letter

    def spec(self, limit: Optional[int] = None) -> TaskSpec:
        """The task as ``engine.core.eval_tasks`` reads it (``limit`` overrides the table's)."""
        return TaskSpec(key=self.name, format=self.format, path=self.data,
                        limit=limit if limit is not None else self.limit, method=self.method)


EVAL_FIELDS = tuple(f.name for f in fields(EvalConfig))
# A task's name is a key of the scores ({task: {metric: value}}) and shown in tables.
EVAL_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}$")
_REQUIRED = {
    "name": "missing: every [[eval]] needs a name (adapters' eval_tasks and the scores use it)",
    "format": "missing: every [[eval]] needs a format (one of " + ", ".join(FORMAT_NAMES) + ")",
    "data": "missing: every [[eval]] needs a data file of the task's rows",
}


def eval_tables(data: dict, source: str) -> list:
    """The document's ``[[eval]]`` tables (none is fine)."""
    value = data.get("eval")
    if value is None:
        return []
    if isinstance(value, dict):
        raise ConfigError("expected [[eval]] tables (double brackets, one per task), got a "
                          "single [eval] table", file=source, table="eval")
    if not isinstance(value, list):
        raise ConfigError(f"expected [[eval]] tables, got {describe(value)}",
                          file=source, field="eval")
    return value


def parse_eval_tables(tables: list, source: str, base_dir: Path) -> list[EvalConfig]:
    """Validate ``[[eval]]`` tables (positions count from 1 in messages); names unique."""
    out: list[EvalConfig] = []
    seen: dict[str, int] = {}
    for position, raw in enumerate(tables, start=1):
        evaluation = _parse_eval(raw, position, source, Path(base_dir))
        if evaluation.name in seen:
            raise ConfigError(f'eval[{seen[evaluation.name]}] and eval[{position}] are both named '
                              f'"{evaluation.name}"; each task needs a name of its own (its '
                              "scores are keyed by it)", file=source, table=f"eval[{position}]",
                              field="name")
        seen[evaluation.name] = position
        out.append(evaluation)
    return out


def _parse_eval(raw: Any, position: int, source: str, base_dir: Path) -> EvalConfig:
    where = Where(source, f"eval[{position}]")
    if not isinstance(raw, dict):
        raise where.error(None, f"expected a table, got {describe(raw)}")
    name = raw.get("name")
    if isinstance(name, str) and EVAL_NAME_RE.match(name):
        where = Where(source, f'eval "{name}"')
    for key in raw:
        if key not in EVAL_FIELDS:
            hint = suggestion(key, EVAL_FIELDS) or "; valid keys are " + ", ".join(EVAL_FIELDS)
            raise where.error(key, "unknown key" + hint)
    for key, message in _REQUIRED.items():
        if key not in raw:
            raise where.error(key, message)
    hints = typing.get_type_hints(EvalConfig)
    evaluation = EvalConfig(**{k: convert_value(v, hints[k], where, k) for k, v in raw.items()})
    if not EVAL_NAME_RE.match(evaluation.name):
        raise where.error("name", "expected 1-64 characters from letters, digits, '_', '.', "
                                  f"'+', '-', starting with a letter, digit or '_', got "
                                  f"{show(evaluation.name)}")
    if evaluation.format not in FORMAT_NAMES:
        raise where.error("format", "expected one of " + ", ".join(f'"{f}"' for f in FORMAT_NAMES)
                                    + f", got {show(evaluation.format)}"
                                    + suggestion(evaluation.format, FORMAT_NAMES))
    if evaluation.method not in METHODS:
        raise where.error("method", "expected one of " + ", ".join(f'"{m}"' for m in METHODS)
                                    + f", got {show(evaluation.method)}"
                                    + suggestion(evaluation.method, METHODS))
    if evaluation.limit is not None and evaluation.limit < 1:
        raise where.error("limit", f"expected an integer >= 1 (the first N rows), got "
                                   f"{evaluation.limit}; leave it out to use every row")
    try:    # what eval_tasks knows beyond the above (letter prompts exist for some formats)
        check_task_spec(evaluation.spec())
    except UserError as e:
        raise where.error("method", str(e).replace("use --method loglik",
                                                   'use method = "loglik"')) from None
    evaluation.data = check_data(evaluation.data, base_dir, where)
    return evaluation


# --- the adapters' fields -------------------------------------------------------------------

def convert_eval_tasks(value: Any, where: Where) -> list[str]:
    """``eval_tasks``: a list of [[eval]] names, each once."""
    key = "eval_tasks"
    if not isinstance(value, list):
        raise where.error(key, 'expected a list of [[eval]] names such as ["sentiment"], got '
                               f"{describe(value)}")
    names: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise where.error(key, f"expected a list of strings, got an item {describe(item)}")
        if item in names:
            raise where.error(key, f"expected unique task names, got {show(item)} twice")
        names.append(item)
    return names


def check_adapter_eval_fields(adapter, where: Where) -> None:
    """An adapter's eval_steps needs something to evaluate."""
    if adapter.eval_steps is not None and not adapter.eval_tasks and not adapter.val_set_size:
        raise where.error("eval_steps", "nothing to evaluate: set eval_tasks (names of [[eval]] "
                                        "tables) or val_set_size, or remove eval_steps")


def check_eval_names(adapters, evals: list[EvalConfig], source: str) -> None:
    """Every adapter's ``eval_tasks`` names an ``[[eval]]`` table of ``evals``."""
    known = [e.name for e in evals]
    for adapter in adapters:
        for name in adapter.eval_tasks:
            if name not in known:
                tables = (("the [[eval]] tables are " + ", ".join(f'"{k}"' for k in known))
                          if known else "the config has no [[eval]] table")
                raise ConfigError(f"unknown task {show(name)}: {tables}"
                                  + suggestion(name, known),
                                  file=source, table=f'adapter "{adapter.name}"',
                                  field="eval_tasks")


def load_eval_tasks(evals: list[EvalConfig], source: str) -> dict[str, tuple[TaskSpec, list]]:
    """Every ``[[eval]]`` table's task, read and checked: {name: (spec, items)}.

    A bad file (a row missing a column, an empty task, ...) is a ``ConfigError`` naming the
    table, so it stops a run before training starts.
    """
    out = {}
    for evaluation in evals:
        spec = evaluation.spec()
        try:
            out[evaluation.name] = (spec, load_task(spec))
        except ConfigError:
            raise
        except UserError as e:
            raise ConfigError(str(e), file=source, table=f'eval "{evaluation.name}"',
                              field="data") from None
    return out
