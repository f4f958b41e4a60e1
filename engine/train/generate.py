"""Trying a trained adapter: generate a continuation of one prompt, with or without it.

``generate`` reads an adapter folder as written by the engine (PEFT files plus
``mlora_adapter.json``), loads the base model it was trained on, attaches the adapter to
the same layers with the engine's own LoRA layers, and formats the prompt exactly as
training formatted an Alpaca row with that instruction and input, so what the adapter
sees at generation time is what it learnt on. ``base_only`` runs the same prompt through
the bare base model, for comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from engine.train.adapter_set import (attach_saved, base_model_path, check_supported,
                                      saved_template)
from engine.train.adapters import read_adapter_folder
from engine.core.config import ModelConfig
from engine.core.errors import UserError
from engine.train.lora import BatchLayout
from engine.train.models import load_base_model, select_device
from engine.core.prompts import PromptTemplate

ADAPTER_NAME = "adapter"   # the adapter's name inside the model; any name would do


def generate(adapter_dir: str | Path, prompt: str, *, input: str = "", base_only: bool = False,
             max_new_tokens: int = 64, temperature: float = 0.0,
             base_model: Optional[str] = None, raw: bool = False, seed: Optional[int] = None,
             log: Optional[Callable[[str], None]] = None) -> str:
    """The text the model generates after ``prompt`` (the continuation only).

    ``temperature`` 0 decodes greedily; above 0 it samples (``seed`` makes that
    repeatable). ``base_model`` overrides the base model recorded in the adapter folder.
    ``raw`` sends ``prompt`` as is instead of through the adapter's prompt template (for
    adapters trained on plain text rows). Every user mistake raises ``UserError``.
    """
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    adapter_dir = Path(adapter_dir)
    peft_cfg, state, meta = read_adapter_folder(adapter_dir)
    check_supported(peft_cfg, adapter_dir)
    template = None if raw else _template(meta, adapter_dir)

    device = select_device()
    model_path = base_model_path(base_model, peft_cfg, meta, adapter_dir, log)
    # The base runs as the adapter was trained on it (dtype, quantization: recorded beside it).
    model_cfg = ModelConfig(base_model=str(model_path), dtype=meta.get("dtype", "fp32"),
                            quantize=meta.get("quantize", "none"))
    model, tokenizer, _info = load_base_model(model_cfg, device, log=log)
    if not base_only:
        attach_saved_adapter(model, peft_cfg, state, adapter_dir, device)

    ids = prompt_ids(prompt, tokenizer, template, input)
    return _decode_continuation(model, tokenizer, ids, device, max_new_tokens=max_new_tokens,
                                temperature=temperature, seed=seed)


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


@torch.inference_mode()
def _decode_continuation(model, tokenizer, ids: list[int], device: torch.device, *,
                         max_new_tokens: int, temperature: float, seed: Optional[int]) -> str:
    from transformers import GenerationConfig

    sample = temperature > 0
    # Every field is explicit so the model's own generation_config (which may ask for
    # sampling, top-p and so on) does not change what --temperature means.
    options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=sample,
                                   pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=_stop_ids(model, tokenizer))
    if sample:
        options.update(temperature=temperature, top_k=0, top_p=1.0)
        if seed is not None:
            torch.manual_seed(seed)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            generation_config=GenerationConfig(**options))
    return tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip()


def _stop_ids(model, tokenizer) -> list[int]:
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
