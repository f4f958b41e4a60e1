"""Training data: reading row files, tokenizing rows into examples, and batch order.

Three row kinds are accepted; one file holds one kind:

* Alpaca: ``{"instruction": str, "input": str (optional), "output": str}``, rendered with a
  prompt template (``engine.core.prompts``); the output plus EOS is the target.
* Text: ``{"text": str}``; every token is a target (plain language-model training).
* Messages: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``,
  rendered with the tokenizer's chat template; only assistant turns are targets.

Files are JSON (one array of objects) or JSONL (one object a line), told apart by their
first non-blank character. Every problem raises ``DataError`` naming the file and line.

``JobData`` holds one adapter's encoded train/validation examples and decides which examples
form each optimizer step. The order depends only on (seed, epoch, data), never on which
other adapters share the run, so a job trained alone or with others sees exactly the same
batches and a resumed job recomputes them.

This module is pure Python and never imports torch: the CLI validates data without it.
The tokenizer is passed in (any Hugging Face tokenizer), never imported here.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from engine.core.errors import ConfigError, DataError
from engine.core.prompts import PromptTemplate, load_template

IGNORE_INDEX = -100                 # label for tokens outside the loss (PyTorch's default)
MAX_ROW_BYTES = 1 << 20             # one row (a JSONL line, or one array element)
MAX_JSON_FILE_BYTES = 256 << 20     # a JSON array is parsed whole; bigger data must be JSONL
ROW_KINDS = ("alpaca", "text", "messages")
CHAT_ROLES = ("system", "user", "assistant")

_BOM = b"\xef\xbb\xbf"
_WHITESPACE = b" \t\r\n"


# --------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataFile:
    """The rows of one data file, all of one ``kind``, with the line each row starts on."""

    path: str
    kind: str
    rows: list[dict]
    lines: list[int]


class _RowError(ValueError):
    """A problem with one row; the caller adds file and line."""


def load_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON or JSONL file, validated (see ``load_data_file``)."""
    return load_data_file(path).rows


