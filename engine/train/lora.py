"""Multi-adapter LoRA layers: one frozen base linear, many adapters, each on its own rows.

A batched step concatenates the micro-batches of several jobs along the batch dimension.
``BatchLayout`` says which rows belong to which adapter; every ``MultiLoraLinear`` in the
model shares one layout. The base projection runs once over all rows; each adapter's
delta is computed only on its own rows and added there. Rows of an adapter that does not
target a module pass through it unchanged. Each plain-LoRA segment is two small matmuls
with its own adapter's weights (``MultiLoraLinear._plain_delta``; back-to-back segments of
equal rows and rank as one batched pair); an adapter of another variant computes its own
delta (``LoraAdapter.delta``, overridden in engine/train/variants: DoRA's, say). A row never
meets another adapter's weights, so a NaN in one adapter stays in its job's rows. Where the
base is a plain ``nn.Linear`` all deltas are added into its output in place, as one tensor
of the batch's rows (no copy of the output).

``LoraAdapter`` is plain LoRA's weights on one linear, with PEFT's math so adapters load
there, and the base class of every variant's per-linear piece; the variants themselves
(rsLoRA's scaling, DoRA, MixLoRA, ...) live in engine/train/variants. Modules that hold
adapters by name (this layer, MixLoRA's feed-forward blocks) are ``AdapterHost``s, so that
saving, loading and detaching an adapter need not know its variant.

Packed passes (engine/train/packing.py) put every example in one row; their segments are ranges
of token positions, and each layer runs on the positions as rows (``BatchLayout.packed``).

Exactness: a dropout mask is a function of the job's micro-batch seed, the layer's name and
the job's own tokens alone (padded rows: its rows up to its own longest; packed: its real
tokens), so a job draws the same masks whether it trains alone or with others, and a
recomputed forward (gradient checkpointing) draws the same masks again. Adapter weights and
their math are fp32 whatever the base dtype.
"""

from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass, field
from typing import Iterable

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
    # Only for a variant whose layers treat each token apart (``Variant.routes_tokens``:
    # MixLoRA routes them). Padded rows: (rows, length) bool, the job's real (non-padding)
    # tokens (its ``begin_pass`` sets it). Packed passes: (tokens,) long, each token's
    # example within the job's micro-batch (the engine sets it); every token is real there.
    token_mask: torch.Tensor | None = None
    token_rows: torch.Tensor | None = None

    def tokens_to(self, device: torch.device) -> None:
        """Move the token facts a variant set (``token_mask``, ``token_rows``) to ``device``."""
        if self.token_mask is not None:
            self.token_mask = self.token_mask.to(device)
        if self.token_rows is not None:
            self.token_rows = self.token_rows.to(device)


@dataclass
class BatchLayout:
    """Row ranges of the current batch per adapter, shared by every MultiLoraLinear.

    ``segments`` cover the batch's rows in order (dropout where a segment has a seed).
    ``single`` applies one adapter to every row whatever the batch size (generation,
    evaluation), without dropout.
    """

    segments: list[Segment] = field(default_factory=list)
    single: str | None = None
    # Packed pass (engine/train/packing.py): the batch is one row of examples back to back, and
    # segments are ranges of its token positions instead of rows.
    packed: bool = False

    def set_segments(self, segments: list[Segment], packed: bool = False) -> None:
        self.segments, self.single, self.packed = segments, None, packed

    def set_single(self, adapter: str | None) -> None:
        self.segments, self.single, self.packed = [], adapter, False


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


# An adapter's optimizer parameter groups: "A" trains at the job's lr, "B" and "magnitude"
# at lr * loraplus_lr_ratio (LoRA+, as PEFT's create_loraplus_optimizer: B and 1-D tensors).
PARAM_GROUPS = ("A", "B", "magnitude")


