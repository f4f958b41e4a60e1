"""MixLoRA: a mixture of LoRA experts on the feed-forward blocks (arXiv 2404.15159).

An adapter with ``routing_strategy`` set is a MixLoRA adapter. Its attention targets get one
plain LoRA each (``engine.train.lora.MultiLoraLinear``, as any adapter's do). Each feed-forward
block it targets gets ``num_experts`` experts and a router:

- expert e is the frozen base feed-forward with its own LoRA on each targeted projection
  (gate_proj/up_proj/down_proj; the fused gate_up_proj of phi3, glm and glm4; phi's fc1/fc2);
- the router, a bias-free fp32 linear hidden -> num_experts, scores each token; softmax (of
  the scores / temperature, when temperature > 0) gives the probabilities p, and
  "mixlora" takes the top_k experts, weights p renormalised to sum 1;
  "mixlora-dynamic" the fewest experts whose p reach top_p together, renormalised;
  "mixlora-switch" the top expert, weight its p, and at most expert_capacity tokens per
  expert per sequence (in training): tokens over capacity get the base feed-forward only.

A token routed to experts S with weights w gets ``base(x) + sum_{e in S} w_e (E_e(x) -
base(x))``. With renormalised weights that is MixLoRA's mixture ``sum w_e E_e(x)``; with
switch's un-normalised p it is ``(1 - p) base(x) + p E_e(x)``, so the router is trained
through the output as in Switch, and a new adapter (LoRA B = 0) leaves the model unchanged
under every strategy.

The batched computation, per feed-forward block and step: the base input projections
(gate(x), up(x); gate_up(x); fc1(x)) run once over every row of the batch, and so does the
output projection on the base intermediate: rows of plain LoRA/DoRA adapters get their own
LoRA there (the linears stay MultiLoraLinear), MixLoRA rows the base feed-forward. Then for
each MixLoRA segment, on its own real tokens only: route, gather the (token, expert) pairs
sorted by expert, add each expert's LoRA deltas to the shared base projections, and run the
base output projection once over all pairs on ``h_e - h_base`` (the only base work that
depends on the expert), plus each expert's output LoRA. The weighted pair outputs are summed
per token and added to the segment's rows.

Exactness: everything random (router jitter, expert LoRA dropout, ffn_dropout) is drawn from
generators seeded by the segment's dropout seed and the layer's name, and drawn only for the
job's own real tokens, so a job draws the same numbers alone or batched with others, and a
recomputed forward (gradient checkpointing) draws them again. Router losses and statistics
cover the job's own non-padding tokens only (padded rows: ``Segment.token_mask``, set by
``prepare_router_batch``; a packed pass: every position of the segment, with
``Segment.token_rows`` giving each token's example), in row order either way, so packed
and padded passes route and draw alike.

Router losses (docs/mixlora.md): per layer and micro-batch, over the job's real tokens,
``aux = E * sum_i f_i P_i`` (f_i: the share of expert choices that went to expert i before
capacity, P_i: the mean probability of i; 1 when balanced) and ``z = mean(logsumexp(scores)^2)``.
``router_losses`` gives per job ``mean over layers of (aux_coef * aux + z_coef * z)``; the
trainer adds it times the micro-batch's target-token count over the optimizer batch's, i.e.
as if it were added to each target token's loss. So it is normalised exactly as the LM loss:
one micro-batch per step adds ``coef * aux``, and accumulation adds the target-weighted mean
of the micro-batches' values.
"""

from __future__ import annotations

import types
import weakref
import zlib
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.core.config import ACT_FNS, resolve_mixlora
from engine.core.errors import ConfigError
from engine.train.lora import BatchLayout, LoraAdapter, MultiLoraLinear, Segment, dense_weight, mix_seed

# Tags that keep the different random streams of one layer apart.
_JITTER, _FFN_DROPOUT, _EXPERT_DROPOUT, _INIT = 1, 2, 3, 4


