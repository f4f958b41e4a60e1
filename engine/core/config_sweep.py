"""Hyperparameter sweeps in a run config: ``[[sweep]]`` tables. No torch, no Optuna.

A sweep is a source of jobs: each trial is an ordinary ``[[adapter]]`` made of the sweep's
``base`` fields plus the trial's parameters, named ``<sweep>-<k>``::

    [[sweep]]
    name = "lr"
    base = { data = "data/x.jsonl", r = 8, val_set_size = 20, num_epochs = 3 }
    grid = { lr = [1e-4, 3e-4, 1e-3], r = [8, 16] }       # every combination, in this order
    # or: sample = { lr = { log_uniform = [1e-5, 1e-3] }, r = { choice = [8, 16] } }
    #     trials = 12, sampler = "tpe" (tpe | random)
    metric = "eval_loss"            # or "<[[eval]] name>.<acc | acc_norm | loss | perplexity>"
    direction = "minimize"
    prune = "asha"                  # asha | hyperband | median | none
    eval_steps = 10                 # the trials report the metric every 10 optimizer steps
    parallel = 4                    # trials training at once
    seed = 0                        # sampling and every trial's seed derive from it

Here the tables are checked (every grid trial, and a sampled trial at each range's ends,
is validated as an ``[[adapter]]`` would be); engine/train/sweeps.py runs them with Optuna.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

from engine.core.config_file import Where, describe, show, suggestion
from engine.core.errors import ConfigError

SAMPLERS = ("tpe", "random")
PRUNERS = ("asha", "hyperband", "median", "none")
DIRECTIONS = ("minimize", "maximize")
DISTRIBUTIONS = ("log_uniform", "uniform", "int_uniform", "choice")
# Fields a sweep sets on its trials itself, or that name a trial: never searched or given.
SWEEP_OWNED = ("name", "eval_steps", "seed")
SWEEP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,48}$")
TASK_METRICS = ("acc", "acc_norm", "acc_bytes", "loss", "perplexity")
MAX_TRIALS = 10_000
_MASK = (1 << 31) - 1


@dataclass
class SweepConfig:
    name: str
    base: dict
    metric: str = "eval_loss"
    direction: str = "minimize"
    prune: str = "asha"
    eval_steps: int = 10
    parallel: int = 4
    seed: int = 0
    grid: Optional[dict] = None
    sample: Optional[dict] = None
    trials: Optional[int] = None
    sampler: str = "tpe"
    # Set from metric: the [[eval]] task the trials are scored on ("" for eval_loss).
    task: str = field(default="", compare=False)

    @property
    def n_trials(self) -> int:
        if self.grid is not None:
            count = 1
            for values in self.grid.values():
                count *= len(values)
            return count
        return int(self.trials or 0)

    def trial_name(self, index: int) -> str:
        return f"{self.name}-{index}"

    def trial_seed(self, index: int) -> int:
        """Trial ``index``'s seed: its dropout, data order and sampling derive from it."""
        return trial_seed(self.seed, index)

    def grid_params(self, index: int) -> dict:
        """The ``index``-th combination of the grid, in the order the table gives it."""
        keys = list(self.grid)
        combo = next(itertools.islice(itertools.product(*(self.grid[k] for k in keys)),
                                      index, None))
        return dict(zip(keys, combo))

    def trial_table(self, index: int, params: dict) -> dict:
        """The ``[[adapter]]`` table of trial ``index`` with ``params``."""
        table = {**self.base, **params, "name": self.trial_name(index),
                 "eval_steps": self.eval_steps, "seed": self.trial_seed(index)}
        if self.task:
            tasks = list(table.get("eval_tasks") or [])
            table["eval_tasks"] = tasks + [self.task] if self.task not in tasks else tasks
        return table

    def metric_of(self, result: dict) -> Optional[float]:
        """The sweep's metric from an eval event's fields (None when it is not there)."""
        if not self.task:
            return result.get("eval_loss")
        metric = self.metric.split(".", 1)[1]
        value = (result.get("scores") or {}).get(self.task, {}).get(metric)
        return None if value is None else float(value)


def trial_seed(sweep_seed: int, index: int) -> int:
    """A well-spread 31-bit seed from (sweep seed, trial index), the same everywhere."""
    state = (sweep_seed * 0x9E3779B1 + (index + 1) * 0x85EBCA77) & 0xFFFFFFFF
    state ^= state >> 15
    state = (state * 0x2C1B3C6D) & 0xFFFFFFFF
    state ^= state >> 12
    return state & _MASK


