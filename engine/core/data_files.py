"""Reading training data files: JSON or JSONL rows, each checked, one row kind a file.

Three row kinds are accepted; one file holds one kind:

* Alpaca: ``{"instruction": str, "input": str (optional), "output": str}``.
* Text: ``{"text": str}``.
* Messages: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``.

How each kind becomes tokens and targets is ``engine.core.data``'s part.

Files are JSON (one array of objects) or JSONL (one object a line), told apart by their
first non-blank character, or Parquet (``.parquet``, read with pyarrow, imported only then).
Every problem raises ``DataError`` naming the file and line (``row N`` for Parquet).
Pure Python, no torch: the CLI validates data without it.

``read_raw_rows`` is the reading alone (no row kinds), for other row layouts such as the
evaluation tasks of ``engine.core.eval_tasks``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from engine.core.errors import DataError

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
    """The rows of one data file, all of one ``kind``, with the line each row starts on
    (for a Parquet file, its row number, 1-based)."""

    path: str
    kind: str
    rows: list[dict]
    lines: list[int]


class RowError(ValueError):
    """A problem with one row; the caller adds file and line."""


def load_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON or JSONL file, validated (see ``load_data_file``)."""
    return load_data_file(path).rows


@dataclass(frozen=True)
class RawRows:
    """The rows of a file as read, not yet checked: ``rows[i]`` starts on line
    ``numbers[i]`` (JSON, JSONL) or is row ``numbers[i]`` (Parquet, ``by_line`` False)."""

    path: str
    rows: list[Any]
    numbers: list[int]
    by_line: bool = True

    def where(self, i: int) -> str:
        """Where row ``i`` is, for messages: ``file:line``, or ``file row N`` for Parquet."""
        if self.by_line:
            return f"{self.path}:{self.numbers[i]}"
        return f"{self.path} row {self.numbers[i]}"

    def error(self, i: int, message: str) -> DataError:
        """A ``DataError`` about row ``i``, naming the file and its line (or row)."""
        if self.by_line:
            return DataError(message, file=self.path, line=self.numbers[i])
        return DataError(f"row {self.numbers[i]}: {message}", file=self.path)