def load_data_file(path: str | os.PathLike, *, max_row_bytes: int = MAX_ROW_BYTES) -> DataFile:
    """Read and validate a JSON array or JSONL file of rows.

    Raises ``DataError`` (file and line) for: a missing or unreadable file, an empty file,
    bytes that are not UTF-8, invalid JSON, a row that is not an object, missing or
    mistyped fields, a file mixing row kinds, and a row larger than ``max_row_bytes``.
    Oversized JSONL lines are detected while reading, without reading them whole.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError("data file not found", file=path) from None
    except OSError as e:
        raise DataError(f"cannot read data file: {e.strerror}", file=path) from None
    with f:
        first = _first_significant_byte(f)
        if first is None:
            raise DataError("data file is empty (no rows)", file=path)
        f.seek(0)
        if first == b"[":
            pairs = _read_json_array(f, path, max_row_bytes)
        else:
            pairs = _read_jsonl(f, path, max_row_bytes)
    if not pairs:
        raise DataError("data file has no rows", file=path)

    # One kind per file: mixing would silently change what is trained on.
    kind = None
    first_line = None
    for line, row in pairs:
        try:
            row_kind_ = row_kind(row)
        except _RowError as e:
            raise DataError(str(e), file=path, line=line) from None
        if kind is None:
            kind, first_line = row_kind_, line
        elif row_kind_ != kind:
            raise DataError(
                f"this is a {row_kind_} row but the file's first row (line {first_line}) is "
                f"a {kind} row; a file may not mix row kinds", file=path, line=line)
    return DataFile(path=path, kind=kind, rows=[r for _, r in pairs],
                    lines=[ln for ln, _ in pairs])


def _first_significant_byte(f) -> Optional[bytes]:
    """The first byte that is not whitespace or a UTF-8 BOM, or None for a blank file."""
    at_start = True
    while True:
        chunk = f.read(65536)
        if not chunk:
            return None
        if at_start and chunk.startswith(_BOM):
            chunk = chunk[len(_BOM):]
        at_start = False
        stripped = chunk.lstrip(_WHITESPACE)
        if stripped:
            return stripped[:1]


def _read_jsonl(f, path: str, max_row_bytes: int) -> list[tuple[int, Any]]:
    pairs = []
    offset = 0        # byte offset of the current line in the file, for UTF-8 errors
    line_no = 0
    while True:
        # Read at most one byte past the limit: a 100 MB line costs 1 MB, not 100 MB.
        raw = f.readline(max_row_bytes + 1)
        if not raw:
            break
        line_no += 1
        line_offset = offset
        offset += len(raw)
        content = raw[:-1] if raw.endswith(b"\n") else raw
        if len(content) > max_row_bytes:
            raise DataError(f"line is longer than the limit of {_size(max_row_bytes)} per row",
                            file=path, line=line_no)
        if line_no == 1 and content.startswith(_BOM):
            content = content[len(_BOM):]
            line_offset += len(_BOM)
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"not valid UTF-8: byte 0x{content[e.start]:02x} at byte offset "
                f"{line_offset + e.start} of the file (column {e.start + 1} of this line)",
                file=path, line=line_no) from None
        if not text.strip():
            continue                      # blank lines are allowed in JSONL
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            hint = ""
            if text.strip() == "{":
                hint = "; JSONL needs each object whole on one line"
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno}){hint}",
                            file=path, line=line_no) from None
        except RecursionError:
            raise DataError("invalid JSON: nested too deeply", file=path, line=line_no) from None
        pairs.append((line_no, row))
    return pairs


def _read_json_array(f, path: str, max_row_bytes: int) -> list[tuple[int, Any]]:
    size = os.fstat(f.fileno()).st_size
    if size > MAX_JSON_FILE_BYTES:
        raise DataError(
            f"JSON file is {_size(size)}; a JSON array is read whole, so files over "
            f"{_size(MAX_JSON_FILE_BYTES)} must be JSONL (one object a line)", file=path)
    raw = f.read()
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte offset "
                        f"{e.start} of the file", file=path,
                        line=raw.count(b"\n", 0, e.start) + 1) from None

    # Decode element by element (instead of json.loads on the whole array) so each row's
    # line is known for messages, and each row's size can be checked.
    decoder = json.JSONDecoder()
    pairs: list[tuple[int, Any]] = []
    pos = _skip_ws(text, text.index("[") + 1)
    line, line_pos = 1, 0       # line of position line_pos; advanced incrementally: O(n)
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            if pos >= len(text):
                raise DataError("unexpected end of file: the JSON array is not closed",
                                file=path, line=text.count("\n") + 1)
            line += text.count("\n", line_pos, pos)
            line_pos = pos
            row_no = len(pairs) + 1
            try:
                row, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"row {row_no}: invalid JSON: {e.msg} (column {e.colno})",
                                file=path, line=e.lineno) from None
            except RecursionError:
                raise DataError(f"row {row_no}: invalid JSON: nested too deeply",
                                file=path, line=line) from None
            # A character is 1 to 4 UTF-8 bytes: count bytes exactly only when it matters,
            # and never copy a huge row just to measure it.
            chars = end - pos
            if chars > max_row_bytes or (
                    chars * 4 > max_row_bytes
                    and len(text[pos:end].encode("utf-8")) > max_row_bytes):
                raise DataError(f"row {row_no} is larger than the limit of "
                                f"{_size(max_row_bytes)} per row", file=path, line=line)
            if not isinstance(row, dict):
                raise DataError(f"row {row_no}: expected a JSON object, got "
                                f"{_json_type(row)}", file=path, line=line)
            pairs.append((line, row))
            pos = _skip_ws(text, end)
            if pos < len(text) and text[pos] == ",":
                pos = _skip_ws(text, pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            where = text.count("\n", 0, pos) + 1
            if pos >= len(text):
                raise DataError("unexpected end of file: the JSON array is not closed",
                                file=path, line=where)
            raise DataError(f"invalid JSON after row {row_no}: expected ',' or ']'",
                            file=path, line=where)
    pos = _skip_ws(text, pos)
    if pos < len(text):
        raise DataError("unexpected data after the end of the JSON array", file=path,
                        line=text.count("\n", 0, pos) + 1)
    return pairs


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _size(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n} bytes"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# --------------------------------------------------------------------------------------
# Row validation
# --------------------------------------------------------------------------------------

def row_kind(row: Any) -> str:
    """``"alpaca"``, ``"text"`` or ``"messages"``; raises ``ValueError`` for a bad row."""
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {_json_type(row)}")
    kinds = []
    if "instruction" in row or "output" in row:
        kinds.append("alpaca")
    if "text" in row:
        kinds.append("text")
    if "messages" in row:
        kinds.append("messages")
    if not kinds:
        have = ", ".join(repr(k) for k in list(row)[:8]) or "none"
        raise _RowError("row has none of the fields 'instruction' and 'output' (Alpaca), "
                        f"'text' or 'messages' (it has: {have})")
    if len(kinds) > 1:
        raise _RowError(f"row mixes the fields of {' and '.join(kinds)} rows; use one kind")
    kind = kinds[0]
    if kind == "alpaca":
        for name in ("instruction", "output"):
            if name not in row:
                raise _RowError(f"missing field '{name}'")
            if not isinstance(row[name], str):
                raise _RowError(f"field '{name}' must be a string, got {_json_type(row[name])}")
        if row.get("input") is not None and not isinstance(row["input"], str):
            raise _RowError(f"field 'input' must be a string, got {_json_type(row['input'])}")
    elif kind == "text":
        if not isinstance(row["text"], str):
            raise _RowError(f"field 'text' must be a string, got {_json_type(row['text'])}")
        if not row["text"].strip():
            raise _RowError("field 'text' is empty")
    else:
        _check_messages(row["messages"])
    return kind


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise _RowError(f"field 'messages' must be an array, got {_json_type(messages)}")
    if not messages:
        raise _RowError("field 'messages' is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _RowError(f"messages[{i}] must be an object, got {_json_type(m)}")
        for name in ("role", "content"):
            if name not in m:
                raise _RowError(f"messages[{i}] is missing field '{name}'")
            if not isinstance(m[name], str):
                raise _RowError(f"messages[{i}].{name} must be a string, "
                                f"got {_json_type(m[name])}")
        if m["role"] not in CHAT_ROLES:
            raise _RowError(f"messages[{i}].role is '{m['role']}'; expected one of "
                            f"{', '.join(CHAT_ROLES)}")
        if m["role"] == "system" and i != 0:
            raise _RowError(f"messages[{i}] is a system message; only the first may be")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body or body[0]["role"] != "user":
        raise _RowError("the conversation must start with a user message "
                        "(after an optional system message)")
    if messages[-1]["role"] != "assistant":
        # A trailing user turn would never be trained on; it is almost surely a mistake.
        raise _RowError("the last message must be from the assistant")


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------

@dataclass
class Encoded:
    """One tokenized example. ``labels[i]`` is ``input_ids[i]`` or ``IGNORE_INDEX``.

    Labels are aligned with ``input_ids`` (not shifted): the model shifts them, so the
    label at position 0 never enters the loss.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        """Tokens that contribute to the loss (position 0 is never predicted)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def encode_row(row: dict, tokenizer: Any, template: Optional[PromptTemplate], cutoff_len: int,
               train_on_inputs: bool = False, *, file: str = "<row>",
               line: Optional[int] = None) -> Encoded:
    """Tokenize one row into ``input_ids`` and ``labels``, truncated to ``cutoff_len``.

    Alpaca rows: prompt = ``tokenizer(template.render(...), add_special_tokens=True)``,
    response = ``tokenizer(output, add_special_tokens=False) + [eos]``; the two id lists
    are concatenated, so no token can straddle the prompt/response boundary. Prompt labels
    are ``IGNORE_INDEX`` unless ``train_on_inputs``. With the ``chat`` template the row is
    encoded as a user/assistant conversation (see messages rows).

    Text rows: ``tokenizer(text, add_special_tokens=True) + [eos]``, all targets.

    Messages rows: rendered with the tokenizer's chat template; each assistant turn's
    tokens are found by rendering conversation prefixes, and only the assistant content
    with its end-of-turn token is a target. The example ends with the final end-of-turn
    token (template text after it, such as ChatML's trailing newline, is dropped) so it
    ends, like every example, on a target end token.

    ``file`` and ``line`` only label ``DataError`` messages. Truncation keeps the start.
    """
    if cutoff_len < 1:
        raise ConfigError(f"cutoff_len must be at least 1, got {cutoff_len}", field="cutoff_len")
    try:
        kind = row_kind(row)
        if kind == "messages":
            ids, labels = _encode_messages(row["messages"], tokenizer, train_on_inputs)
        elif kind == "text":
            ids = _tokenize(tokenizer, row["text"], True) + [_eos_id(tokenizer)]
            labels = list(ids)
        elif template is None:
            raise _RowError("an Alpaca row needs a prompt template")
        elif template.chat:
            messages = [
                {"role": "user",
                 "content": template.user_message(row["instruction"], row.get("input") or "")},
                {"role": "assistant", "content": row["output"]},
            ]
            ids, labels = _encode_messages(messages, tokenizer, train_on_inputs)
        else:
            ids, labels = _encode_alpaca(row, tokenizer, template, train_on_inputs)
    except _RowError as e:
        raise DataError(str(e), file=file, line=line) from None
    truncated = len(ids) > cutoff_len
    return Encoded(input_ids=ids[:cutoff_len], labels=labels[:cutoff_len], truncated=truncated)


def _encode_alpaca(row: dict, tokenizer: Any, template: PromptTemplate,
                   train_on_inputs: bool) -> tuple[list[int], list[int]]:
    eos = _eos_id(tokenizer)
    prompt_text = template.render(row["instruction"], row.get("input") or "")
    prompt = _tokenize(tokenizer, prompt_text, True)
    # Tokenizers configured to append EOS to every encoding would put one mid-example.
    if prompt and prompt[-1] == eos and not prompt_text.endswith(str(tokenizer.eos_token)):
        prompt = prompt[:-1]
    response = _tokenize(tokenizer, row["output"], False) + [eos]
    ids = prompt + response
    labels = (list(prompt) if train_on_inputs else [IGNORE_INDEX] * len(prompt)) + response
    return ids, labels


def _encode_messages(messages: list[dict], tokenizer: Any,
                     train_on_inputs: bool) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise _RowError("chat rows need a tokenizer with a chat template, and this one has none")
    full = _render_ids(tokenizer, messages, False)
    labels = list(full) if train_on_inputs else [IGNORE_INDEX] * len(full)
    specials = _special_ids(tokenizer)
    last_stop = len(full)
    last_has_end = True
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The assistant span: what the conversation up to this turn adds to the prompt
        # "history + assistant header". Both renderings must be token prefixes of the full
        # conversation; a template that rewrites history (e.g. drops earlier reasoning)
        # breaks that, and we refuse rather than mislabel.
        start = _checked_prefix(tokenizer, messages[:i], True, full, i)
        end = _checked_prefix(tokenizer, messages[:i + 1], False, full, i + 1)
        # Targets run through the turn's last special token (its end-of-turn: <|im_end|>,
        # <|eot_id|>, </s>...). Template text after it (ChatML's "\n") is not the answer.
        stop = end
        last_has_end = False
        for j in range(end - 1, start - 1, -1):
            if full[j] in specials:
                stop, last_has_end = j + 1, True
                break
        labels[start:stop] = full[start:stop]
        last_stop = stop
    # The last message is the assistant's (validated): end the example on its end token.
    ids, labels = full[:last_stop], labels[:last_stop]
    if not last_has_end:
        # A template with no end-of-turn token: the model must still learn to stop.
        eos = _eos_id(tokenizer)
        ids, labels = ids + [eos], labels + [eos]
    return ids, labels


def _checked_prefix(tokenizer: Any, messages: list[dict], add_generation_prompt: bool,
                    full: list[int], count: int) -> int:
    ids = _render_ids(tokenizer, messages, add_generation_prompt)
    if full[:len(ids)] != ids:
        what = " plus the assistant header" if add_generation_prompt else ""
        raise _RowError(
            f"the chat template's rendering of the first {count} message(s){what} is not "
            f"a token prefix of the whole conversation, so assistant turns cannot be "
            f"located; use a template that renders earlier turns unchanged")
    return len(ids)


def _render_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    # The template already holds any BOS the model wants: add no special tokens.
    return _tokenize(tokenizer, text, False)


def _tokenize(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token; examples could not end")
    return int(eos)


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    # Chat markers such as <|im_end|> are often added tokens, not named special tokens.
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, tok in decoder.items() if getattr(tok, "special", False))
    return ids


# --------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------

def micro_batches(batch: list[int], micro_batch_size: int) -> list[list[int]]:
    """Split one optimizer step's example indices into micro-batches (last may be shorter)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
    return [batch[i:i + micro_batch_size] for i in range(0, len(batch), micro_batch_size)]


@dataclass
class JobData:
    """One adapter's examples and its step-by-step batch order.

    ``train``/``val`` are encoded examples; examples left with no target token (after
    truncation) are dropped and counted in ``num_no_targets`` (``warnings()`` reports it).
    Build one with ``JobData.from_config``; the constructor takes ready examples.
    """

    train: list[Encoded]
    val: list[Encoded]
    batch_size: int
    micro_batch_size: int
    seed: int
    group_by_length: bool = False
    name: str = ""
    cutoff_len: Optional[int] = None
    num_truncated: int = 0
    num_no_targets: int = 0
    no_target_lines: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}",
                              table=self._table(), field="batch_size")
        if self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be at least 1, got "
                              f"{self.micro_batch_size}", table=self._table(),
                              field="micro_batch_size")

    def _table(self) -> Optional[str]:
        return f"adapter '{self.name}'" if self.name else None

    @classmethod
    def from_config(cls, adapter: Any, tokenizer: Any, template: Optional[PromptTemplate],
                    default_cutoff_len: int, default_seed: int, *,
                    base_dir: Optional[str] = None) -> "JobData":
        """Load, split and encode the data of one ``AdapterConfig``-like object.

        Uses ``data``, ``prompt`` (when ``template`` is None), ``cutoff_len`` and ``seed``
        (None: the defaults given), ``train_on_inputs``, ``val_set_size``,
        ``group_by_length``, ``batch_size``, ``micro_batch_size`` and ``name``. A relative
        ``data`` path is resolved against ``base_dir`` when given.
        """
        name = getattr(adapter, "name", "")
        table = f"adapter '{name}'" if name else None
        cutoff = adapter.cutoff_len if getattr(adapter, "cutoff_len", None) is not None \
            else default_cutoff_len
        seed = adapter.seed if getattr(adapter, "seed", None) is not None else default_seed
        if template is None:
            template = load_template(getattr(adapter, "prompt", "alpaca"), base_dir=base_dir)
        path = adapter.data
        if base_dir and not os.path.isabs(path):
            path = os.path.join(base_dir, path)

        data = load_data_file(path)
        needs_chat = data.kind == "messages" or (data.kind == "alpaca" and template.chat)
        if needs_chat and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{data.path} needs the tokenizer's chat template ("
                              f"{'messages rows' if data.kind == 'messages' else 'prompt chat'}"
                              f"), but this tokenizer has none", table=table, field="prompt")
        _eos_id(tokenizer)

        val_size = int(getattr(adapter, "val_set_size", 0) or 0)
        n = len(data.rows)
        if val_size < 0:
            raise ConfigError(f"val_set_size must be 0 or more, got {val_size}",
                              table=table, field="val_set_size")
        if val_size >= n:
            raise ConfigError(f"val_set_size {val_size} leaves no training rows "
                              f"({data.path} has {n})", table=table, field="val_set_size")
        train_idx, val_idx = split_indices(n, val_size, seed)

        train_on_inputs = bool(getattr(adapter, "train_on_inputs", False))
        stats = {"num_truncated": 0, "num_no_targets": 0, "no_target_lines": []}

        def encode(indices: Iterable[int]) -> list[Encoded]:
            out = []
            for i in indices:
                enc = encode_row(data.rows[i], tokenizer, template, cutoff, train_on_inputs,
                                 file=data.path, line=data.lines[i])
                stats["num_truncated"] += enc.truncated
                if enc.num_targets == 0:
                    # Nothing to learn (e.g. the prompt alone fills cutoff_len); keeping it
                    # would only spend compute, and a micro-batch of such rows has no loss.
                    stats["num_no_targets"] += 1
                    stats["no_target_lines"].append(data.lines[i])
                    continue
                out.append(enc)
            return out

        train, val = encode(train_idx), encode(val_idx)
        if not train:
            raise DataError(f"no training example has a target token within cutoff_len "
                            f"{cutoff}; raise cutoff_len or shorten the prompts",
                            file=data.path)
        return cls(train=train, val=val, batch_size=adapter.batch_size,
                   micro_batch_size=adapter.micro_batch_size, seed=seed,
                   group_by_length=bool(getattr(adapter, "group_by_length", False)),
                   name=name, cutoff_len=cutoff, **stats)

    # -- order ---------------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train) / self.batch_size)

    def total_steps(self, num_epochs: int) -> int:
        return self.steps_per_epoch * num_epochs

    def epoch_order(self, epoch: int) -> list[int]:
        """Every train index once, in this epoch's order."""
        n = len(self.train)
        if self.group_by_length:
            # As m-LoRA: longest first, the same every epoch; ties keep file order.
            return sorted(range(n), key=lambda i: (-len(self.train[i]), i))
        order = list(range(n))
        # A string seed is hashed with SHA-512 by random.Random: stable across processes
        # and PYTHONHASHSEED, and independent of every other adapter's random stream.
        random.Random(f"mlora-tui/epoch/{self.seed}/{epoch}").shuffle(order)
        return order

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The train indices of each optimizer step of ``epoch`` (0-based)."""
        order = self.epoch_order(epoch)
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def micro_batches(self, batch: list[int],
                      micro_batch_size: Optional[int] = None) -> list[list[int]]:
        return micro_batches(batch, micro_batch_size or self.micro_batch_size)

    def warnings(self) -> list[str]:
        """Things the engine should tell the user about this adapter's data."""
        who = f"adapter '{self.name}': " if self.name else ""
        out = []
        if self.num_truncated:
            out.append(f"{who}{self.num_truncated} example(s) were truncated to cutoff_len "
                       f"{self.cutoff_len}")
        if self.num_no_targets:
            lines = ", ".join(str(x) for x in self.no_target_lines[:5])
            more = ", ..." if len(self.no_target_lines) > 5 else ""
            out.append(f"{who}{self.num_no_targets} example(s) have no target token within "
                       f"cutoff_len {self.cutoff_len} and are skipped (lines {lines}{more})")
        return out


def split_indices(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Row indices for (train, val): ``val_size`` rows picked by a seeded shuffle.

    Both lists keep file order, so the train indices do not depend on the shuffle's
    internals beyond which rows were picked.
    """
    order = list(range(n))
    random.Random(f"mlora-tui/val/{seed}").shuffle(order)
    val = sorted(order[:val_size])
    chosen = set(val)
    return [i for i in range(n) if i not in chosen], val
