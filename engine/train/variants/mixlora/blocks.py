"""MixLoRA's feed-forward blocks: which shapes it knows, and the module that takes a block's
forward so that every MixLoRA adapter on it routes its own rows' tokens.

Per block and pass: the base input projections (gate(x), up(x); gate_up(x); fc1(x)) run
once over every row of the batch, and so does the output projection on the base
intermediate: rows of plain LoRA/DoRA adapters get their own LoRA there (the linears stay
MultiLoraLinear), MixLoRA rows the base feed-forward. Each MixLoRA segment's experts then
add their part on its own tokens (engine/train/variants/mixlora/experts.py).
"""

from __future__ import annotations

import types
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from engine.core.errors import ConfigError
from engine.train.lora import AdapterHost, BatchLayout, MultiLoraLinear, Segment


@dataclass(frozen=True)
class Kind:
    name: str
    inputs: tuple[str, ...]   # projections that read the block's input
    output: str               # the projection that writes the block's output


KINDS = (
    Kind("gated", ("gate_proj", "up_proj"), "down_proj"),     # llama, qwen, gemma, mistral
    Kind("fused", ("gate_up_proj",), "down_proj"),            # phi3, glm, glm4
    Kind("plain", ("fc1",), "fc2"),                            # phi
)


def intermediate(kind: Kind, pre: list[torch.Tensor], act: Callable) -> torch.Tensor:
    """The output projection's input from the input projections' outputs (as transformers)."""
    if kind.name == "gated":
        return act(pre[0]) * pre[1]
    if kind.name == "fused":
        gate, up = pre[0].chunk(2, dim=-1)
        return up * act(gate)
    return act(pre[0])


@dataclass
class FeedForward:
    index: int          # the decoder layer's index
    name: str           # its module name, e.g. "model.layers.0.mlp"
    module: nn.Module
    kind: Kind

    @property
    def projections(self) -> tuple[str, ...]:
        return self.kind.inputs + (self.kind.output,)


def feed_forwards(model: nn.Module) -> list[FeedForward]:
    """The feed-forward block of each decoder layer that MixLoRA knows the shape of."""
    from engine.train.models import decoder_layers

    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for index, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        for kind in KINDS:
            if all(isinstance(getattr(mlp, p, None), (nn.Linear, MultiLoraLinear))
                   for p in kind.inputs + (kind.output,)):
                found.append(FeedForward(index, names[id(mlp)], mlp, kind))
                break
    return found


def base_act(mlp: nn.Module) -> Callable:
    for attr in ("act_fn", "activation_fn", "act"):
        act = getattr(mlp, attr, None)
        if act is not None:
            return act
    raise ConfigError(f"MixLoRA: cannot find the activation of {type(mlp).__name__}")


def base_linear(module: nn.Module) -> nn.Module:
    """The frozen base linear of a projection, wrapped or not."""
    return module.base if isinstance(module, MultiLoraLinear) else module


class MixLoraFFN(AdapterHost):
    """Installed on a feed-forward block as ``mlp.mixlora``; the block's forward goes here.
    ``adapters`` holds each MixLoRA adapter's MixLoraExperts on this block.

    Rows of segments whose adapter has experts here go through them; every other row gets
    the block's own computation (and the plain LoRA of its adapter, if any).
    """

    def __init__(self, ffn: FeedForward, layout: BatchLayout):
        super().__init__()
        self.layout = layout
        self.kind = ffn.kind
        self.block_name = ffn.name
        # Identify the layer and its projections in random seeds (as MultiLoraLinear does).
        self.key = zlib.crc32(ffn.name.encode())
        self.proj_keys = {p: zlib.crc32(f"{ffn.name}.{p}".encode()) for p in ffn.projections}

    def saved_name(self, module_name: str) -> str:
        return module_name.rsplit(".", 1)[0]   # the block's keys, not this holder's

    def forward(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        if layout.single is not None:
            if layout.single not in self.adapters:
                return type(mlp).forward(mlp, x)
            active = [(None, self.adapters[layout.single])]
        else:
            active = [(seg, self.adapters[seg.adapter]) for seg in layout.segments
                      if seg.adapter in self.adapters]
            if not active:
                return type(mlp).forward(mlp, x)
        kind = self.kind
        # Once for every row: the base projections (plus other adapters' plain LoRA).
        pre = [getattr(mlp, p)(x) for p in kind.inputs]
        out = getattr(mlp, kind.output)(intermediate(kind, pre, base_act(mlp)))
        shape = out.shape
        width = x.shape[1] if x.dim() == 3 else 1
        flat_x = x.reshape(-1, x.shape[-1])
        flat_pre = [p.reshape(-1, p.shape[-1]) for p in pre]
        flat_out = out.reshape(-1, shape[-1])
        positions, deltas = [], []
        for seg, experts in active:
            pos, rows = _tokens(seg, flat_x.shape[0], width, x.device)
            delta = experts(self, mlp, flat_x[pos], [p[pos] for p in flat_pre], flat_out[pos],
                            rows, seg)
            positions.append(pos)
            deltas.append(delta.to(flat_out.dtype))
        flat_out = flat_out.index_add(0, torch.cat(positions), torch.cat(deltas))
        return flat_out.view(shape)


def _tokens(seg: Optional[Segment], count: int, width: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions of the tokens an adapter routes, and each one's row, row-major.

    Generation and evaluation (no segment): every position. Training: the segment's real
    tokens (its token mask; without one, every position within the job's own length).
    """
    if seg is None:
        pos = torch.arange(count, device=device)
        return pos, pos // width
    if seg.token_rows is not None:   # a packed pass: the segment's positions, all real
        return torch.arange(seg.start, seg.end, device=device), seg.token_rows
    length = min(seg.length if seg.length is not None else width, width)
    mask = seg.token_mask
    if mask is None:
        mask = torch.ones((seg.end - seg.start, length), dtype=torch.bool, device=device)
    rows, cols = mask[:, :length].nonzero(as_tuple=True)
    return (seg.start + rows) * width + cols, rows


def _routed_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp.mixlora(mlp, x)


def install(ffn: FeedForward, layout: BatchLayout) -> MixLoraFFN:
    """The block's MixLoraFFN, installed (and taking its forward) on first use."""
    holder = getattr(ffn.module, "mixlora", None)
    if not isinstance(holder, MixLoraFFN):
        holder = MixLoraFFN(ffn, layout)
        ffn.module.mixlora = holder
        ffn.module.forward = types.MethodType(_routed_forward, ffn.module)
    return holder