def is_parquet(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(".parquet")


def read_raw_rows(path: str | os.PathLike, *,
                  max_row_bytes: int = MAX_ROW_BYTES) -> RawRows:
    """Read a JSON array, JSONL or Parquet file into rows, without checking what they hold.

    Raises ``DataError`` (file and line) for: a missing or unreadable file, an empty file,
    bytes that are not UTF-8, invalid JSON, a JSON array element that is not an object, a
    row larger than ``max_row_bytes``, a file that is not Parquet though named so, and a
    file with no rows. Oversized JSONL lines are detected while reading, without reading
    them whole.
    """
    path = os.fspath(path)
    if is_parquet(path):
        rows = _read_parquet(path)
        if not rows:
            raise DataError("data file has no rows", file=path)
        return RawRows(path=path, rows=rows, numbers=list(range(1, len(rows) + 1)),
                       by_line=False)
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
    return RawRows(path=path, rows=[r for _, r in pairs], numbers=[ln for ln, _ in pairs])


def load_data_file(path: str | os.PathLike, *, max_row_bytes: int = MAX_ROW_BYTES) -> DataFile:
    """Read and validate a JSON array, JSONL or Parquet file of training rows.

    Raises ``DataError`` (file and line) for everything ``read_raw_rows`` does, and for a
    row that is not an object, missing or mistyped fields, and a file mixing row kinds.
    """
    raw = read_raw_rows(path, max_row_bytes=max_row_bytes)

    # One kind per file: mixing would silently change what is trained on.
    kind = None
    first = None
    for i, row in enumerate(raw.rows):
        try:
            row_kind_ = row_kind(row)
        except RowError as e:
            raise raw.error(i, str(e)) from None
        if kind is None:
            kind, first = row_kind_, i
        elif row_kind_ != kind:
            first_where = (f"line {raw.numbers[first]}" if raw.by_line
                           else f"row {raw.numbers[first]}")
            raise raw.error(i, f"this is a {row_kind_} row but the file's first row "
                               f"({first_where}) is a {kind} row; a file may not mix row kinds")
    return DataFile(path=raw.path, kind=kind, rows=raw.rows, lines=raw.numbers)


def _read_parquet(path: str) -> list[dict]:
    """The rows of a Parquet file as plain Python values (structs as dicts, lists as lists)."""
    if not os.path.exists(path):
        raise DataError("data file not found", file=path)
    try:
        import pyarrow.parquet as pq          # only here: JSON data needs no pyarrow
    except ImportError:
        raise DataError("reading Parquet needs pyarrow (pip install pyarrow)",
                        file=path) from None
    try:
        table = pq.read_table(path)
    except OSError as e:
        raise DataError(f"cannot read data file: {e.strerror or e}", file=path) from None
    except Exception as e:                     # pyarrow's ArrowInvalid: not Parquet at all
        raise DataError(f"not a readable Parquet file: {e}", file=path) from None
    return table.to_pylist()


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


# JSON's value types in the words of an error message; bool before int (a bool is an int).
_JSON_TYPES = ((type(None), "null"), (bool, "a boolean"), ((int, float), "a number"),
               (str, "a string"), (list, "an array"), (dict, "an object"))


def _json_type(value: Any) -> str:
    for kind, words in _JSON_TYPES:
        if isinstance(value, kind):
            return words
    return type(value).__name__


# --------------------------------------------------------------------------------------
# Row validation
# --------------------------------------------------------------------------------------

def row_kind(row: Any) -> str:
    """``"alpaca"``, ``"text"`` or ``"messages"``; raises ``ValueError`` for a bad row."""
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {_json_type(row)}")
    kinds = []
    if "instruction" in row or "output" in row:
        kinds.append("alpaca")
    if "text" in row:
        kinds.append("text")
    if "messages" in row:
        kinds.append("messages")
    if not kinds:
        have = ", ".join(repr(k) for k in list(row)[:8]) or "none"
        raise RowError("row has none of the fields 'instruction' and 'output' (Alpaca), "
                        f"'text' or 'messages' (it has: {have})")
    if len(kinds) > 1:
        raise RowError(f"row mixes the fields of {' and '.join(kinds)} rows; use one kind")
    kind = kinds[0]
    if kind == "alpaca":
        for name in ("instruction", "output"):
            if name not in row:
                raise RowError(f"missing field '{name}'")
            if not isinstance(row[name], str):
                raise RowError(f"field '{name}' must be a string, got {_json_type(row[name])}")
        if row.get("input") is not None and not isinstance(row["input"], str):
            raise RowError(f"field 'input' must be a string, got {_json_type(row['input'])}")
    elif kind == "text":
        if not isinstance(row["text"], str):
            raise RowError(f"field 'text' must be a string, got {_json_type(row['text'])}")
        if not row["text"].strip():
            raise RowError("field 'text' is empty")
    else:
        _check_messages(row["messages"])
    return kind


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise RowError(f"field 'messages' must be an array, got {_json_type(messages)}")
    if not messages:
        raise RowError("field 'messages' is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError(f"messages[{i}] must be an object, got {_json_type(m)}")
        for name in ("role", "content"):
            if name not in m:
                raise RowError(f"messages[{i}] is missing field '{name}'")
            if not isinstance(m[name], str):
                raise RowError(f"messages[{i}].{name} must be a string, "
                                f"got {_json_type(m[name])}")
        if m["role"] not in CHAT_ROLES:
            raise RowError(f"messages[{i}].role is '{m['role']}'; expected one of "
                            f"{', '.join(CHAT_ROLES)}")
        if m["role"] == "system" and i != 0:
            raise RowError(f"messages[{i}] is a system message; only the first may be")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body or body[0]["role"] != "user":
        raise RowError("the conversation must start with a user message "
                        "(after an optional system message)")
    if messages[-1]["role"] != "assistant":
        # A trailing user turn would never be trained on; it is almost surely a mistake.
        raise RowError("the last message must be from the assistant")
