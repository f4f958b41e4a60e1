"""Trying trained adapters side by side: each answers the same prompt, in one batched decode.

``generate_many`` reads adapter folders (this product's, PEFT's own), loads the base model
they were trained on once (``adapter_set``), and formats the prompt for each adapter exactly
as training formatted an Alpaca row with that instruction and input (its own template), so
what an adapter sees at generation time is what it learnt on. All rows then decode together
(``decode.BatchedDecoder``: one forward per new token for every adapter, a KV cache, rows
leaving the batch as they finish). ``base_only`` runs the prompt through the bare base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from engine.core.errors import UserError
from engine.core.prompts import PromptTemplate
from engine.train.adapter_set import attach_saved, load_adapter_set, saved_template
from engine.train.decode import BatchedDecoder, DecodeRow, SamplingSettings
from engine.train.lora import BatchLayout
from engine.train.scoring import max_length

ADAPTER_NAME = "adapter"   # the adapter's name inside the model; any name would do


@dataclass
class Generation:
    """One row's answer: its name, the text, and why it stopped ("eos" or "length")."""
    name: str
    text: str
    tokens: int
    stop: str


def generate_many(adapters: Sequence[str | Path], prompt: str, *, input: str = "",
                  include_base: bool = False, base_only: bool = False,
                  max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                  seed: Optional[int] = None, base_model: Optional[str] = None,
                  raw: bool = False, log: Optional[Callable[[str], None]] = None,
                  on_text: Optional[Callable[[str, str], None]] = None) -> list[Generation]:
    """Every adapter's answer to ``prompt`` (and the base model's with ``include_base``; the
    base model's alone with ``base_only``), in one batched decode.

    Each adapter's prompt goes through its own template (``raw``: the prompt as is); the
    base row uses the first adapter's. ``on_text(name, text so far)`` streams the answers.
    Every user mistake raises ``UserError``.
    """
    _check_options(prompt, max_new_tokens, temperature, top_p)
    aset = load_adapter_set(list(adapters), include_base=include_base or base_only,
                            base_model=base_model, log=log)
    rows = [r for r in aset.rows if r.adapter is None] if base_only else aset.rows
    first = next((r for r in aset.rows if r.adapter is not None), None)
    decode_rows = []
    for row in rows:
        source = row if row.adapter is not None else first
        template = None if raw or source is None else _template(source.meta, source.folder)
        ids = prompt_ids(prompt, aset.tokenizer, template, input)
        _check_length(aset, ids, max_new_tokens, row.name)
        decode_rows.append(DecodeRow(row.adapter, ids, key=row.name))
    tokenizer = aset.tokenizer
    texts = {}

    def on_token(i: int, _token: int) -> None:
        if on_text:
            text = tokenizer.decode(decode_rows[i].tokens, skip_special_tokens=True)
            on_text(rows[i].name, text.strip())

    settings = SamplingSettings(max_new_tokens, temperature, top_p, seed)
    decoder = BatchedDecoder(aset, decode_rows, settings, stop_ids(aset.model, tokenizer),
                             on_token=on_token)
    # Nothing here trains: inference mode skips autograd's bookkeeping (about 5% a token).
    # The engine's playground decodes under no_grad only, beside training.
    with torch.inference_mode():
        decoder.run()
    for row, done in zip(rows, decode_rows):
        texts[row.name] = Generation(row.name, tokenizer.decode(
            done.tokens, skip_special_tokens=True).strip(), len(done.tokens), done.stop)
    return [texts[row.name] for row in rows]


def generate(adapter_dir: str | Path, prompt: str, *, base_only: bool = False, **options) -> str:
    """One adapter's answer (or, ``base_only``, its base model's): ``generate_many``'s text."""
    return generate_many([adapter_dir], prompt, base_only=base_only, **options)[0].text


def _check_options(prompt: str, max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not prompt.strip():
        raise UserError("the prompt is empty")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")


def _check_length(aset, ids: list[int], max_new_tokens: int, name: str) -> None:
    limit = max_length(aset.model, aset.tokenizer)
    if len(ids) + max_new_tokens > limit:
        raise UserError(f"{name}: the prompt ({len(ids)} tokens) and --max-new-tokens "
                        f"{max_new_tokens} exceed the model's context of {limit} tokens; "
                        "shorten the prompt or ask for fewer tokens")


def attach_saved_adapter(model, peft_cfg: dict, state: dict, adapter_dir: str | Path,
                         device: torch.device) -> BatchLayout:
    """Attach a saved adapter to ``model`` so that it applies to every row (generation
    batches are not split by job). Returns the layout its layers share."""
    layout = BatchLayout()
    attach_saved(model, layout, ADAPTER_NAME, peft_cfg, state, adapter_dir, device)
    layout.set_single(ADAPTER_NAME)
    return layout


def prompt_ids(instruction: str, tokenizer: Any, template: Optional[PromptTemplate],
               input: str = "") -> list[int]:
    """Token ids of the prompt that training put before an Alpaca row's output.

    Mirrors ``engine.core.data.encode_row`` for a row with this instruction and input: a text
    template is tokenized with the tokenizer's special tokens (BOS) and without a trailing
    EOS; the chat template renders a user turn plus the assistant header, which already
    holds any special tokens. ``template`` None sends the text as is, like a text row.
    """
    if template is not None and template.chat:
        text = template.render(instruction, input, tokenizer=tokenizer)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = instruction if template is None else template.render(instruction, input)
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if ids and ids[-1] == eos and not text.endswith(str(tokenizer.eos_token)):
        ids = ids[:-1]
    return ids


def stop_ids(model, tokenizer) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (chat models add theirs)."""
    stops = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops.extend(configured if isinstance(configured, list) else [configured])
    return list(dict.fromkeys(int(i) for i in stops if i is not None))


def _template(meta: dict, adapter_dir: Path) -> PromptTemplate:
    try:
        return saved_template(meta, adapter_dir)
    except UserError as e:
        raise UserError(f"{e}; pass --raw to send the prompt without a template") from None
