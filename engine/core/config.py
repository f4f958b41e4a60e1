"""The run configuration: dataclasses for the TOML file and its validation.

One file holds ``[model]``, ``[train]``, a list of ``[[adapter]]`` tables and optional
``[[eval]]`` tables (engine.core.config_eval). Field names
follow m-LoRA's where one exists. ``load_config`` validates everything that can be checked
without loading a model and raises ``ConfigError`` naming file, table and field.
``load_adapter_file`` / ``parse_adapter_tables`` validate ``[[adapter]]`` tables added to a
running engine. What needs the model or the data's contents (module names of the model
family, whether ``output_dir`` holds another run, data rows) is checked by the engine.
Here: the fields, which rule applies to each, and the tables' checks; reading the file and
the wording of errors are in ``engine.core.config_file``, the checks of one value (type,
range, path) in ``engine.core.config_values``.
This module never imports torch: the CLI validates configs without it.
"""

from __future__ import annotations

import os
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Optional

from engine.core.config_sweep import SweepConfig, parse_sweep_tables, sweep_tables
from engine.core.config_eval import (EvalConfig, check_adapter_eval_fields, check_eval_names,
                                     convert_eval_tasks, eval_tables, parse_eval_tables)
from engine.core.config_file import (Where, adapter_tables, describe, read_toml, show,
                                     single_table, suggestion)
from engine.core.config_values import (NON_EMPTY, apply_rules, check_data, check_init_from,
                                       check_prompt, convert_report_to, convert_targets,
                                       convert_value,
                                       int_at_least, int_between, number, one_of, resolve_path)
from engine.core.errors import ConfigError


@dataclass
class ModelConfig:
    base_model: str = "smollm2-135m"   # bundled demo model, or a local HF model folder
    dtype: str = "fp32"                # fp32 | bf16 | fp16
    tf32: bool = False
    attn_impl: str = "auto"            # auto | eager | sdpa | flash_attn
    quantize: str = "none"             # none | 4bit (QLoRA: nf4, double quant) | 8bit
    trust_remote_code: bool = False


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo"
    seed: int = 42
    cutoff_len: int = 256
    save_step: int = 100
    save_total_limit: int = 3          # engine checkpoints kept (the newest); 0 keeps all
    train_lora_simultaneously_num: int = 4
    # Rows x padded length of one forward pass at most; a step whose micro-batches hold
    # more runs as several passes (0: no limit).
    max_tokens_per_step: int = 0
    # Admission control: a queued job starts only if the estimated peak memory of a step
    # with it and the running jobs fits in this many GiB (0: the GPU's memory; on CPU, none).
    memory_limit_gb: float = 0
    gradient_checkpointing: bool = False
    # Sequence packing (engine/train/packing.py): each pass's examples back to back in one row,
    # no padding. "auto": on a CPU, where padding costs its full share of the arithmetic;
    # "on": on any device (an error if the model cannot pack); "off": padded rows.
    packing: str = "auto"
    # Experiment trackers every job's metrics also go to (engine/train/trackers.py): any of
    # "tensorboard", "wandb", "mlflow", "trackio"; offline, under output_dir, by default.
    report_to: list[str] = field(default_factory=list)