# ----------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class MixLoraSettings:
    routing_strategy: str
    num_experts: int
    top_k: Optional[int]
    top_p: Optional[float]
    temperature: float
    router_aux_loss_coef: float
    router_z_loss_coef: float
    router_init_range: float
    jitter_noise: float
    expert_capacity: Optional[int]
    ffn_dropout: float
    sparse_step: int
    act_fn: Optional[str]
    expert_lora: dict   # r, lora_alpha, lora_dropout, use_rslora, use_dora

    @classmethod
    def from_fields(cls, values: dict) -> "MixLoraSettings":
        """From an AdapterConfig's fields or a saved MIXLORA adapter_config.json."""
        return cls(**resolve_mixlora(values))

    def has_experts(self, layer_index: int) -> bool:
        """Switch Transformers' rule: every layer, or those with index % sparse_step == 1."""
        return self.sparse_step == 1 or layer_index % self.sparse_step == 1


def _fields(config: Any) -> dict:
    return asdict(config) if is_dataclass(config) else dict(config)


def is_mixlora(config: Any) -> bool:
    """Whether an AdapterConfig (or a config dict) describes a MixLoRA adapter."""
    return bool(_fields(config).get("routing_strategy"))


def mixlora_peft_fields(config: Any) -> dict:
    """What a MixLoRA adapter's adapter_config.json adds to the LoRA fields ({} otherwise)."""
    values = _fields(config)
    if not values.get("routing_strategy"):
        return {}
    return {"peft_type": "MIXLORA", **resolve_mixlora(values)}


# ----------------------------------------------------------------------------------------
# Feed-forward blocks


@dataclass(frozen=True)
class _Kind:
    name: str
    inputs: tuple[str, ...]   # projections that read the block's input
    output: str               # the projection that writes the block's output


_KINDS = (
    _Kind("gated", ("gate_proj", "up_proj"), "down_proj"),     # llama, qwen, gemma, mistral
    _Kind("fused", ("gate_up_proj",), "down_proj"),            # phi3, glm, glm4
    _Kind("plain", ("fc1",), "fc2"),                            # phi
)


def _intermediate(kind: _Kind, pre: list[torch.Tensor], act: Callable) -> torch.Tensor:
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
    kind: _Kind

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
        for kind in _KINDS:
            if all(isinstance(getattr(mlp, p, None), (nn.Linear, MultiLoraLinear))
                   for p in kind.inputs + (kind.output,)):
                found.append(FeedForward(index, names[id(mlp)], mlp, kind))
                break
    return found


def _base_act(mlp: nn.Module) -> Callable:
    for attr in ("act_fn", "activation_fn", "act"):
        act = getattr(mlp, attr, None)
        if act is not None:
            return act
    raise ConfigError(f"MixLoRA: cannot find the activation of {type(mlp).__name__}")


def _base(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, MultiLoraLinear) else module


