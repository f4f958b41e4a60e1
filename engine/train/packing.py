"""Sequence packing: a pass's examples back to back in one row, without padding.

A packed pass concatenates the examples of its jobs into one row of ``sum(lengths)``
tokens, with position ids restarting at 0 at each example. Every position-wise part of the
model (embeddings, linears, norms, the MLP, the LoRA deltas) runs as on padded rows, minus
the padding. Attention must not cross from one example into another: during a packed pass
the model's attention layers call ``packed_attention`` (registered with transformers'
``AttentionInterface`` as ``"mlora_packed"``), which runs causal attention on each example
on its own. Because that name has no attention-mask function, transformers builds no mask
at all for the pass (no ``sum(lengths)^2`` block-diagonal mask either).

Loss masking: the first label of every example is ``IGNORE_INDEX``, so the shifted labels
of the packed row never ask the last token of one example to predict the first of the next.

Only models whose attention goes through transformers' ``AttentionInterface`` can pack:
``packing_problem`` checks the model's classes, then runs a probe (the same few tokens
twice in one packed row: both copies must come out the same, as they do only if the second
attends to itself alone and its positions restart).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv

from engine.core.data import IGNORE_INDEX

PACKED_ATTENTION = "mlora_packed"
_BOUNDS_ATTR = "_mlora_packed_bounds"


@dataclass
class Packed:
    """One packed row: ``input_ids``, ``labels``, ``position_ids`` (each 1 x T, on the CPU)
    and each example's ``[start, end)`` in it."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    bounds: list[tuple[int, int]]

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]


def pack(examples: list) -> Packed:
    """The encoded examples back to back in one row (no padding)."""
    ids, labels, positions, bounds = [], [], [], []
    for example in examples:
        n = len(example.input_ids)
        bounds.append((len(ids), len(ids) + n))
        ids.extend(example.input_ids)
        # The first token is never predicted (its label would be the previous example's
        # last token's target).
        labels.append(IGNORE_INDEX)
        labels.extend(example.labels[1:n])
        positions.extend(range(n))
    def row(values):
        return torch.tensor(values, dtype=torch.long).unsqueeze(0)
    return Packed(row(ids), row(labels), row(positions), bounds)


def _allowed(n: int, causal: bool, window: int | None, device) -> torch.Tensor:
    """(n, n) bool: which keys each query of an example may attend to (transformers'
    semantics: causal, and within ``window`` positions)."""
    i = torch.arange(n, device=device).view(-1, 1)
    j = torch.arange(n, device=device).view(1, -1)
    allowed = torch.ones((n, n), dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (j <= i)
    if window is not None:
        allowed = allowed & (i - j < window) & (j - i < window)
    return allowed


def _eager(query, key, value, scaling, causal, window, softcap):
    """Attention of one example, written out: for soft-capped logits (SDPA has no cap)."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    allowed = _allowed(query.shape[2], causal, window, query.device)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value)


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, sliding_window: int | None = None,
                     softcap: float | None = None, **kwargs):
    """transformers' attention-function contract: (batch, heads, T, head_dim) in,
    ((batch, T, heads, head_dim), None) out; each example of the packed row on its own."""
    bounds = getattr(module.config, _BOUNDS_ATTR, None)
    if bounds is None:
        raise RuntimeError("packed attention called outside a packed pass")
    if kwargs.get("s_aux") is not None:
        raise RuntimeError("packed attention does not support attention sinks")
    causal = getattr(module, "is_causal", True)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    gqa = query.shape[1] != key.shape[1]
    # One split per tensor, not a slice per example: a split's backward is one
    # concatenation of the examples' gradients, where each slice's backward would write a
    # whole zero tensor (examples x tokens of memory traffic in every layer).
    sizes = [end - start for start, end in bounds]
    outs = []
    for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2),
                       value.split(sizes, dim=2)):
        n = q.shape[2]
        dropout_p = dropout if module.training else 0.0
        if softcap is not None:
            outs.append(_eager(q, k, v, scaling, causal, sliding_window, softcap))
        elif sliding_window is None or n <= sliding_window:
            outs.append(F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scaling,
                **({"enable_gqa": True} if gqa else {})))
        else:   # an example longer than the window: SDPA with the band as its mask
            n_rep = q.shape[1] // k.shape[1]
            outs.append(F.scaled_dot_product_attention(
                q, repeat_kv(k, n_rep), repeat_kv(v, n_rep),
                attn_mask=_allowed(n, causal, sliding_window, q.device),
                dropout_p=dropout_p, scale=scaling))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def _configs(model: nn.Module) -> list:
    """Every distinct config object the model's modules read (text and sub-configs)."""
    from transformers import PretrainedConfig
    seen: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextlib.contextmanager
def packed_pass(model: nn.Module, bounds: list[tuple[int, int]]):
    """Within: the model's attention runs each ``[start, end)`` of the row on its own.

    Hold it over the forward and the backward (gradient checkpointing recomputes the
    attention during the backward).
    """
    _register()
    configs = _configs(model)
    saved = [config._attn_implementation for config in configs]
    try:
        for config in configs:
            config._attn_implementation = PACKED_ATTENTION
            setattr(config, _BOUNDS_ATTR, list(bounds))
        yield
    finally:
        for config, impl in zip(configs, saved):
            config._attn_implementation = impl
            if hasattr(config, _BOUNDS_ATTR):
                delattr(config, _BOUNDS_ATTR)


def packing_problem(model: nn.Module, decoder: nn.Module, device: torch.device) -> str | None:
    """Why this model cannot train packed (None: it can)."""
    module = type(model).__module__
    if not module.startswith("transformers.models."):
        return (f"its code ({module}) is not one of transformers' own models, whose "
                "attention packing relies on")
    if not any(type(m).__name__.endswith("Attention") for m in model.modules()):
        return "no attention layer found"
    # The probe: four tokens twice, in one row, positions 0-3 and 0-3 again.
    ids = torch.tensor([[3, 5, 7, 11, 3, 5, 7, 11]], device=device)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]], device=device)
    try:
        with torch.no_grad(), packed_pass(model, [(0, 4), (4, 8)]):
            hidden = decoder(input_ids=ids, position_ids=positions, attention_mask=None,
                             use_cache=False).last_hidden_state.float()
    except Exception as exc:  # noqa: BLE001 - any failure means: do not pack
        return f"a packed forward pass failed ({type(exc).__name__}: {exc})"
    first, second = hidden[0, :4], hidden[0, 4:]
    scale = float(first.abs().max()) or 1.0
    difference = float((first - second).abs().max()) / scale
    if not difference <= 1e-2:
        return ("in a packed probe the second example attended to the first "
                f"(relative difference {difference:.2g})")
    return None