@dataclass
class AdapterConfig:
    name: str
    data: str
    prompt: str = "alpaca"            # built-in template name, or an m-LoRA template JSON path
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: Optional[list[str]] = None   # None: the model family's default targets
    use_rslora: bool = False
    use_dora: bool = False
    loraplus_lr_ratio: float = 1.0
    optim: str = "adamw"              # adamw | sgd
    lr: float = 3e-4
    momentum: float = 0.0             # sgd only
    weight_decay: float = 0.0
    batch_size: int = 16
    micro_batch_size: int = 4
    num_epochs: int = 2
    scheduler_type: str = "constant"  # constant | linear | cosine
    warmup_ratio: float = 0.0
    warmup_steps: Optional[int] = None
    cutoff_len: Optional[int] = None  # None: [train] cutoff_len
    train_on_inputs: bool = False
    val_set_size: int = 0
    group_by_length: bool = False
    max_grad_norm: Optional[float] = None
    init_from: str = ""               # a PEFT adapter folder to continue training from
    seed: Optional[int] = None        # None: [train] seed
    # Evaluation during training (engine/core/config_eval.py): [[eval]] task names, scored
    # after the last step, and every eval_steps optimizer steps (with the validation loss).
    eval_tasks: list[str] = field(default_factory=list)
    eval_steps: Optional[int] = None
    # MixLoRA (engine/train/variants/mixlora/, docs/mixlora.md): a mixture of LoRA experts on the
    # feed-forward blocks. routing_strategy None: a plain LoRA adapter, and every field below
    # must be left out. Set, the fields left out take the strategy's defaults (MIXLORA_DEFAULTS).
    routing_strategy: Optional[str] = None   # mixlora (top-k) | mixlora-switch | mixlora-dynamic
    num_experts: Optional[int] = None
    top_k: Optional[int] = None              # mixlora only
    top_p: Optional[float] = None            # mixlora-dynamic only
    temperature: Optional[float] = None      # router softmax temperature; 0: none
    router_aux_loss_coef: Optional[float] = None
    router_z_loss_coef: Optional[float] = None
    router_init_range: Optional[float] = None
    jitter_noise: Optional[float] = None
    expert_capacity: Optional[int] = None    # mixlora-switch only
    ffn_dropout: Optional[float] = None
    sparse_step: Optional[int] = None
    act_fn: Optional[str] = None             # None: the feed-forward's own activation
    expert_lora: Optional[dict] = None       # the experts' LoRA fields (EXPERT_LORA_FIELDS)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapters: list[AdapterConfig] = field(default_factory=list)
    evals: list[EvalConfig] = field(default_factory=list)   # [[eval]] tables
    sweeps: list[SweepConfig] = field(default_factory=list)  # [[sweep]] tables
    source: str = "<config>"          # the file the config came from (for messages)


# ----------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------

DEMO_MODEL = "smollm2-135m"
DTYPES = ("fp32", "bf16", "fp16")
ATTN_IMPLS = ("auto", "eager", "sdpa", "flash_attn")
QUANTIZE = ("none", "4bit", "8bit")
PACKING = ("auto", "on", "off")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("constant", "linear", "cosine")
# Adapter names become folder names under output_dir, so keep them filesystem-safe.
# Files and folders of a run (output_dir) and of a checkpoint (checkpoints/step-K), beside
# the adapters' own folders: an adapter may not take their names.
RESERVED_ADAPTER_NAMES = {"checkpoints", "metrics.jsonl", "engine.log", "run.json",
                          "engine.json", "rng.pt", "tensorboard", "wandb", "mlruns", "trackio"}
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_RANK = 1024
MIN_CUTOFF_LEN = 8
MAX_SEED = 2**32 - 1  # numpy's limit; torch accepts more, but seeds should work everywhere

# MixLoRA (m-LoRA's / MoE-PEFT's names and defaults, except where docs/mixlora.md says).
ROUTING_STRATEGIES = ("mixlora", "mixlora-switch", "mixlora-dynamic")
MIXLORA_FIELDS = ("routing_strategy", "num_experts", "top_k", "top_p", "temperature",
                  "router_aux_loss_coef", "router_z_loss_coef", "router_init_range",
                  "jitter_noise", "expert_capacity", "ffn_dropout", "sparse_step", "act_fn",
                  "expert_lora")
EXPERT_LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora")
# Activations transformers' ACT2FN knows (checked again against it when the model loads).
ACT_FNS = ("silu", "swish", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh",
           "gelu_accurate", "gelu_python", "quick_gelu", "relu", "relu2", "relu6",
           "leaky_relu", "mish", "tanh", "sigmoid", "hardswish", "linear")