def sweep_tables(data: dict, source: str) -> list:
    value = data.get("sweep")
    if value is None:
        return []
    if isinstance(value, dict):
        raise ConfigError("expected [[sweep]] tables (double brackets, one per sweep), got a "
                          "single [sweep] table", file=source, table="sweep")
    if not isinstance(value, list):
        raise ConfigError(f"expected [[sweep]] tables, got {describe(value)}",
                          file=source, field="sweep")
    return value


TrialCheck = Callable[[dict, Where], Any]   # validates one trial's [[adapter]] table


def parse_sweep_tables(tables: list, source: str, adapter_fields: tuple[str, ...],
                       eval_names: dict[str, str], check_trial: TrialCheck,
                       taken: set[str]) -> list[SweepConfig]:
    """Validate ``[[sweep]]`` tables. ``eval_names``: [[eval]] name -> format;
    ``check_trial(table, where)`` validates a trial's ``[[adapter]]`` table; ``taken``:
    lower-cased names of the config's adapters (trial names may not clash with them)."""
    sweeps: list[SweepConfig] = []
    for position, raw in enumerate(tables, start=1):
        sweep = _parse_sweep(raw, position, source, adapter_fields, eval_names, check_trial)
        clash = next((sweep.trial_name(k) for k in range(sweep.n_trials)
                      if sweep.trial_name(k).lower() in taken), None)
        if clash or any(s.name.lower() == sweep.name.lower() for s in sweeps):
            raise ConfigError(f'the trial name "{clash or sweep.name}" is taken (an adapter, or '
                              "another sweep, has that name); rename the sweep", file=source,
                              table=f'sweep "{sweep.name}"', field="name")
        sweeps.append(sweep)
    return sweeps


def _parse_sweep(raw: Any, position: int, source: str, adapter_fields: tuple[str, ...],
                 eval_names: dict[str, str], check_trial: TrialCheck) -> SweepConfig:
    where = Where(source, f"sweep[{position}]")
    if not isinstance(raw, dict):
        raise where.error(None, f"expected a table, got {describe(raw)}")
    known = [f.name for f in fields(SweepConfig) if f.name != "task"]
    for key in raw:
        if key not in known:
            raise where.error(key, f"unknown field{suggestion(key, known)}; a [[sweep]] has "
                                   + ", ".join(known))
    name = raw.get("name")
    if not isinstance(name, str) or not SWEEP_NAME_RE.match(name):
        raise where.error("name", "expected 1-49 characters from letters, digits, '_', '.', "
                                  f"'-' (trials are named <name>-0, <name>-1, ...), got "
                                  f"{show(name)}")
    where = Where(source, f'sweep "{name}"')
    base = raw.get("base")
    if not isinstance(base, dict) or not base:
        raise where.error("base", "expected a table of [[adapter]] fields (at least data), got "
                                  f"{show(base)}")
    _check_fields(base, "base", adapter_fields, where)
    sweep = SweepConfig(name=name, base=dict(base))
    for key, kind, rule in (("metric", str, None), ("direction", str, DIRECTIONS),
                            ("prune", str, PRUNERS), ("sampler", str, SAMPLERS),
                            ("eval_steps", int, 1), ("parallel", int, 1), ("seed", int, 0),
                            ("trials", int, 1)):
        if key in raw:
            setattr(sweep, key, _scalar(raw[key], key, kind, rule, where))
    if ("grid" in raw) == ("sample" in raw):
        raise where.error("grid", "give either grid (every combination) or sample (with "
                                  "trials), not both and not neither")
    if "grid" in raw:
        sweep.grid = _grid(raw["grid"], adapter_fields, where)
        if "trials" in raw:
            raise where.error("trials", "a grid runs every combination; trials is for sample")
    else:
        sweep.sample = _sample(raw["sample"], adapter_fields, where)
        if sweep.trials is None:
            raise where.error("trials", "missing: a sampled sweep needs trials = N")
    if sweep.n_trials > MAX_TRIALS:
        raise where.error("grid" if sweep.grid else "trials",
                          f"{sweep.n_trials} trials is more than {MAX_TRIALS}")
    _check_metric(sweep, eval_names, where)
    for table in _representative_trials(sweep):
        check_trial(table, where)
    return sweep


