"""Multi-adapter LoRA layers: one frozen base linear, many adapters, each on its own rows.

A batched step concatenates the micro-batches of several jobs along the batch dimension.
``BatchLayout`` says which rows belong to which adapter; every ``MultiLoraLinear`` in the
model shares one layout. The base projection runs once over all rows; each adapter's
delta is computed only on its own rows and added there. Rows of an adapter that does not
target a module pass through it unchanged.

Variants are small pieces on top of plain LoRA, with PEFT's math so adapters load there:
- rsLoRA: scaling ``alpha / sqrt(r)`` instead of ``alpha / r``;
- DoRA: a trained magnitude vector rescales the row-normalised adapted weight;
- LoRA+ lives in the optimizer (B's learning rate), not here.

Exactness: a dropout mask is a function of the job's micro-batch seed and the layer's name
alone, so a job draws the same masks whether it trains alone or with others, and a
recomputed forward (gradient checkpointing) draws the same masks again. Adapter weights and
their math are fp32 whatever the base dtype.
"""

from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Segment:
    adapter: str | None   # None: rows that no adapter touches (e.g. the base model alone)
    start: int
    end: int
    # The job's own padded length. Dropout masks are drawn for these positions only, so a
    # job draws the same masks whether the batch is padded further for other jobs or not.
    length: int | None = None
    # Seeds this micro-batch's dropout masks (with each layer's name); None: no dropout.
    dropout_seed: int | None = None


@dataclass
class BatchLayout:
    """Row ranges of the current batch per adapter, shared by every MultiLoraLinear.

    ``segments`` cover the batch's rows in order (dropout where a segment has a seed).
    ``single`` applies one adapter to every row whatever the batch size (generation,
    evaluation), without dropout.
    """

    segments: list[Segment] = field(default_factory=list)
    single: str | None = None

    def set_segments(self, segments: list[Segment]) -> None:
        self.segments, self.single = segments, None

    def set_single(self, adapter: str | None) -> None:
        self.segments, self.single = [], adapter


_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 steps), the same everywhere."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def dense_weight(base: nn.Linear) -> torch.Tensor:
    """The base linear's weight as a float32 (out, in) matrix, dequantized if need be.

    DoRA needs the weight itself (its row norms); a bitsandbytes 4-bit weight is packed
    and an 8-bit one is scaled per row.
    """
    weight = base.weight
    if getattr(weight, "quant_state", None) is not None:          # bitsandbytes Params4bit
        import bitsandbytes.functional as bnb_functional
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # On CPU the first forward repacks the weight for its kernels, and
            # dequantize_4bit does not read that layout: unpack it, on a copy of the
            # state, which the unpacking rewrites in place.
            data, state = bnb_functional._convert_weight_packed_for_cpu_inverse(
                data, copy.deepcopy(state))
        return bnb_functional.dequantize_4bit(data, state).float()
    if weight.dtype == torch.int8:                                 # bitsandbytes Int8Params
        # The row scales sit on the weight until the first forward moves them to the state.
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = getattr(getattr(base, "state", None), "SCB", None)
        if scales is None:
            raise RuntimeError("an int8 weight without its row scales (SCB)")
        return weight.data.float() * (scales.float().unsqueeze(1) / 127.0)
    return weight.float()


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraAdapter(nn.Module):
    """One adapter's weights on one linear layer (PEFT's layout: A is r x in, B is out x r)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float,
                 dropout: float, use_rslora: bool, use_dora: bool):
        super().__init__()
        self.r = r
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.dropout_p = dropout
        self.use_dora = use_dora
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=torch.float32))
        self.magnitude = (nn.Parameter(torch.zeros(out_features, dtype=torch.float32))
                          if use_dora else None)

    @torch.no_grad()
    def reset(self, generator: torch.Generator, base_weight: torch.Tensor) -> None:
        """PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)), B = 0; DoRA's m = ||W||."""
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])
        values = torch.empty(self.lora_A.shape, dtype=torch.float32).uniform_(
            -bound, bound, generator=generator)
        self.lora_A.copy_(values)
        self.lora_B.zero_()
        if self.magnitude is not None:
            self.magnitude.copy_(self.weight_norm(base_weight))

    def weight_norm(self, base_weight: torch.Tensor) -> torch.Tensor:
        """Row norms of W + scaling * B A, detached (DoRA section 4.3, as PEFT does)."""
        with torch.no_grad():
            adapted = base_weight.float() + self.scaling * (self.lora_B @ self.lora_A)
            return torch.linalg.norm(adapted, dim=1)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Linear,
              generator: torch.Generator | None, length: int | None = None) -> torch.Tensor:
        """What this adapter adds to the base output for input rows ``x`` (fp32)."""
        x = x.float()
        dropped = False
        if generator is not None and self.dropout_p > 0:
            keep = 1.0 - self.dropout_p
            x = x * _dropout_mask(x, keep, generator, length) / keep
            dropped = True
        lora_out = (x @ self.lora_A.t()) @ self.lora_B.t()
        if self.magnitude is None:
            return lora_out * self.scaling
        weight = dense_weight(base)
        mag_norm_scale = self.magnitude / self.weight_norm(weight)
        if dropped:
            # PEFT recomputes the base projection on the dropped-out input for DoRA.
            base_result = x @ weight.t()
        else:
            base_result = base_out.float()
            if base.bias is not None:
                base_result = base_result - base.bias.float()
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_out * self.scaling