MAX_EXPERTS = 256
MIXLORA_DEFAULTS = {
    "num_experts": 8, "temperature": 0.0, "router_aux_loss_coef": 0.001,
    "router_init_range": 0.02, "ffn_dropout": 0.0, "sparse_step": 1,
}
_STRATEGY_DEFAULTS = {
    "mixlora": {"top_k": 2, "router_z_loss_coef": 0.0, "jitter_noise": 0.0},
    "mixlora-dynamic": {"top_p": 0.8, "router_z_loss_coef": 0.0, "jitter_noise": 0.0},
    "mixlora-switch": {"expert_capacity": 32, "router_z_loss_coef": 0.001,
                       "jitter_noise": 0.01},
}
# Fields that only one routing strategy reads.
MIXLORA_STRATEGY_ONLY = {"top_k": "mixlora", "top_p": "mixlora-dynamic",
                  "expert_capacity": "mixlora-switch"}


def resolve_mixlora(values: dict) -> dict:
    """The MixLoRA fields of an adapter with its strategy's defaults filled in.

    ``values``: an AdapterConfig's fields (``dataclasses.asdict``) or a saved MixLoRA
    adapter_config.json. ``expert_lora`` comes back complete: each of EXPERT_LORA_FIELDS,
    the adapter's own value where the table does not override it.
    """
    strategy = values.get("routing_strategy")
    if strategy not in _STRATEGY_DEFAULTS:
        raise ValueError(f"not a MixLoRA routing_strategy: {strategy!r}")
    out = {name: values.get(name) for name in MIXLORA_FIELDS if name != "expert_lora"}
    for name, default in {**MIXLORA_DEFAULTS, **_STRATEGY_DEFAULTS[strategy]}.items():
        if out.get(name) is None:
            out[name] = default
    defaults = {f.name: f.default for f in fields(AdapterConfig)}
    expert = dict(values.get("expert_lora") or {})
    for name in EXPERT_LORA_FIELDS:
        if expert.get(name) is None:
            expert[name] = values.get(name, defaults[name])
    out["expert_lora"] = expert
    return out

_TOP_LEVEL_KEYS = ("model", "train", "adapter", "eval", "sweep")

def load_config(path: str | os.PathLike) -> RunConfig:
    """Read and validate a run config file; raise ``ConfigError`` on the first problem.

    Relative paths inside (base_model, data, prompt, init_from) are resolved against the
    file's folder; ``output_dir`` stays relative to the current directory.
    """
    source = str(path)
    data = read_toml(Path(path), source)
    return parse_config(data, source, Path(os.path.abspath(path)).parent)


def parse_config(data: dict, source: str, base_dir: Path) -> RunConfig:
    """Validate an already-parsed TOML document; ``source`` names it in messages."""
    base_dir = Path(base_dir)
    _check_keys(data, _TOP_LEVEL_KEYS, Where(source, None))
    model = _parse_model(single_table(data, "model", source), source, base_dir)
    train = _parse_train(single_table(data, "train", source), source)
    sweep_raw = sweep_tables(data, source)
    tables = adapter_tables(data, source)
    # A config of sweeps alone has no [[adapter]] table: its trials are its jobs.
    adapters = (parse_adapter_tables(tables, source, train, base_dir)
                if tables or not sweep_raw else [])
    evals = parse_eval_tables(eval_tables(data, source), source, base_dir)
    check_eval_names(adapters, evals, source)

    def check_trial(table: dict, where: Where) -> AdapterConfig:
        try:
            trial = _parse_adapter(table, 0, source, train, base_dir)
            check_eval_names([trial], evals, source)
            return trial
        except ConfigError as e:    # named as the sweep's field it comes from
            raise ConfigError(f"trial {table['name']}: {e.detail}", file=source,
                              table=where.table, field=e.field) from None

    sweeps = parse_sweep_tables(sweep_raw, source, _field_names(AdapterConfig),
                                {e.name: e.format for e in evals}, check_trial,
                                {a.name.lower() for a in adapters})
    for sweep in sweeps:    # the trials' files, found from this config's folder
        where = Where(source, f'sweep "{sweep.name}"')
        for key, check in (("data", check_data), ("prompt", check_prompt),
                           ("init_from", check_init_from)):
            if key in sweep.base:
                sweep.base[key] = check(sweep.base[key], base_dir, where)
            if sweep.grid and key in sweep.grid:
                sweep.grid[key] = [check(v, base_dir, where) for v in sweep.grid[key]]
    return RunConfig(model=model, train=train, adapters=adapters, evals=evals, sweeps=sweeps,
                     source=source)


