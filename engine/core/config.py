"""The run configuration: dataclasses for the TOML file and its validation.

One file holds ``[model]``, ``[train]`` and a list of ``[[adapter]]`` tables. Field names
follow m-LoRA's where one exists. ``load_config`` validates everything that can be checked
without loading a model and raises ``ConfigError`` naming file, table and field.
``load_adapter_file`` / ``parse_adapter_tables`` validate ``[[adapter]]`` tables added to a
running engine. What needs the model or the data's contents (module names of the model
family, whether ``output_dir`` holds another run, data rows) is checked by the engine.
This module never imports torch: the CLI validates configs without it.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

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
    # MixLoRA (engine/train/mixlora.py, docs/mixlora.md): a mixture of LoRA experts on the
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
                          "engine.json", "rng.pt"}
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Only the linear layers inside decoder blocks can carry an adapter.
UNSUPPORTED_TARGETS = ("lm_head", "embed_tokens")
_TARGET_NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")
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

_TOP_LEVEL_KEYS = ("model", "train", "adapter")
# Names people bring from other tools (m-LoRA, PEFT, HF Trainer), for "did you mean".
_ALIASES = {
    "alpha": "lora_alpha", "dropout": "lora_dropout", "lora_r": "r", "rank": "r",
    "learning_rate": "lr", "epochs": "num_epochs", "num_train_epochs": "num_epochs",
    "lora": "adapter", "adapters": "adapter", "optimizer": "optim",
    "lr_scheduler": "scheduler_type", "lr_scheduler_type": "scheduler_type",
    "model_name_or_path": "base_model", "torch_dtype": "dtype",
    "attn_implementation": "attn_impl", "max_seq_len": "cutoff_len",
    "gradient_clipping": "max_grad_norm", "max_norm": "max_grad_norm",
    # m-LoRA's older MixLoRA routing_strategy names.
    "mixtral": "mixlora", "switch": "mixlora-switch", "dynamic": "mixlora-dynamic",
}


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read and validate a run config file; raise ``ConfigError`` on the first problem.

    Relative paths inside (base_model, data, prompt, init_from) are resolved against the
    file's folder; ``output_dir`` stays relative to the current directory.
    """
    source = str(path)
    data = _read_toml(Path(path), source)
    return parse_config(data, source, Path(os.path.abspath(path)).parent)


def parse_config(data: dict, source: str, base_dir: Path) -> RunConfig:
    """Validate an already-parsed TOML document; ``source`` names it in messages."""
    base_dir = Path(base_dir)
    _check_keys(data, _TOP_LEVEL_KEYS, _Where(source, None))
    model = _parse_model(_single_table(data, "model", source), source, base_dir)
    train = _parse_train(_single_table(data, "train", source), source)
    adapters = parse_adapter_tables(_adapter_tables(data, source), source, train, base_dir)
    return RunConfig(model=model, train=train, adapters=adapters, source=source)


def apply_model_overrides(config: RunConfig, overrides: dict[str, Any],
                          source: str = "command line") -> RunConfig:
    """Replace ``[model]`` fields (m-LoRA's --base_model, --bf16, --load_4bit, ...).

    Checked by the rules of the config file; a relative base_model is taken from the
    current directory, as a path typed on a command line is.
    """
    where = _Where(source, "model")
    _check_keys(overrides, [f.name for f in fields(ModelConfig)], where)
    merged = {**{f.name: getattr(config.model, f.name) for f in fields(ModelConfig)},
              **overrides}
    model = ModelConfig(**_typed_fields(ModelConfig, merged, where))
    _apply_rules(model, _MODEL_RULES, where, merged)
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
    data = _read_toml(Path(path), source)
    for key in data:
        if key in ("model", "train"):
            raise ConfigError(
                f"an adapter file holds only [[adapter]] tables; [{key}] comes from the running "
                "engine's config and cannot change here", file=source, table=key)
    _check_keys(data, ("adapter",), _Where(source, None))
    return parse_adapter_tables(_adapter_tables(data, source), source, train,
                                Path(os.path.abspath(path)).parent)


# --- reading the file -------------------------------------------------------------------