def _check_fields(table: dict, what: str, adapter_fields: tuple[str, ...], where: Where,
                  owned: tuple[str, ...] = SWEEP_OWNED) -> None:
    for key in table:
        if key in owned:
            raise where.error(f"{what}.{key}", f"{key} is set by the sweep for each trial "
                                               "(name, eval_steps and seed derive from it); "
                                               "leave it out")
        if key not in adapter_fields:
            raise where.error(f"{what}.{key}", "not an [[adapter]] field"
                                               f"{suggestion(key, adapter_fields)}")


def _scalar(value: Any, key: str, kind: type, rule: Any, where: Where) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise where.error(key, f"expected {'an integer' if kind is int else 'a string'}, got "
                               f"{describe(value)}")
    if isinstance(rule, tuple) and value not in rule:
        raise where.error(key, f"expected one of {', '.join(rule)}, got {show(value)}"
                               f"{suggestion(value, rule)}")
    if isinstance(rule, int) and value < rule:
        raise where.error(key, f"expected an integer >= {rule}, got {value}")
    return value


def _grid(grid: Any, adapter_fields: tuple[str, ...], where: Where) -> dict:
    if not isinstance(grid, dict) or not grid:
        raise where.error("grid", "expected a table of field = [values, ...] with at least one "
                                  f"field, got {show(grid)}")
    _check_fields(grid, "grid", adapter_fields, where)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise where.error(f"grid.{key}", "expected a non-empty list of values, got "
                                             f"{show(values)}")
    return dict(grid)


def _sample(sample: Any, adapter_fields: tuple[str, ...], where: Where) -> dict:
    if not isinstance(sample, dict) or not sample:
        raise where.error("sample", "expected a table of field = { log_uniform | uniform | "
                                    f"int_uniform | choice = ... }}, got {show(sample)}")
    _check_fields(sample, "sample", adapter_fields, where, owned=SWEEP_OWNED + ("data",))
    for key, spec in sample.items():
        at = f"sample.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise where.error(at, "expected one of { log_uniform = [low, high] }, { uniform = "
                                  "[low, high] }, { int_uniform = [low, high] }, { choice = "
                                  f"[values] }}, got {show(spec)}")
        kind, value = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(value, list) or not value:
                raise where.error(at, f"choice: expected a non-empty list, got {show(value)}")
            continue
        numbers = isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if not numbers or not value[0] < value[1]:
            raise where.error(at, f"{kind}: expected [low, high] with low < high, got "
                                  f"{show(value)}")
        if kind == "log_uniform" and value[0] <= 0:
            raise where.error(at, f"log_uniform: low must be > 0, got {value[0]}")
        if kind == "int_uniform" and not all(isinstance(v, int) for v in value):
            raise where.error(at, f"int_uniform: expected two integers, got {show(value)}")
    return dict(sample)


def _check_metric(sweep: SweepConfig, eval_names: dict[str, str], where: Where) -> None:
    if sweep.metric == "eval_loss":
        if not (isinstance(sweep.base.get("val_set_size"), int)
                and sweep.base["val_set_size"] > 0):
            raise where.error("metric", "eval_loss needs a validation set: set val_set_size "
                                        "(> 0) in base")
        return
    task, _, metric = sweep.metric.partition(".")
    if task not in eval_names or metric not in TASK_METRICS:
        known = ", ".join(f'"{n}.acc"' for n in eval_names) or "none: add an [[eval]] table"
        raise where.error("metric", f'expected "eval_loss" or "<[[eval]] name>.<metric>" '
                                    f"(metric one of {', '.join(TASK_METRICS)}), got "
                                    f"{show(sweep.metric)}; [[eval]] tasks: {known}")
    sweep.task = task


def _representative_trials(sweep: SweepConfig) -> list[dict]:
    """Tables to validate: every grid trial, or a sampled trial at each range's ends."""
    if sweep.grid is not None:
        return [sweep.trial_table(k, sweep.grid_params(k)) for k in range(sweep.n_trials)]
    ends: list[dict] = [{}, {}]
    for key, spec in sweep.sample.items():
        kind, value = next(iter(spec.items()))
        ends[0][key] = value[0]
        ends[1][key] = value[-1]
    return [sweep.trial_table(0, ends[0]), sweep.trial_table(0, ends[1])]