def apply_model_overrides(config: RunConfig, overrides: dict[str, Any],
                          source: str = "command line") -> RunConfig:
    """Replace ``[model]`` fields (m-LoRA's --base_model, --bf16, --load_4bit, ...).

    Checked by the rules of the config file; a relative base_model is taken from the
    current directory, as a path typed on a command line is.
    """
    where = Where(source, "model")
    _check_keys(overrides, [f.name for f in fields(ModelConfig)], where)
    merged = {**{f.name: getattr(config.model, f.name) for f in fields(ModelConfig)},
              **overrides}
    model = ModelConfig(**_typed_fields(ModelConfig, merged, where))
    apply_rules(model, _MODEL_RULES, where, merged)
    if "base_model" in overrides:
        model.base_model = _check_base_model(model.base_model, Path.cwd(), where)
    config.model = model
    return config


def parse_adapter_tables(tables: list[dict], source: str, train: TrainConfig,
                         base_dir: Path) -> list[AdapterConfig]:
    """Validate ``[[adapter]]`` tables (positions count from 1 in messages).

    ``train`` fills what an adapter inherits (cutoff_len, seed) so the result needs no
    further resolving. Names must be unique within ``tables``; clashes with adapters that
    are already running are for the caller to check.
    """
    if not tables:
        raise ConfigError("no [[adapter]] table: a run needs at least one adapter", file=source)
    base_dir = Path(base_dir)
    adapters: list[AdapterConfig] = []
    seen: dict[str, tuple[int, str]] = {}  # lower-cased name -> (1-based position, name)
    for position, raw in enumerate(tables, start=1):
        adapter = _parse_adapter(raw, position, source, train, base_dir)
        # Case-insensitive: "Summ" and "summ" would share a folder on macOS and Windows.
        key = adapter.name.lower()
        if key in seen:
            other, other_name = seen[key]
            if other_name == adapter.name:
                clash = f'adapter[{other}] and adapter[{position}] are both named "{adapter.name}"'
            else:
                clash = (f'"{other_name}" (adapter[{other}]) and "{adapter.name}" '
                         f"(adapter[{position}]) differ only in case")
            raise ConfigError(f"duplicate adapter name: {clash}; names must be unique because "
                              "each becomes a folder under output_dir",
                              file=source, table=f"adapter[{position}]", field="name")
        seen[key] = (position, adapter.name)
        adapters.append(adapter)
    return adapters


def load_adapter_file(path: str | os.PathLike, train: TrainConfig) -> list[AdapterConfig]:
    """Read a TOML file of ``[[adapter]]`` tables to add jobs to a running engine."""
    source = str(path)
    data = read_toml(Path(path), source)
    for key in data:
        if key in ("model", "train"):
            raise ConfigError(
                f"an adapter file holds only [[adapter]] tables; [{key}] comes from the running "
                "engine's config and cannot change here", file=source, table=key)
    _check_keys(data, ("adapter",), Where(source, None))
    return parse_adapter_tables(adapter_tables(data, source), source, train,
                                Path(os.path.abspath(path)).parent)