def read_user_text(path: Path, source: str, *, kind: str) -> str:
    """A user's text file (``kind``: "TOML", "JSON"), with a ConfigError naming what is wrong."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{'config file' if kind == 'TOML' else 'file'} not found",
                          file=source) from None
    except IsADirectoryError:
        raise ConfigError(f"is a folder, expected a {kind} file", file=source) from None
    except OSError as e:
        raise ConfigError(f"cannot read the file: {e.strerror or e}", file=source) from None
    try:
        # utf-8-sig: accept the byte-order mark some Windows editors write.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                          "save the file as UTF-8", file=source) from None


def _read_toml(path: Path, source: str) -> dict:
    text = read_user_text(path, source, kind="TOML")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(_toml_error_message(e, text), file=source) from None


def _toml_error_message(error: Exception, text: str) -> str:
    message = str(error)
    # Python 3.14 has lineno/colno; older tomllib and tomli put the position in the text.
    line, column = getattr(error, "lineno", None), getattr(error, "colno", None)
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match:
        line, column = line or int(match.group(1)), column or int(match.group(2))
        message = message[:match.start()]
    elif message.endswith("(at end of document)"):
        message = message[:-len("(at end of document)")].rstrip()
        line, column = text.count("\n") + 1, None
    message = getattr(error, "msg", None) or message
    if line is None:
        return f"invalid TOML: {message}"
    where = f"line {line}, column {column}" if column else f"line {line} (end of file)"
    return f"invalid TOML at {where}: {message}{_bare_word_hint(text, line, column)}"


def _bare_word_hint(text: str, line: int, column: int | None) -> str:
    """The usual cause of "Invalid value": a string without quotes (dtype = bf16)."""
    lines = text.splitlines()
    if column is None or not 1 <= line <= len(lines):
        return ""
    word = re.match(r"[A-Za-z_][\w.-]*", lines[line - 1][column - 1:])
    if not word or word.group() in ("true", "false", "inf", "nan"):
        return ""
    if word.group().lower() in ("true", "false"):
        return "; booleans are lower-case: true or false"
    return f'; strings need double quotes, e.g. "{word.group()}"'


def _single_table(data: dict, key: str, source: str) -> dict:
    value = data.get(key, {})
    if isinstance(value, list):
        raise ConfigError(f"expected one [{key}] table, got an array of tables ([[{key}]])",
                          file=source, table=key)
    if not isinstance(value, dict):
        raise ConfigError(f"expected a [{key}] table, got {_describe(value)}",
                          file=source, field=key)
    return value


def _adapter_tables(data: dict, source: str) -> list:
    value = data.get("adapter")
    if value is None:
        raise ConfigError("no [[adapter]] table: a run needs at least one adapter", file=source)
    if isinstance(value, dict):
        raise ConfigError("expected [[adapter]] tables (double brackets, one per adapter), "
                          "got a single [adapter] table", file=source, table="adapter")
    if not isinstance(value, list):
        raise ConfigError(f"expected [[adapter]] tables, got {_describe(value)}",
                          file=source, field="adapter")
    return value


# --- the three kinds of table -------------------------------------------------------------

def _parse_model(raw: dict, source: str, base_dir: Path) -> ModelConfig:
    where = _Where(source, "model")
    model = ModelConfig(**_typed_fields(ModelConfig, raw, where))
    _apply_rules(model, _MODEL_RULES, where, raw)
    model.base_model = _check_base_model(model.base_model, base_dir, where)
    return model


def _parse_train(raw: dict, source: str) -> TrainConfig:
    where = _Where(source, "train")
    train = TrainConfig(**_typed_fields(TrainConfig, raw, where))
    _apply_rules(train, _TRAIN_RULES, where, raw)
    return train


def _parse_adapter(raw: Any, position: int, source: str, train: TrainConfig,
                   base_dir: Path) -> AdapterConfig:
    where = _Where(source, f"adapter[{position}]")
    if not isinstance(raw, dict):
        raise where.error(None, f"expected a table, got {_describe(raw)}")
    name = raw.get("name")
    if isinstance(name, str) and ADAPTER_NAME_RE.match(name):
        # Once the adapter has a usable name, messages use it rather than its position.
        where = _Where(source, f'adapter "{name}"')
    kwargs = _typed_fields(AdapterConfig, raw, where, required=_REQUIRED_ADAPTER_KEYS)
    if not ADAPTER_NAME_RE.match(kwargs["name"]):
        raise where.error("name", "expected 1-64 characters from letters, digits, '_', '.', '-', "
                                  f"starting with a letter or digit (it becomes a folder name), "
                                  f"got {_show(kwargs['name'])}")
    if (kwargs["name"].lower() in RESERVED_ADAPTER_NAMES
            or kwargs["name"].lower().startswith("replaced-")):
        raise where.error("name", f"{_show(kwargs['name'])} is the name of a file or folder the "
                                  "run writes beside the adapters' folders; choose another name")
    adapter = AdapterConfig(**kwargs)
    _apply_rules(adapter, _ADAPTER_RULES, where, raw)
    _check_adapter_combinations(adapter, where)
    _check_mixlora(adapter, where)
    adapter.data = _check_data(adapter.data, base_dir, where)
    adapter.prompt = _check_prompt(adapter.prompt, base_dir, where)
    adapter.init_from = _check_init_from(adapter.init_from, base_dir, where)
    if adapter.cutoff_len is None:
        adapter.cutoff_len = train.cutoff_len
    if adapter.seed is None:
        adapter.seed = train.seed
    return adapter


_REQUIRED_ADAPTER_KEYS = {
    "name": "missing: every [[adapter]] needs a name (it becomes the adapter's folder name)",
    "data": "missing: every [[adapter]] needs a data file to train on",
}


def _check_adapter_combinations(a: AdapterConfig, where: _Where) -> None:
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


def _check_mixlora(a: AdapterConfig, where: _Where) -> None:
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


def _typed_fields(cls: type, raw: dict, where: _Where,
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


def _convert(value: Any, hint: Any, where: _Where, key: str) -> Any:
    # Optional[X] or X | None: TOML has no null, so the value is an X.
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if key == "target_modules":
        return _convert_targets(value, where)
    if key == "expert_lora":
        return _convert_expert_lora(value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise where.error(key, f"expected true or false, got {_describe(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise where.error(key, f"expected an integer, got {_describe(value)}")
    if hint is float:
        # Integers are fine where a number is expected (lora_alpha = 16).
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise where.error(key, f"expected a finite number, got {_show(value)}")
            return float(value)
        raise where.error(key, f"expected a number, got {_describe(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise where.error(key, f"expected a string, got {_describe(value)}")
    raise TypeError(f"no conversion for field type {hint!r}")  # a new field type: add it here


def _convert_expert_lora(value: Any, where: _Where) -> dict:
    """MixLoRA's expert_lora table: LoRA fields that the experts use instead of the adapter's."""
    key = "expert_lora"
    if not isinstance(value, dict):
        raise where.error(key, "expected a table such as { r = 4, lora_alpha = 8 }, got "
                               f"{_describe(value)}")
    hints = typing.get_type_hints(AdapterConfig)
    out = {}
    for name, item in value.items():
        field_name = f"{key}.{name}"
        if name not in EXPERT_LORA_FIELDS:
            raise where.error(field_name, "unknown key; expert_lora sets "
                                          + ", ".join(EXPERT_LORA_FIELDS)
                                          + _suggestion(name, EXPERT_LORA_FIELDS))
        out[name] = _convert(item, hints[name], where, field_name)
        rule = _ADAPTER_RULES.get(name)
        if rule is not None and not rule.ok(out[name]):
            raise where.error(field_name, f"expected {rule.expected}, got {_show(item)}")
    return out


def _convert_targets(value: Any, where: _Where) -> list[str]:
    """A list of module names, or m-LoRA's table of name = true/false (the true ones kept)."""
    key = "target_modules"
    if isinstance(value, dict):
        for name, enabled in value.items():
            if not isinstance(enabled, bool):
                raise where.error(key, f"expected true or false for module {_show(name)}, "
                                       f"got {_describe(enabled)}")
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
                raise where.error(key, f"expected a list of strings, got an item {_describe(item)}")
            if item in names:
                raise where.error(key, f"expected unique module names, got {_show(item)} twice")
            names.append(item)
    else:
        raise where.error(key, 'expected a list of module names such as ["q_proj", "v_proj"] '
                               f"(or a table of name = true/false), got {_describe(value)}")
    for name in names:
        if name in UNSUPPORTED_TARGETS:
            raise where.error(key, f"{_show(name)} cannot be a target: only linear layers inside "
                                   "decoder blocks (e.g. q_proj, v_proj, up_proj) are supported")
        if not _TARGET_NAME_RE.match(name):
            raise where.error(key, f"expected module names of letters, digits, '_' and '.', "
                                   f"got {_show(name)}")
    return names