def merge_groups(groups: Iterable[dict[str, list]]) -> dict[str, list[nn.Parameter]]:
    """Parameter groups (``PARAM_GROUPS`` keys) put together, in the order given."""
    merged: dict[str, list] = {key: [] for key in PARAM_GROUPS}
    for group in groups:
        for key, params in group.items():
            merged[key].extend(params)
    return merged


class LoraAdapter(nn.Module):
    """Plain LoRA's weights on one linear layer (PEFT's layout: A is r x in, B is out x r),
    and the base class of every variant's piece on a linear (engine/train/variants)."""

    # True: the layer computes this adapter's delta with its own batched plain-LoRA math.
    # A variant whose delta differs sets False and overrides ``delta``.
    batched = True

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float,
                 dropout: float):
        super().__init__()
        self.r = r
        self.scaling = scaling
        self.dropout_p = dropout
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=torch.float32))

    @torch.no_grad()
    def reset(self, generator: torch.Generator, base_weight: torch.Tensor) -> None:
        """PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)), B = 0."""
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])
        values = torch.empty(self.lora_A.shape, dtype=torch.float32).uniform_(
            -bound, bound, generator=generator)
        self.lora_A.copy_(values)
        self.lora_B.zero_()

    def dropped_input(self, x: torch.Tensor, generator: torch.Generator | None,
                      length: int | None) -> torch.Tensor:
        """fp32 rows ``x`` after this adapter's dropout (``x`` itself when none is drawn)."""
        if generator is None or self.dropout_p <= 0:
            return x
        keep = 1.0 - self.dropout_p
        return x * _dropout_mask(x, keep, generator, length) / keep

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module,
              generator: torch.Generator | None, length: int | None = None) -> torch.Tensor:
        """What this adapter adds to ``base_out``, the base linear ``base``'s output of input
        rows ``x`` (fp32); ``generator`` draws the dropout mask (None: no dropout)."""
        x = self.dropped_input(x.float(), generator, length)
        lora_out = (x @ self.lora_A.t()) @ self.lora_B.t()
        return lora_out * self.scaling

    def tensors(self) -> dict[str, nn.Parameter]:
        """Its saved tensors, by PEFT's key names after the linear's module name."""
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"A": [self.lora_A], "B": [self.lora_B]}


def _dropout_mask(x: torch.Tensor, keep: float, generator: torch.Generator,
                  length: int | None) -> torch.Tensor:
    """A float32 0/1 keep-mask shaped like ``x``; only the first ``length`` positions draw."""
    mask = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    drawn = mask
    if length is not None and x.dim() >= 3 and length < x.shape[1]:
        mask[:, length:] = 1.0
        drawn = mask[:, :length]
    bits = _draw_bits(drawn.shape, generator, mask.device)
    torch.lt(_halves(bits, drawn.shape[-1]), _keep_threshold(keep), out=drawn)
    return mask


# How a keep-mask is drawn (one segment's region, shape (..., n)): 64-bit draws shaped
# (..., ceil(n / 2)), whose two 32-bit halves give two elements of a row (a row of odd n
# leaves one half unused), each kept where it is below keep * 2**32 - 2**31 (the keep
# probability is exact to 2**-32). Two elements per draw: half the random-number work of
# one draw per element, which is most of a mask's cost on CPU.