# --- the three kinds of table -------------------------------------------------------------

def _parse_model(raw: dict, source: str, base_dir: Path) -> ModelConfig:
    where = Where(source, "model")
    model = ModelConfig(**_typed_fields(ModelConfig, raw, where))
    apply_rules(model, _MODEL_RULES, where, raw)
    model.base_model = _check_base_model(model.base_model, base_dir, where)
    return model


def _parse_train(raw: dict, source: str) -> TrainConfig:
    where = Where(source, "train")
    train = TrainConfig(**_typed_fields(TrainConfig, raw, where))
    apply_rules(train, _TRAIN_RULES, where, raw)
    return train


def _parse_adapter(raw: Any, position: int, source: str, train: TrainConfig,
                   base_dir: Path) -> AdapterConfig:
    where = Where(source, f"adapter[{position}]")
    if not isinstance(raw, dict):
        raise where.error(None, f"expected a table, got {describe(raw)}")
    name = raw.get("name")
    if isinstance(name, str) and ADAPTER_NAME_RE.match(name):
        # Once the adapter has a usable name, messages use it rather than its position.
        where = Where(source, f'adapter "{name}"')
    kwargs = _typed_fields(AdapterConfig, raw, where, required=_REQUIRED_ADAPTER_KEYS)
    if not ADAPTER_NAME_RE.match(kwargs["name"]):
        raise where.error("name", "expected 1-64 characters from letters, digits, '_', '.', '-', "
                                  f"starting with a letter or digit (it becomes a folder name), "
                                  f"got {show(kwargs['name'])}")
    if (kwargs["name"].lower() in RESERVED_ADAPTER_NAMES
            or kwargs["name"].lower().startswith("replaced-")):
        raise where.error("name", f"{show(kwargs['name'])} is the name of a file or folder the "
                                  "run writes beside the adapters' folders; choose another name")
    adapter = AdapterConfig(**kwargs)
    apply_rules(adapter, _ADAPTER_RULES, where, raw)
    _check_adapter_combinations(adapter, where)
    _check_mixlora(adapter, where)
    check_adapter_eval_fields(adapter, where)
    adapter.data = check_data(adapter.data, base_dir, where)
    adapter.prompt = check_prompt(adapter.prompt, base_dir, where)
    adapter.init_from = check_init_from(adapter.init_from, base_dir, where)
    if adapter.cutoff_len is None:
        adapter.cutoff_len = train.cutoff_len
    if adapter.seed is None:
        adapter.seed = train.seed
    return adapter


_REQUIRED_ADAPTER_KEYS = {
    "name": "missing: every [[adapter]] needs a name (it becomes the adapter's folder name)",
    "data": "missing: every [[adapter]] needs a data file to train on",
}


def _check_adapter_combinations(a: AdapterConfig, where: Where) -> None:
    if a.micro_batch_size > a.batch_size:
        raise where.error("micro_batch_size",
                          f"expected an integer <= batch_size ({a.batch_size}), "
                          f"got {a.micro_batch_size}")
    if a.batch_size % a.micro_batch_size:
        raise where.error(
            "batch_size",
            f"expected a multiple of micro_batch_size ({a.micro_batch_size}), got {a.batch_size}: "
            "each optimizer step accumulates gradients over batch_size / micro_batch_size "
            "micro-batches, which must be a whole number")
    if a.momentum and a.optim != "sgd":
        raise where.error("momentum", f'only used with optim = "sgd" (this adapter uses '
                                      f'"{a.optim}"); remove it or set optim = "sgd"')
    if a.warmup_steps is not None and a.warmup_ratio:
        raise where.error("warmup_steps", "set either warmup_steps or warmup_ratio, not both")