def _generator(device: torch.device, *values: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(mix_seed(*values))


# ----------------------------------------------------------------------------------------
# Router losses and statistics


class RouterBook:
    """Per model: router losses of the current forward pass and statistics per job."""

    def __init__(self) -> None:
        self.adapters: set[str] = set()
        self.collecting = False
        self.losses: dict[str, list[torch.Tensor]] = {}
        self.stats: dict[str, dict] = {}
        self.before: dict[str, dict] = {}   # stats as the current forward pass found them

    def record(self, adapter: str, layer: str, loss: Optional[torch.Tensor], tokens: list[int],
               dropped: int, aux: torch.Tensor, z: torch.Tensor) -> None:
        if loss is not None:
            self.losses.setdefault(adapter, []).append(loss)
        stats = self.stats.setdefault(adapter, {"layers": {}, "aux": [], "z": []})
        layer_stats = stats["layers"].setdefault(
            layer, {"tokens": [0] * len(tokens), "dropped": 0})
        layer_stats["tokens"] = [a + b for a, b in zip(layer_stats["tokens"], tokens)]
        layer_stats["dropped"] += dropped
        stats["aux"].append(aux)
        stats["z"].append(z)


_BOOKS: "weakref.WeakKeyDictionary[nn.Module, RouterBook]" = weakref.WeakKeyDictionary()


def _book(model: nn.Module) -> RouterBook:
    book = _BOOKS.get(model)
    if book is None:
        book = _BOOKS[model] = RouterBook()
    return book


def prepare_router_batch(model: nn.Module, segments: list[Segment],
                         attention_mask: torch.Tensor, device: torch.device) -> None:
    """Before a training forward pass: token masks on MixLoRA segments, start recording.

    ``attention_mask`` is the batch's (rows, width) 0/1 mask of real tokens. Only a forward
    pass prepared here records router losses and statistics (not evaluation, generation,
    or the recomputation of gradient checkpointing).
    """
    book = _BOOKS.get(model)
    if book is None:
        return
    book.losses = {}
    book.collecting = True
    book.before = {name: {"layers": {layer: dict(values, tokens=list(values["tokens"]))
                                     for layer, values in stats["layers"].items()},
                          "aux": list(stats["aux"]), "z": list(stats["z"])}
                   for name, stats in book.stats.items()}
    for seg in segments:
        if seg.adapter in book.adapters and seg.token_rows is None:   # padded rows
            width = seg.length if seg.length is not None else attention_mask.shape[1]
            seg.token_mask = attention_mask[seg.start:seg.end, :width].to(
                device=device, dtype=torch.bool)


def discard_router_batch(model: nn.Module) -> None:
    """A forward pass that failed (out of memory) and will be retried: forget what it
    recorded, so that the retry's statistics are not counted twice."""
    book = _BOOKS.get(model)
    if book is None:
        return
    book.stats, book.before = book.before, {}
    book.losses = {}
    book.collecting = False


def router_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """After the forward pass: each MixLoRA job's router loss (mean over its layers).

    Stops recording, so a recomputed forward (gradient checkpointing) adds nothing.
    """
    book = _BOOKS.get(model)
    if book is None:
        return {}
    book.collecting = False
    losses = {name: torch.stack(values).mean() for name, values in book.losses.items()
              if values}
    book.losses = {}
    return losses


def take_router_stats(model: nn.Module, name: str) -> Optional[dict]:
    """A job's router statistics since the last call, then reset; None if it has none.

    ``{"layers": {block: {"tokens": [count per expert], "dropped": n}}, "aux_loss": a,
    "z_loss": z}``: tokens each expert processed (a token counts once per expert it went
    to), tokens over an expert's capacity (switch), and the mean of the unweighted losses.
    """
    book = _BOOKS.get(model)
    stats = book.stats.pop(name, None) if book is not None else None
    if not stats or not stats["layers"]:
        return None
    return {"layers": stats["layers"],
            "aux_loss": float(torch.stack(stats["aux"]).mean()),
            "z_loss": float(torch.stack(stats["z"]).mean())}


# ----------------------------------------------------------------------------------------
# One adapter's router and experts on one feed-forward block


class MixLoraExperts(nn.Module):
    """A router (num_experts x hidden, fp32) and num_experts sets of LoRA adapters."""

    def __init__(self, settings: MixLoraSettings, hidden: int,
                 shapes: dict[str, tuple[int, int]]):
        super().__init__()
        self.settings = settings
        lora = settings.expert_lora
        self.router = nn.Parameter(torch.zeros(settings.num_experts, hidden,
                                               dtype=torch.float32))
        self.experts = nn.ModuleList(
            nn.ModuleDict({proj: LoraAdapter(n_in, n_out, lora["r"], lora["lora_alpha"],
                                             lora["lora_dropout"], lora["use_rslora"],
                                             lora["use_dora"])
                           for proj, (n_in, n_out) in shapes.items()})
            for _ in range(settings.num_experts))
        self.act = None
        if settings.act_fn is not None:
            from transformers.activations import ACT2FN
            self.act = ACT2FN[settings.act_fn]

    @torch.no_grad()
    def reset(self, generator: torch.Generator, weights: dict[str, torch.Tensor]) -> None:
        values = torch.empty(self.router.shape, dtype=torch.float32)
        values.normal_(0.0, self.settings.router_init_range, generator=generator)
        self.router.copy_(values)
        for expert in self.experts:
            for proj, adapter in expert.items():
                adapter.reset(generator, weights[proj])

    # -- routing ------------------------------------------------------------------------

    def route(self, x: torch.Tensor, rows: torch.Tensor, seg: Optional[Segment],
              layer_key: int):
        """(pairs: token, expert, weight; probabilities; scores; experts chosen before capacity).

        ``x``: the tokens (T, hidden); ``rows``: each token's row, tokens in row-major order.
        """
        s = self.settings
        training = seg is not None and seg.dropout_seed is not None
        inputs = x.float()
        if training and s.jitter_noise > 0:
            noise = torch.empty_like(inputs).uniform_(
                1.0 - s.jitter_noise, 1.0 + s.jitter_noise,
                generator=_generator(x.device, seg.dropout_seed, layer_key, _JITTER))
            inputs = inputs * noise
        scores = inputs @ self.router.t()
        if s.temperature > 0:
            scores = scores / s.temperature
        probs = scores.softmax(dim=-1)
        count = probs.shape[0]
        if s.routing_strategy == "mixlora":
            weight, expert = probs.topk(s.top_k, dim=-1)
            weight = weight / weight.sum(dim=-1, keepdim=True)
            token = torch.arange(count, device=x.device).repeat_interleave(s.top_k)
            chosen = expert.reshape(-1)
            return token, chosen, weight.reshape(-1), probs, scores, chosen
        if s.routing_strategy == "mixlora-dynamic":
            ordered, order = probs.sort(dim=-1, descending=True, stable=True)
            # Keep an expert while the mass before it is below top_p: the fewest experts
            # whose probabilities sum to top_p or more.
            keep = (ordered.cumsum(dim=-1) - ordered) < s.top_p
            kept = ordered * keep
            kept = kept / kept.sum(dim=-1, keepdim=True)
            token, slot = keep.nonzero(as_tuple=True)
            chosen = order[token, slot]
            return token, chosen, kept[token, slot], probs, scores, chosen
        # mixlora-switch
        weight, expert = probs.max(dim=-1)
        token = torch.arange(count, device=x.device)
        if seg is not None:
            # Capacity: the first expert_capacity tokens of each sequence per expert.
            onehot = F.one_hot(expert, s.num_experts)
            seen = onehot.cumsum(dim=0)
            first = torch.searchsorted(rows, rows)          # each row's first token
            before = seen[first] - onehot[first]
            priority = (seen - before).gather(1, expert[:, None]).squeeze(1)
            token = token[priority <= s.expert_capacity]
        return token, expert[token], weight[token], probs, scores, expert

    # -- the experts --------------------------------------------------------------------

    def forward(self, ffn: "MixLoraFFN", mlp: nn.Module, x: torch.Tensor,
                pre: list[torch.Tensor], base_out: torch.Tensor, rows: torch.Tensor,
                seg: Optional[Segment]) -> torch.Tensor:
        """What this adapter adds to the base feed-forward output of tokens ``x`` (fp32).

        ``pre``: the base input projections' outputs of these tokens; ``base_out``: their
        base feed-forward output.
        """
        s = self.settings
        kind = ffn.kind
        training = seg is not None and seg.dropout_seed is not None
        token, expert, weight, probs, scores, chosen = self.route(x, rows, seg, ffn.key)
        if seg is not None:
            self._router_losses(ffn, seg, probs, scores, chosen, token)
        delta = torch.zeros((x.shape[0], base_out.shape[-1]), dtype=torch.float32,
                            device=x.device)
        if token.numel() == 0:    # every token over capacity
            return delta

        order = torch.argsort(expert, stable=True)
        token, expert, weight = token[order], expert[order], weight[order]
        sizes = torch.bincount(expert, minlength=s.num_experts).tolist()
        xs = x[token]
        pre_s = [p[token].float() for p in pre]
        base_act = _base_act(mlp)
        h_base = _intermediate(kind, pre_s, base_act)

        def dropout_generator(proj: str, e: int, adapter: LoraAdapter):
            if not training or adapter.dropout_p <= 0:
                return None
            return _generator(x.device, seg.dropout_seed, ffn.proj_keys[proj], _EXPERT_DROPOUT, e)

        # Input projections: the shared base outputs plus each expert's LoRA on its tokens.
        adapt_inputs = self.act is not None or any(p in self.experts[0] for p in kind.inputs)
        if adapt_inputs:
            act = self.act if self.act is not None else base_act
            pieces = []
            for e, rows_e in _expert_rows(sizes):
                adapters = self.experts[e]
                values = []
                for j, proj in enumerate(kind.inputs):
                    value = pre_s[j][rows_e]
                    if proj in adapters:
                        adapter = adapters[proj]
                        value = value + adapter.delta(xs[rows_e], value,
                                                      _base(getattr(mlp, proj)),
                                                      dropout_generator(proj, e, adapter))
                    values.append(value)
                pieces.append(_intermediate(kind, values, act))
            h = torch.cat(pieces) if pieces else h_base
            # The base output projection, once over every pair, on what the experts changed.
            out_base = _base(getattr(mlp, kind.output))
            out = out_base((h - h_base).to(pre[0].dtype)).float()
            if out_base.bias is not None:
                out = out - out_base.bias.float()
        else:
            h = h_base
            out = torch.zeros((len(token), base_out.shape[-1]), dtype=torch.float32,
                              device=x.device)
        # The output projection's LoRA of each expert, on the expert's intermediate.
        if kind.output in self.experts[0]:
            out_base = _base(getattr(mlp, kind.output))
            base_on_h = out + base_out[token].float()   # out_base(h): what DoRA rescales
            pieces = []
            for e, rows_e in _expert_rows(sizes):
                adapter = self.experts[e][kind.output]
                pieces.append(adapter.delta(h[rows_e], base_on_h[rows_e], out_base,
                                            dropout_generator(kind.output, e, adapter)))
            if pieces:
                out = out + torch.cat(pieces)
        delta = delta.index_add(0, token, weight[:, None] * out)
        if training and s.ffn_dropout > 0:
            keep = 1.0 - s.ffn_dropout
            mask = torch.empty_like(delta).bernoulli_(
                keep, generator=_generator(x.device, seg.dropout_seed, ffn.key, _FFN_DROPOUT))
            delta = delta * mask / keep
        return delta

    def _router_losses(self, ffn: "MixLoraFFN", seg: Segment, probs: torch.Tensor,
                       scores: torch.Tensor, chosen: torch.Tensor, kept: torch.Tensor) -> None:
        """The load-balancing and z losses of these tokens, recorded in a prepared pass.

        Computed in every training forward, recorded or not: gradient checkpointing's
        recomputation must run the same operations as the forward it replays.
        """
        s = self.settings
        choices = torch.bincount(chosen, minlength=s.num_experts).float()
        share = choices / choices.sum().clamp_min(1.0)
        aux = s.num_experts * (share * probs.mean(dim=0)).sum()
        z = torch.logsumexp(scores, dim=-1).square().mean()
        loss = s.router_aux_loss_coef * aux + s.router_z_loss_coef * z
        if not ffn.book.collecting:
            return
        if s.router_aux_loss_coef == 0 and s.router_z_loss_coef == 0:
            loss = None
        if s.routing_strategy == "mixlora-switch":
            tokens = torch.bincount(chosen[kept], minlength=s.num_experts).tolist()
            dropped = int(chosen.shape[0] - kept.shape[0])
        else:
            tokens = choices.long().tolist()
            dropped = 0
        ffn.book.record(seg.adapter, ffn.block_name, loss, tokens, dropped,
                        aux.detach(), z.detach())


# ----------------------------------------------------------------------------------------
# Every MixLoRA adapter on one feed-forward block


class MixLoraFFN(nn.Module):
    """Installed on a feed-forward block as ``mlp.mixlora``; the block's forward goes here.

    Rows of segments whose adapter has experts here go through them; every other row gets
    the block's own computation (and the plain LoRA of its adapter, if any).
    """

    def __init__(self, ffn: FeedForward, layout: BatchLayout, book: RouterBook):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.layout = layout
        self.book = book
        self.kind = ffn.kind
        self.block_name = ffn.name
        # Identify the layer and its projections in random seeds (as MultiLoraLinear does).
        self.key = zlib.crc32(ffn.name.encode())
        self.proj_keys = {p: zlib.crc32(f"{ffn.name}.{p}".encode()) for p in ffn.projections}

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
        out = getattr(mlp, kind.output)(_intermediate(kind, pre, _base_act(mlp)))
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


def _expert_rows(sizes: list[int]):
    """(expert, its slice) of (token, expert) pairs sorted by expert, ``sizes[e]`` pairs
    each; experts that got none are skipped."""
    start = 0
    for e, size in enumerate(sizes):
        if size:
            yield e, slice(start, start + size)
        start += size


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
    mask = getattr(seg, "token_mask", None)
    if mask is None:
        mask = torch.ones((seg.end - seg.start, length), dtype=torch.bool, device=device)
    rows, cols = mask[:, :length].nonzero(as_tuple=True)
    return (seg.start + rows) * width + cols, rows


def _routed_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp.mixlora(mlp, x)


def _install(ffn: FeedForward, layout: BatchLayout, book: RouterBook) -> MixLoraFFN:
    holder = getattr(ffn.module, "mixlora", None)
    if not isinstance(holder, MixLoraFFN):
        holder = MixLoraFFN(ffn, layout, book)
        ffn.module.mixlora = holder
        ffn.module.forward = types.MethodType(_routed_forward, ffn.module)
    return holder


def _holders(model: nn.Module) -> dict[str, MixLoraFFN]:
    return {name.rsplit(".", 1)[0]: m for name, m in model.named_modules()
            if isinstance(m, MixLoraFFN)}


# ----------------------------------------------------------------------------------------
# Attaching, saving, detaching


def mixlora_targets(model: nn.Module, config: Any, targets: list[str]) -> list[str]:
    """A MixLoRA adapter without target_modules: the defaults plus the feed-forward's."""
    values = _fields(config)
    if not values.get("routing_strategy") or values.get("target_modules"):
        return targets
    blocks = feed_forwards(model)
    extra = list(blocks[0].projections) if blocks else []
    return list(dict.fromkeys(list(targets) + extra))


def attach_mixlora(model: nn.Module, layout: BatchLayout, config: Any, linears: list[str], *,
                   init_seed: int, device: torch.device, name: Optional[str] = None) -> list[str]:
    """Give a MixLoRA adapter experts and routers on its feed-forward targets.

    ``config``: the AdapterConfig (or a saved adapter_config.json dict, with ``name``);
    ``linears``: the module names of all its targets. Returns the linears that get a plain
    LoRA (attention, and the feed-forward of layers without experts); for an adapter that
    is not MixLoRA, ``linears`` unchanged. Initialisation draws from a CPU generator seeded
    by ``init_seed``, in layer order.
    """
    values = _fields(config)
    if not values.get("routing_strategy"):
        return linears
    name = name or values["name"]
    settings = MixLoraSettings.from_fields(values)
    where = dict(table=f'adapter "{name}"')
    if settings.act_fn is not None:
        from transformers.activations import ACT2FN
        if settings.act_fn not in ACT2FN:
            raise ConfigError(f"unknown activation {settings.act_fn!r}; known: "
                              f"{', '.join(ACT_FNS)}", field="act_fn", **where)
    wanted = set(linears)
    blocks = feed_forwards(model)
    plan = []
    for block in blocks:
        projs = [p for p in block.projections if f"{block.name}.{p}" in wanted]
        if projs and settings.has_experts(block.index):
            plan.append((block, projs))
    if not plan:
        known = ", ".join(blocks[0].projections) if blocks else "none found"
        raise ConfigError("MixLoRA puts its experts on feed-forward projections "
                          f"(this model's: {known}) and target_modules names none "
                          "of them in a layer with experts", field="target_modules", **where)
    for block, _projs in plan:
        holder = getattr(block.module, "mixlora", None)
        if isinstance(holder, MixLoraFFN) and name in holder.adapters:
            raise ConfigError(f"adapter {name!r} already has experts on {block.name}", **where)
    book = _book(model)
    generator = torch.Generator(device="cpu").manual_seed(mix_seed(init_seed, _INIT))
    taken = set()
    for block, projs in plan:
        holder = _install(block, layout, book)
        modules = {p: _base(getattr(block.module, p)) for p in projs}
        shapes = {p: (m.in_features, m.out_features) for p, m in modules.items()}
        hidden = _base(getattr(block.module, block.kind.inputs[0])).in_features
        experts = MixLoraExperts(settings, hidden, shapes)
        experts.reset(generator, {p: dense_weight(m).detach().cpu() for p, m in modules.items()})
        holder.adapters[name] = experts.to(device)
        taken.update(f"{block.name}.{p}" for p in projs)
    book.adapters.add(name)
    return [n for n in linears if n not in taken]


def mixlora_parameters(model: nn.Module, name: str) -> dict[str, list[nn.Parameter]]:
    """A MixLoRA adapter's router and expert parameters, as the trainer's optimizer groups:
    "A" (routers and LoRA A, at lr), "B" and "magnitude" (at lr * loraplus_lr_ratio)."""
    groups: dict[str, list] = {"A": [], "B": [], "magnitude": []}
    for holder in _holders(model).values():
        experts = holder.adapters[name] if name in holder.adapters else None
        if experts is None:
            continue
        groups["A"].append(experts.router)
        for expert in experts.experts:
            for adapter in expert.values():
                groups["A"].append(adapter.lora_A)
                groups["B"].append(adapter.lora_B)
                if adapter.magnitude is not None:
                    groups["magnitude"].append(adapter.magnitude)
    return groups


def extend_param_groups(model: nn.Module, name: str, groups: dict[str, list]) -> None:
    """Add a MixLoRA adapter's routers and experts to the trainer's parameter groups."""
    for key, params in mixlora_parameters(model, name).items():
        groups[key].extend(params)


def mixlora_tensors(model: nn.Module, name: str, prefix: str = "") -> dict[str, nn.Parameter]:
    """The router and expert tensors of adapter ``name`` by their saved key names.

    ``{prefix}{block}.router.weight`` (num_experts x hidden) and
    ``{prefix}{block}.experts.{e}.{projection}.lora_A.weight`` / ``.lora_B.weight`` /
    ``.lora_magnitude_vector`` (DoRA), e.g. ``model.layers.0.mlp.experts.3.up_proj.lora_A.weight``.
    """
    found = {}
    for block, holder in _holders(model).items():
        if name not in holder.adapters:
            continue
        experts = holder.adapters[name]
        found[f"{prefix}{block}.router.weight"] = experts.router
        for e, expert in enumerate(experts.experts):
            for proj, adapter in expert.items():
                key = f"{prefix}{block}.experts.{e}.{proj}"
                found[f"{key}.lora_A.weight"] = adapter.lora_A
                found[f"{key}.lora_B.weight"] = adapter.lora_B
                if adapter.magnitude is not None:
                    found[f"{key}.lora_magnitude_vector"] = adapter.magnitude
    return found


def detach_mixlora(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``'s routers and experts (the blocks keep their routing)."""
    for holder in _holders(model).values():
        if name in holder.adapters:
            del holder.adapters[name]
    book = _BOOKS.get(model)
    if book is not None:
        book.adapters.discard(name)
        book.stats.pop(name, None)
        book.losses.pop(name, None)
