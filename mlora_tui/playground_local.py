"""The playground without an engine: adapter folders loaded once, asked many prompts.

``mlora-tui --playground DIR...`` loads the base model and the adapters itself (in a worker
thread of the TUI) and keeps the loaded ``AdapterSet`` between prompts, so only the first
prompt pays for loading. ``generate_rows`` is ``engine.train.generate.generate_many`` on an
already-loaded set and a chosen subset of its rows: the same templates (the base row uses
the first chosen adapter's), the same checks, the same batched decode, so its answers are
``generate_many``'s for those folders.

Torch is imported inside the functions only: ``mlora_tui`` imports no torch at start-up.
The helpers for the screen (row names, template names) read the folders' JSON, no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

BASE_ROW = "base"     # engine.train.adapter_set.BASE_ROW, without importing torch
META_FILE = "mlora_adapter.json"


class Stopped(Exception):
    """Raised from a token callback to abandon a generation (the screen closed)."""


def row_names(folders: Sequence[Path]) -> list[str]:
    """The rows' names as ``load_adapter_set`` gives them: the folder's name, or
    ``parent/name`` where two share one (engine.train.adapter_set.row_names)."""
    names = [f.name for f in folders]
    return [f"{f.parent.name}/{n}" if names.count(n) > 1 else n for f, n in zip(folders, names)]


def folder_meta(folder: Path) -> dict:
    """What ``mlora_adapter.json`` records ({} for a PEFT folder or an unreadable one)."""
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def template_name(meta: dict) -> str:
    """The prompt template an adapter was trained with (``saved_template``'s rule)."""
    return str(meta.get("prompt") or (meta.get("adapter") or {}).get("prompt") or "alpaca")


def check_folders(folders: Sequence[Path]) -> Optional[str]:
    """Why these cannot be adapter folders (None when they look like ones), without torch."""
    if not folders:
        return "--playground needs at least one adapter folder"
    for folder in folders:
        if not folder.is_dir():
            return f"{folder}: no such folder"
        if not (folder / "adapter_config.json").is_file():
            return f"{folder}: not an adapter folder (no adapter_config.json)"
    names = row_names(folders)
    if len(set(names)) != len(names):
        return "two adapter folders would share a row name; give each a distinct name"
    if BASE_ROW in names:
        return f"an adapter folder is named {BASE_ROW!r}, the name of the base model's row"
    return None


def load(folders: Sequence[str | Path], log: Optional[Callable[[str], None]] = None):
    """The base model with every adapter attached, plus the base row (an ``AdapterSet``)."""
    from engine.train.adapter_set import load_adapter_set

    return load_adapter_set(list(folders), include_base=True, log=log)


def generate_rows(aset: Any, names: Sequence[str], prompt: str, *, input: str = "",
                  max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                  seed: Optional[int] = None, raw: bool = False,
                  on_text: Optional[Callable[[str, str], None]] = None) -> list:
    """The answers of the rows named ``names`` (in the set's order), as ``generate_many``
    gives them for those folders: a list of ``Generation``. ``on_text(name, text so far)``
    streams them; raising ``Stopped`` from it abandons the decode."""
    from engine.core.errors import UserError
    from engine.train.decode import BatchedDecoder, DecodeRow, SamplingSettings
    from engine.train.generate import (Generation, _check_length, _check_options, _template,
                                       prompt_ids, stop_ids)

    _check_options(prompt, max_new_tokens, temperature, top_p)
    wanted = set(names)
    unknown = wanted - {row.name for row in aset.rows}
    if unknown:
        raise UserError(f"no row named {sorted(unknown)[0]!r}")
    rows = [row for row in aset.rows if row.name in wanted]
    if not rows:
        raise UserError("choose at least one row to answer")
    first = next((row for row in rows if row.adapter is not None), None)
    tokenizer = aset.tokenizer
    decode_rows = []
    for row in rows:
        source = row if row.adapter is not None else first
        template = None if raw or source is None else _template(source.meta, source.folder)
        ids = prompt_ids(prompt, tokenizer, template, input)
        _check_length(aset, ids, max_new_tokens, row.name)
        decode_rows.append(DecodeRow(row.adapter, ids, key=row.name))

    def on_token(i: int, _token: int) -> None:
        if on_text:
            text = tokenizer.decode(decode_rows[i].tokens, skip_special_tokens=True)
            on_text(rows[i].name, text.strip())

    settings = SamplingSettings(max_new_tokens, temperature, top_p, seed)
    BatchedDecoder(aset, decode_rows, settings, stop_ids(aset.model, tokenizer),
                   on_token=on_token).run()
    return [Generation(row.name, tokenizer.decode(done.tokens, skip_special_tokens=True)
                       .strip(), len(done.tokens), done.stop)
            for row, done in zip(rows, decode_rows)]