def _check_mixlora(a: AdapterConfig, where: Where) -> None:
    """MixLoRA fields: only with routing_strategy, each with its strategy; defaults filled."""
    given = [name for name in MIXLORA_FIELDS[1:] if getattr(a, name) is not None]
    if a.routing_strategy is None:
        if given:
            raise where.error(given[0], "a MixLoRA field, used only with routing_strategy "
                                        "(one of " + ", ".join(f'"{s}"' for s in ROUTING_STRATEGIES)
                                        + "); set routing_strategy or remove it")
        return
    for name, strategy in MIXLORA_STRATEGY_ONLY.items():
        if getattr(a, name) is not None and a.routing_strategy != strategy:
            raise where.error(name, f'only used with routing_strategy = "{strategy}" (this '
                                    f'adapter uses "{a.routing_strategy}"); remove it')
    experts = a.num_experts if a.num_experts is not None else MIXLORA_DEFAULTS["num_experts"]
    if a.top_k is not None and a.top_k > experts:
        raise where.error("top_k", f"expected an integer <= num_experts ({experts}), "
                                   f"got {a.top_k}: each token picks top_k different experts")
    # Fill in the strategy's defaults, so the config says what trains (expert_lora keeps
    # only what it overrides; the engine completes it from the adapter's own LoRA fields).
    for name, value in resolve_mixlora(vars(a)).items():
        if name != "expert_lora":
            setattr(a, name, value)


# --- field types --------------------------------------------------------------------------

def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _typed_fields(cls: type, raw: dict, where: Where,
                  required: dict[str, str] | None = None) -> dict[str, Any]:
    """Check every key of ``raw`` is a field of ``cls`` and has that field's type.

    ``required`` maps keys that must be present to the message when one is missing. Unknown
    keys are reported first: a missing ``name`` is often a misspelt one.
    """
    _check_keys(raw, _field_names(cls), where)
    for key, message in (required or {}).items():
        if key not in raw:
            raise where.error(key, message)
    hints = typing.get_type_hints(cls)
    return {key: _convert(value, hints[key], where, key) for key, value in raw.items()}


def _convert(value: Any, hint: Any, where: Where, key: str) -> Any:
    if key == "target_modules":
        return convert_targets(value, where)
    if key == "expert_lora":
        return _convert_expert_lora(value, where)
    if key == "eval_tasks":
        return convert_eval_tasks(value, where)
    if key == "report_to":
        return convert_report_to(value, where)
    return convert_value(value, hint, where, key)


def _convert_expert_lora(value: Any, where: Where) -> dict:
    """MixLoRA's expert_lora table: LoRA fields that the experts use instead of the adapter's."""
    key = "expert_lora"
    if not isinstance(value, dict):
        raise where.error(key, "expected a table such as { r = 4, lora_alpha = 8 }, got "
                               f"{describe(value)}")
    hints = typing.get_type_hints(AdapterConfig)
    out = {}
    for name, item in value.items():
        field_name = f"{key}.{name}"
        if name not in EXPERT_LORA_FIELDS:
            raise where.error(field_name, "unknown key; expert_lora sets "
                                          + ", ".join(EXPERT_LORA_FIELDS)
                                          + suggestion(name, EXPERT_LORA_FIELDS))
        out[name] = convert_value(item, hints[name], where, field_name)
        rule = _ADAPTER_RULES.get(name)
        if rule is not None and not rule.ok(out[name]):
            raise where.error(field_name, f"expected {rule.expected}, got {show(item)}")
    return out


# --- value rules --------------------------------------------------------------------------