def _draw_bits(shape: tuple, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    bits = torch.empty(tuple(shape[:-1]) + ((shape[-1] + 1) // 2,), dtype=torch.int64,
                       device=device)
    return bits.random_(-2 ** 63, None, generator=generator)


def _halves(bits: torch.Tensor, n: int) -> torch.Tensor:
    """The 32-bit halves of 64-bit draws, n per row."""
    return bits.view(torch.int32)[..., :n]


def _keep_threshold(keep: float) -> int:
    return min(round(keep * 2 ** 32), 2 ** 32 - 1) - 2 ** 31


def _seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class AdapterHost(nn.Module):
    """A module of the model that holds adapters by name in ``adapters`` (a linear's LoRA,
    a feed-forward block's MixLoRA experts). Each held module gives its tensors
    (``tensors()``, saved under ``saved_name(this module's name)``) and its optimizer
    parameter groups (``param_groups()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()

    def saved_name(self, module_name: str) -> str:
        """The module name its adapters' saved keys start with."""
        return module_name


def adapter_hosts(model: nn.Module) -> dict[str, AdapterHost]:
    """Every AdapterHost in the model, by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterHost)}


class MultiLoraLinear(AdapterHost):
    """A frozen base ``nn.Linear`` plus any number of named adapters, batched by rows."""

    def __init__(self, base: nn.Linear, layout: BatchLayout, name: str):
        super().__init__()
        self.base = base
        self.layout = layout
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
        if self.layout.packed and x.dim() > 2:
            # Segments are token positions: run on the positions as rows, (T, features).
            out = self.forward(x.reshape(-1, x.shape[-1]))
            return out.view(*x.shape[:-1], out.shape[-1])
        # A plain nn.Linear runs on the rows flattened to 2-D: its output is then a tensor of
        # its own (no view), to which the adapters' deltas can be added in place, without a
        # copy of the output (autograd allows it: a linear's backward does not read its
        # output). Other bases (bitsandbytes) run as they are and get out-of-place additions.
        flat = None
        if type(self.base) is nn.Linear:
            flat = self.base(x.reshape(-1, x.shape[-1]))
            base_out = flat.view(*x.shape[:-1], flat.shape[-1])
        else:
            base_out = self.base(x)
        layout = self.layout
        if layout.single is not None:
            return self._single(x, base_out, flat)
        work = sorted(((seg, self.adapters[seg.adapter]) for seg in layout.segments
                       if seg.adapter is not None and seg.adapter in self.adapters),
                      key=lambda item: item[0].start)
        if not work:
            return base_out
        per_row = flat.shape[0] // base_out.shape[0] if flat is not None else 0
        # Back-to-back batched segments of equal rows and rank form one run (one bmm pair);
        # any other adapter is a run of its own. Each run takes its rows of x by one split.
        runs = (_stackable_runs(work) if flat is not None else [[item] for item in work])
        inputs = _split_rows(x, [(run[0][0].start, run[-1][0].end) for run in runs])
        if (flat is not None and len(runs) == 1 and len(runs[0]) == 1
                and runs[0][0][1].batched and runs[0][0][0].start == 0
                and runs[0][0][0].end * per_row == flat.shape[0]):
            # One plain adapter on every row: straight into the output (fp32: one addmm_).
            (seg, adapter), = runs[0]
            xs, scale = self._dropped_out(inputs[0].float(), seg, adapter)
            _add_low_rank(flat, xs, adapter.lora_A, adapter.lora_B, scale, flat)
            return flat.view(base_out.shape)
        deltas = self._deltas(runs, inputs, base_out, flat)
        if flat is not None:
            # Every delta as one tensor of every row (zeros where no adapter applies), added
            # in place in one go: an addition into each segment's rows of the output would,
            # in the backward, copy the whole output's gradient once per segment.
            flat.add_(_all_rows(flat, deltas, per_row))
            return flat.view(base_out.shape)
        return _add_rows(base_out, deltas)

    def _single(self, x: torch.Tensor, base_out: torch.Tensor,
                flat: torch.Tensor | None) -> torch.Tensor:
        """``layout.single``'s adapter on every row, without dropout."""
        if self.layout.single not in self.adapters:
            return base_out
        adapter = self.adapters[self.layout.single]
        if not adapter.batched:
            return base_out + adapter.delta(x, base_out, self.base, None).to(base_out.dtype)
        return _add_low_rank(base_out, x.float(), adapter.lora_A, adapter.lora_B,
                             adapter.scaling, flat)

    def _deltas(self, runs: list[list], inputs: list[torch.Tensor], base_out: torch.Tensor,
                flat: torch.Tensor | None) -> list[tuple[int, int, torch.Tensor]]:
        """(first row, end row, fp32 delta of those rows) of each run: a run of batched
        adapters by the layer's plain-LoRA math, any other adapter by its own ``delta``, which
        may read the base output of its rows (so every delta is computed before any is added)."""
        own = [run[0][0] for run in runs if not run[0][1].batched]
        base_rows = iter(_split_rows(base_out, [(seg.start, seg.end) for seg in own])
                         if own else [])
        deltas = []
        for run, xs in zip(runs, inputs):
            seg, adapter = run[0]
            if adapter.batched:
                deltas.append((seg.start, run[-1][0].end, self._plain_delta(xs.float(), run)))
                continue
            rows = next(base_rows)
            if flat is not None and rows.dtype == torch.float32:
                rows = rows.clone()   # a view of flat, which the sum of deltas updates in place
            deltas.append((seg.start, seg.end, adapter.delta(
                xs, rows, self.base, self._generator(seg, adapter, xs.device), seg.length)))
        return deltas

    def _generator(self, seg: Segment, adapter: LoraAdapter,
                   device: torch.device) -> torch.Generator | None:
        """The generator of this segment's dropout mask in this layer; None: no dropout."""
        seed = self._dropout_seed(seg, adapter)
        return None if seed is None else _seeded_generator(device, seed)

    def _dropout_seed(self, seg: Segment, adapter: LoraAdapter) -> int | None:
        if seg.dropout_seed is None or adapter.dropout_p <= 0:
            return None
        return mix_seed(seg.dropout_seed, self.name_key)

    def _dropped_out(self, xs: torch.Tensor, seg: Segment,
                     adapter: LoraAdapter) -> tuple[torch.Tensor, float]:
        """(the segment's fp32 input after its dropout mask, its scaling): without dropout
        ``xs`` itself; with it, the 1 / keep goes into the scaling (cheaper on the rank-r
        side than on x)."""
        seed = self._dropout_seed(seg, adapter)
        if seed is None:
            return xs, adapter.scaling
        keep = 1.0 - adapter.dropout_p
        mask = _dropout_mask(xs, keep, _seeded_generator(xs.device, seed), seg.length)
        return xs * mask, adapter.scaling / keep

    def _plain_delta(self, xs: torch.Tensor, run: list[tuple[Segment, LoraAdapter]]
                     ) -> torch.Tensor:
        """The plain-LoRA delta (fp32) of a run's rows ``xs`` (fp32).

        A run of several segments (back to back, equal rows and rank) is one batched matmul
        pair: ``torch.bmm`` over the stacked segments and their adapters' stacked A and B.
        Either way a row meets only its own adapter's weights. That is what keeps one job's
        fault in that job: a block layout that multiplies every row by every adapter and
        zeroes the foreign columns would spread a NaN or inf of one adapter to all rows
        (0 x NaN = NaN).
        """
        start = run[0][0].start
        pieces = [self._dropped_out(xs if len(run) == 1 else
                                    xs[seg.start - start:seg.end - start], seg, adapter)
                  for seg, adapter in run]
        if len(run) == 1:
            (_seg, adapter), (xs, scale) = run[0], pieces[0]
            return F.linear(F.linear(xs, adapter.lora_A) * scale, adapter.lora_B)
        # One (segments, rows x positions, features) batch for all of the run.
        if any(self._dropout_seed(seg, adapter) is not None for seg, adapter in run):
            xs = torch.cat([piece for piece, _ in pieces])
        xs = xs.reshape(len(run), -1, xs.shape[-1])
        lora_A = torch.stack([adapter.lora_A for _, adapter in run])
        lora_B = torch.stack([adapter.lora_B for _, adapter in run])
        scale = torch.tensor([scale for _, scale in pieces], dtype=torch.float32,
                             device=xs.device)
        h = torch.bmm(xs, lora_A.transpose(1, 2)) * scale.view(-1, 1, 1)
        return torch.bmm(h, lora_B.transpose(1, 2))


def _all_rows(flat: torch.Tensor, deltas: list[tuple[int, int, torch.Tensor]],
              per_row: int) -> torch.Tensor:
    """The deltas (rows [start, end) of the batch, ``per_row`` rows of ``flat`` each) as one
    tensor shaped like ``flat``, zero elsewhere, in ``flat``'s dtype."""
    pieces, at = [], 0
    width = flat.shape[1]
    for start, end, delta in sorted(deltas, key=lambda item: item[0]):
        if start * per_row > at:
            pieces.append(flat.new_zeros((start * per_row - at, width)))
        pieces.append(delta.reshape(-1, width).to(flat.dtype))
        at = end * per_row
    if at < flat.shape[0]:
        pieces.append(flat.new_zeros((flat.shape[0] - at, width)))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _split_rows(x: torch.Tensor, ranges: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Views of ``x``'s rows [start, end) for sorted, disjoint ``ranges``, by one split: its
    backward is one concatenation, where a slice per range would each write a gradient
    the size of all of ``x`` in the backward."""
    sizes, picks, at = [], [], 0
    for start, end in ranges:
        if start > at:
            sizes.append(start - at)
        picks.append(len(sizes))
        sizes.append(end - start)
        at = end
    if at < x.shape[0]:
        sizes.append(x.shape[0] - at)
    if len(sizes) == 1:
        return [x]
    parts = x.split(sizes)
    return [parts[i] for i in picks]


def _stackable_runs(work: list[tuple[Segment, LoraAdapter]]) -> list[list]:
    """``work`` in row order, cut into runs of back-to-back batched segments of equal row
    counts and ranks (each run one batched matmul pair); any other segment is a run alone."""
    runs: list[list] = []
    for seg, adapter in sorted(work, key=lambda item: item[0].start):
        last = runs[-1][-1] if runs else None
        if (last is not None and last[0].end == seg.start and last[1].r == adapter.r
                and adapter.batched and last[1].batched
                and last[0].end - last[0].start == seg.end - seg.start):
            runs[-1].append((seg, adapter))
        else:
            runs.append([(seg, adapter)])
    return runs


def _add_low_rank(base: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor,
                  lora_B: torch.Tensor, scale: float | torch.Tensor,
                  flat: torch.Tensor | None = None) -> torch.Tensor:
    """``base + ((x @ A^T) * scale) @ B^T``: the adapter math in fp32, its result rounded to
    base's dtype and added there (adding an fp32 delta to a bf16 tensor directly rounds once
    but costs 1.2-1.35x the whole layer's time on CPU).

    With an fp32 base the second matmul and the addition are one ``addmm``. ``flat``: the
    2-D tensor that ``base`` views, which may be updated in place (then returned as base's
    shape).
    """
    h = F.linear(x, lora_A) * scale
    if flat is not None and flat.is_contiguous():
        h = h.reshape(-1, h.shape[-1])
        if flat.dtype == torch.float32:
            flat.addmm_(h, lora_B.t())
        else:
            flat.add_(F.linear(h, lora_B).to(flat.dtype))
        return flat.view(base.shape)
    if base.dtype == torch.float32 and h.dim() >= 2:
        out = torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1]),
                          lora_B.t())
        return out.view(base.shape)
    return base + F.linear(h, lora_B).to(base.dtype)


def _add_rows(out: torch.Tensor, deltas: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    """``out`` with each delta added on its rows [start, end) (ranges disjoint)."""
    if len(deltas) == 1 and deltas[0][0] == 0 and deltas[0][1] == out.shape[0]:
        return out + deltas[0][2].to(out.dtype)
    pieces, at = [], 0
    for start, end, delta in sorted(deltas, key=lambda d: d[0]):
        if start > at:
            pieces.append(out[at:start])
        pieces.append(out[start:end] + delta.to(out.dtype))
        at = end
    if at < out.shape[0]:
        pieces.append(out[at:])
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