# --- value rules --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Rule:
    ok: Callable[[Any], bool]
    expected: str        # completes "expected ...", e.g. "an integer >= 1"
    choices: tuple = ()  # for "did you mean" on enumerations


def _int_at_least(low: int) -> _Rule:
    return _Rule(lambda v: v >= low, f"an integer >= {low}")


def _int_between(low: int, high: int) -> _Rule:
    return _Rule(lambda v: low <= v <= high, f"an integer from {low} to {high}")


def _number(low: float, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False) -> _Rule:
    def ok(v: float) -> bool:
        above = v > low if low_open else v >= low
        below = high is None or (v < high if high_open else v <= high)
        return above and below
    text = f"a number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        text += f" and {'<' if high_open else '<='} {high:g}"
    return _Rule(ok, text)


def _one_of(choices: tuple[str, ...]) -> _Rule:
    return _Rule(lambda v: v in choices, "one of " + ", ".join(f'"{c}"' for c in choices), choices)


_NON_EMPTY = _Rule(lambda v: v.strip() != "", "a non-empty string")

_MODEL_RULES = {
    "dtype": _one_of(DTYPES),
    "attn_impl": _one_of(ATTN_IMPLS),
    "quantize": _one_of(QUANTIZE),
}
_TRAIN_RULES = {
    "output_dir": _NON_EMPTY,
    "seed": _int_between(0, MAX_SEED),
    "cutoff_len": _int_at_least(MIN_CUTOFF_LEN),
    "save_step": _int_at_least(1),
    "save_total_limit": _int_at_least(0),
    "train_lora_simultaneously_num": _int_at_least(1),
    "max_tokens_per_step": _int_at_least(0),
    "memory_limit_gb": _number(0),
    "packing": _one_of(PACKING),
}
_ADAPTER_RULES = {
    "r": _int_between(1, MAX_RANK),
    "lora_alpha": _number(0, low_open=True),
    "lora_dropout": _number(0, 1, high_open=True),
    "loraplus_lr_ratio": _number(0, low_open=True),
    "optim": _one_of(OPTIMIZERS),
    # A learning rate above 1 is a typo (3e-4 written as 3), never a choice.
    "lr": _number(0, 1, low_open=True),
    "momentum": _number(0, 1, high_open=True),
    "weight_decay": _number(0, 1),
    "batch_size": _int_at_least(1),
    "micro_batch_size": _int_at_least(1),
    "num_epochs": _int_at_least(1),
    "scheduler_type": _one_of(SCHEDULERS),
    "warmup_ratio": _number(0, 1, high_open=True),
    "warmup_steps": _int_at_least(0),
    "cutoff_len": _int_at_least(MIN_CUTOFF_LEN),
    "val_set_size": _int_at_least(0),
    "max_grad_norm": _number(0, low_open=True),
    "seed": _int_between(0, MAX_SEED),
    # MixLoRA
    "routing_strategy": _one_of(ROUTING_STRATEGIES),
    "num_experts": _int_between(1, MAX_EXPERTS),
    "top_k": _int_at_least(1),
    "top_p": _number(0, 1, low_open=True),
    "temperature": _number(0),
    "router_aux_loss_coef": _number(0),
    "router_z_loss_coef": _number(0),
    "router_init_range": _number(0),
    "jitter_noise": _number(0, 1, high_open=True),
    "expert_capacity": _int_at_least(1),
    "ffn_dropout": _number(0, 1, high_open=True),
    "sparse_step": _int_at_least(1),
    "act_fn": _one_of(ACT_FNS),
}