def _dropout_mask(x: torch.Tensor, keep: float, generator: torch.Generator,
                  length: int | None) -> torch.Tensor:
    """A Bernoulli keep-mask; only the first ``length`` positions draw random numbers."""
    if length is None or x.dim() < 3 or length >= x.shape[1]:
        return torch.empty_like(x).bernoulli_(keep, generator=generator)
    drawn = torch.empty_like(x[:, :length]).bernoulli_(keep, generator=generator)
    # Positions past the job's own length are padding for this job: nothing reads them.
    rest = torch.ones_like(x[:, length:])
    return torch.cat([drawn, rest], dim=1)


class MultiLoraLinear(nn.Module):
    """A frozen base ``nn.Linear`` plus any number of named adapters, batched by rows."""

    def __init__(self, base: nn.Linear, layout: BatchLayout, name: str):
        super().__init__()
        self.base = base
        self.layout = layout
        self.adapters = nn.ModuleDict()
        # Identifies the layer in dropout seeds: stable across runs and adapter sets.
        self.name_key = zlib.crc32(name.encode())

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight of its projections
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = self.base(x)
        layout = self.layout
        if layout.single is not None:
            adapter = self.adapters[layout.single] if layout.single in self.adapters else None
            if adapter is None:
                return base_out
            return base_out + adapter.delta(x, base_out, self.base, None).to(base_out.dtype)
        if not any(s.adapter in self.adapters for s in layout.segments):
            return base_out
        pieces = []
        for seg in layout.segments:
            rows = base_out[seg.start:seg.end]
            adapter = self.adapters[seg.adapter] if seg.adapter in self.adapters else None
            if adapter is not None:
                generator = None
                if seg.dropout_seed is not None and adapter.dropout_p > 0:
                    generator = torch.Generator(device=x.device).manual_seed(
                        mix_seed(seg.dropout_seed, self.name_key))
                delta = adapter.delta(x[seg.start:seg.end], rows, self.base, generator,
                                      seg.length)
                rows = rows + delta.to(rows.dtype)
            pieces.append(rows)
        return torch.cat(pieces, dim=0)


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def wrap_linears(model: nn.Module, names: list[str], layout: BatchLayout) -> dict[str, MultiLoraLinear]:
    """Replace each named ``nn.Linear`` by a MultiLoraLinear (idempotent); returns all wrapped."""
    wrapped = {}
    for name in names:
        parent, attr = _parent_and_attr(model, name)
        module = getattr(parent, attr)
        if not isinstance(module, MultiLoraLinear):
            module = MultiLoraLinear(module, layout, name)
            setattr(parent, attr, module)
        wrapped[name] = module
    return wrapped


def multi_lora_modules(model: nn.Module) -> dict[str, MultiLoraLinear]:
    """Every MultiLoraLinear in the model, by the name of the base linear it wraps."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiLoraLinear)}