_MODEL_RULES = {
    "dtype": one_of(DTYPES),
    "attn_impl": one_of(ATTN_IMPLS),
    "quantize": one_of(QUANTIZE),
}
_TRAIN_RULES = {
    "output_dir": NON_EMPTY,
    "seed": int_between(0, MAX_SEED),
    "cutoff_len": int_at_least(MIN_CUTOFF_LEN),
    "save_step": int_at_least(1),
    "save_total_limit": int_at_least(0),
    "train_lora_simultaneously_num": int_at_least(1),
    "max_tokens_per_step": int_at_least(0),
    "memory_limit_gb": number(0),
    "packing": one_of(PACKING),
}
_ADAPTER_RULES = {
    "r": int_between(1, MAX_RANK),
    "lora_alpha": number(0, low_open=True),
    "lora_dropout": number(0, 1, high_open=True),
    "loraplus_lr_ratio": number(0, low_open=True),
    "optim": one_of(OPTIMIZERS),
    # A learning rate above 1 is a typo (3e-4 written as 3), never a choice.
    "lr": number(0, 1, low_open=True),
    "momentum": number(0, 1, high_open=True),
    "weight_decay": number(0, 1),
    "batch_size": int_at_least(1),
    "micro_batch_size": int_at_least(1),
    "num_epochs": int_at_least(1),
    "scheduler_type": one_of(SCHEDULERS),
    "warmup_ratio": number(0, 1, high_open=True),
    "warmup_steps": int_at_least(0),
    "cutoff_len": int_at_least(MIN_CUTOFF_LEN),
    "val_set_size": int_at_least(0),
    "max_grad_norm": number(0, low_open=True),
    "seed": int_between(0, MAX_SEED),
    "eval_steps": int_at_least(1),
    # MixLoRA
    "routing_strategy": one_of(ROUTING_STRATEGIES),
    "num_experts": int_between(1, MAX_EXPERTS),
    "top_k": int_at_least(1),
    "top_p": number(0, 1, low_open=True),
    "temperature": number(0),
    "router_aux_loss_coef": number(0),
    "router_z_loss_coef": number(0),
    "router_init_range": number(0),
    "jitter_noise": number(0, 1, high_open=True),
    "expert_capacity": int_at_least(1),
    "ffn_dropout": number(0, 1, high_open=True),
    "sparse_step": int_at_least(1),
    "act_fn": one_of(ACT_FNS),
}


# --- paths --------------------------------------------------------------------------------

def _check_base_model(value: str, base_dir: Path, where: Where) -> str:
    if value == DEMO_MODEL:
        return value
    path = resolve_path(value, base_dir)
    if not path.is_dir():
        hint = ""
        if not os.path.isabs(value) and value.count("/") == 1 and not value.startswith("."):
            hint = ("; models are not downloaded: give a local folder "
                    "(a Hugging Face hub id won't do)")
        raise where.error("base_model", f'expected "{DEMO_MODEL}" or a local model folder, got '
                                        f"{show(value)}: no folder at {path}{hint}")
    if not (path / "config.json").is_file():
        raise where.error("base_model", f"expected a model folder holding config.json, got {path} "
                                        "(no config.json there)")
    return str(path)


# --- keys ---------------------------------------------------------------------------------

def _field_homes() -> dict[str, list[str]]:
    """Where each field belongs, to tell a user who put one in the wrong table."""
    homes: dict[str, list[str]] = {}
    for cls, table in ((ModelConfig, "[model]"), (TrainConfig, "[train]"),
                       (AdapterConfig, "[[adapter]]"), (EvalConfig, "[[eval]]")):
        for name in _field_names(cls):
            homes.setdefault(name, []).append(table)
    return homes


_HOMES = _field_homes()


def _check_keys(raw: dict, allowed: Iterable[str], where: Where) -> None:
    allowed = tuple(allowed)
    for key in raw:
        if key in allowed:
            continue
        homes = _HOMES.get(key)
        if homes and where.table is not None:
            hint = f"; {key} belongs in {' or '.join(homes)}"
        elif key in _HOMES and where.table is None:
            hint = f"; top-level keys go in a table: {key} belongs in {' or '.join(_HOMES[key])}"
        else:
            hint = suggestion(key, allowed) or "; valid keys are " + ", ".join(allowed)
        raise where.error(key, "unknown key" + hint)