def _apply_rules(obj: Any, rules: dict[str, _Rule], where: _Where, raw: dict) -> None:
    for key, rule in rules.items():
        value = getattr(obj, key)
        if value is None or rule.ok(value):  # None: an optional field left out
            continue
        # Show the value as written ("lr = 10" -> 10, not the converted 10.0).
        message = f"expected {rule.expected}, got {_show(raw.get(key, value))}"
        if rule.choices:
            message += _suggestion(str(value), rule.choices)
        raise where.error(key, message)


# --- paths --------------------------------------------------------------------------------

def _resolve(value: str, base_dir: Path) -> Path:
    return Path(os.path.abspath(base_dir / os.path.expanduser(value)))


def _check_base_model(value: str, base_dir: Path, where: _Where) -> str:
    if value == DEMO_MODEL:
        return value
    path = _resolve(value, base_dir)
    if not path.is_dir():
        hint = ""
        if not os.path.isabs(value) and value.count("/") == 1 and not value.startswith("."):
            hint = ("; models are not downloaded: give a local folder "
                    "(a Hugging Face hub id won't do)")
        raise where.error("base_model", f'expected "{DEMO_MODEL}" or a local model folder, got '
                                        f"{_show(value)}: no folder at {path}{hint}")
    if not (path / "config.json").is_file():
        raise where.error("base_model", f"expected a model folder holding config.json, got {path} "
                                        "(no config.json there)")
    return str(path)


