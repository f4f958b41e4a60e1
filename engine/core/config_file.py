"""Reading a user's config file, and the wording of what is wrong in it.

The file's bytes as UTF-8 text, its TOML with the position of a syntax error, its
top-level tables; and the parts every ``ConfigError`` about a config is made of: where a
value is (file and table), "did you mean", and a value shown as it is written in TOML.
Shared by the run config (``engine.core.config``), the value checks
(``engine.core.config_values``) and the m-LoRA converter (``engine.tools.convert``).
"""

from __future__ import annotations

import difflib
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from engine.core.errors import ConfigError

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


def read_toml(path: Path, source: str) -> dict:
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


def single_table(data: dict, key: str, source: str) -> dict:
    value = data.get(key, {})
    if isinstance(value, list):
        raise ConfigError(f"expected one [{key}] table, got an array of tables ([[{key}]])",
                          file=source, table=key)
    if not isinstance(value, dict):
        raise ConfigError(f"expected a [{key}] table, got {describe(value)}",
                          file=source, field=key)
    return value


def adapter_tables(data: dict, source: str) -> list:
    value = data.get("adapter")
    if value is None:
        if data.get("sweep"):
            return []       # a run of sweeps alone: its trials are its jobs
        raise ConfigError("no [[adapter]] table: a run needs at least one adapter (or a "
                          "[[sweep]])", file=source)
    if isinstance(value, dict):
        raise ConfigError("expected [[adapter]] tables (double brackets, one per adapter), "
                          "got a single [adapter] table", file=source, table="adapter")
    if not isinstance(value, list):
        raise ConfigError(f"expected [[adapter]] tables, got {describe(value)}",
                          file=source, field="adapter")
    return value

# --- messages -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Where:
    """The file and table a value comes from, to build ``ConfigError``s."""
    source: str
    table: Optional[str]

    def error(self, key: Optional[str], message: str) -> ConfigError:
        return ConfigError(message, file=self.source, table=self.table, field=key)


def suggestion(word: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    alias = _ALIASES.get(word.lower())
    if alias in choices:
        return f'; did you mean "{alias}"?'
    by_lower = {c.lower(): c for c in choices}  # "BF16" should find "bf16"
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f'; did you mean "{by_lower[close[0]]}"?' if close else ""


def show(value: Any) -> str:
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


def describe(value: Any) -> str:
    """A value with its TOML type, e.g. '"8" (a string)', for type mismatches."""
    kind = _toml_kind(value)
    if isinstance(value, dict):
        return kind
    return f"{show(value)} ({kind})"


# TOML's value types in the words of an error message; bool before int (a bool is an int).
_TOML_KINDS = ((bool, "a boolean"), (int, "an integer"), (float, "a float"),
               (str, "a string"), (list, "an array"), (dict, "a table"))


def _toml_kind(value: Any) -> str:
    for kind, words in _TOML_KINDS:
        if isinstance(value, kind):
            return words
    return "a date/time" if hasattr(value, "isoformat") else type(value).__name__