def _check_data(value: str, base_dir: Path, where: _Where) -> str:
    if not value.strip():
        raise where.error("data", "expected a path to a data file, got an empty string")
    path = _resolve(value, base_dir)
    if not path.exists():
        raise where.error("data", f"file not found: {value} (looked for {path})")
    if not path.is_file():
        raise where.error("data", f"expected a file, got a folder: {path}")
    if path.stat().st_size == 0:
        raise where.error("data", f"the data file is empty: {path}")
    return str(path)


def _check_prompt(value: str, base_dir: Path, where: _Where) -> str:
    # Imported here, not at the top: engine.core.prompts may import this module's dataclasses.
    from engine.core.prompts import BUILTIN_TEMPLATE_NAMES

    if value in BUILTIN_TEMPLATE_NAMES:
        return value
    names = ", ".join(f'"{n}"' for n in sorted(BUILTIN_TEMPLATE_NAMES))
    looks_like_path = value.lower().endswith(".json") or "/" in value or os.sep in value
    if not looks_like_path:
        raise where.error("prompt", f"expected a built-in template ({names}) or a path to a "
                                    f"template JSON file, got {_show(value)}"
                                    + _suggestion(value, sorted(BUILTIN_TEMPLATE_NAMES)))
    path = _resolve(value, base_dir)
    if not path.is_file():
        raise where.error("prompt", f"template file not found: {value} (looked for {path}); "
                                    f"built-in templates are {names}")
    return str(path)


def _check_init_from(value: str, base_dir: Path, where: _Where) -> str:
    if value == "":
        return value
    path = _resolve(value, base_dir)
    if not path.is_dir():
        raise where.error("init_from", f"expected a PEFT adapter folder, got {_show(value)}: "
                                       f"no folder at {path}")
    if not (path / "adapter_config.json").is_file():
        raise where.error("init_from", f"expected an adapter folder holding adapter_config.json, "
                                       f"got {path} (no adapter_config.json there)")
    return str(path)


# --- messages -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Where:
    """The file and table a value comes from, to build ``ConfigError``s."""
    source: str
    table: Optional[str]

    def error(self, key: Optional[str], message: str) -> ConfigError:
        return ConfigError(message, file=self.source, table=self.table, field=key)


def _field_homes() -> dict[str, list[str]]:
    """Where each field belongs, to tell a user who put one in the wrong table."""
    homes: dict[str, list[str]] = {}
    for cls, table in ((ModelConfig, "[model]"), (TrainConfig, "[train]"),
                       (AdapterConfig, "[[adapter]]")):
        for name in _field_names(cls):
            homes.setdefault(name, []).append(table)
    return homes


_HOMES = _field_homes()


def _check_keys(raw: dict, allowed: Iterable[str], where: _Where) -> None:
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
            hint = _suggestion(key, allowed) or "; valid keys are " + ", ".join(allowed)
        raise where.error(key, "unknown key" + hint)


def _suggestion(word: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    alias = _ALIASES.get(word.lower())
    if alias in choices:
        return f'; did you mean "{alias}"?'
    by_lower = {c.lower(): c for c in choices}  # "BF16" should find "bf16"
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f'; did you mean "{by_lower[close[0]]}"?' if close else ""


def _show(value: Any) -> str:
    """A value as it would be written in TOML (strings quoted, booleans lower-case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 80 else text[:77] + '..."'
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return "a table"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(value: Any) -> str:
    """A value with its TOML type, e.g. '"8" (a string)', for type mismatches."""
    kind = _toml_kind(value)
    if isinstance(value, dict):
        return kind
    return f"{_show(value)} ({kind})"


def _toml_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time" if hasattr(value, "isoformat") else type(value).__name__
