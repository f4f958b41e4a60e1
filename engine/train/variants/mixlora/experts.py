"""One MixLoRA adapter's router and experts on one feed-forward block: routing, the experts'
computation, and the router losses and statistics it records.

For a segment, on its own real tokens only: route; gather the (token, expert) pairs sorted
by expert; add each expert's LoRA deltas to the shared base input projections; run the base
output projection once over all pairs on ``h_e - h_base`` (the only base work that depends
on the expert), plus each expert's output LoRA; sum the weighted pair outputs per token.

Everything random (router jitter, expert LoRA dropout, ffn_dropout) is drawn from generators
seeded by the segment's dropout seed and the layer's name, only for the job's own real
tokens, so a job draws the same numbers alone or batched with others, and a recomputed
forward (gradient checkpointing) draws them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.core.config import resolve_mixlora
from engine.train.lora import LoraAdapter, Segment, merge_groups, mix_seed
from engine.train.variants.mixlora.blocks import Kind, MixLoraFFN, base_act, base_linear, intermediate

# Tags that keep the different random streams of one layer apart.
JITTER, FFN_DROPOUT, EXPERT_DROPOUT, INIT = 1, 2, 3, 4


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


def generator(device: torch.device, *values: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(mix_seed(*values))


class RouterBook:
    """One MixLoRA adapter's router losses of the current forward pass, and its statistics
    since they were last taken. Only a pass begun here records (not evaluation, generation,
    or the recomputation of gradient checkpointing)."""

    def __init__(self) -> None:
        self.collecting = False
        self.losses: list[torch.Tensor] = []
        self.stats = self._empty()
        self.before = self._empty()   # the statistics as the current pass found them

    @staticmethod
    def _empty() -> dict:
        return {"layers": {}, "aux": [], "z": []}

    def record(self, layer: str, loss: Optional[torch.Tensor], tokens: list[int],
               dropped: int, aux: torch.Tensor, z: torch.Tensor) -> None:
        if loss is not None:
            self.losses.append(loss)
        layer_stats = self.stats["layers"].setdefault(
            layer, {"tokens": [0] * len(tokens), "dropped": 0})
        layer_stats["tokens"] = [a + b for a, b in zip(layer_stats["tokens"], tokens)]
        layer_stats["dropped"] += dropped
        self.stats["aux"].append(aux)
        self.stats["z"].append(z)

    def begin(self) -> None:
        self.losses, self.collecting = [], True
        stats = self.stats
        self.before = {"layers": {layer: dict(values, tokens=list(values["tokens"]))
                                  for layer, values in stats["layers"].items()},
                       "aux": list(stats["aux"]), "z": list(stats["z"])}

    def end(self) -> Optional[torch.Tensor]:
        """Stop recording (a recomputed forward adds nothing); the pass's loss, the mean
        over its layers, or None."""
        self.collecting = False
        loss = torch.stack(self.losses).mean() if self.losses else None
        self.losses = []
        return loss

    def discard(self) -> None:
        self.stats, self.before = self.before, self._empty()
        self.losses, self.collecting = [], False

    def take(self) -> Optional[dict]:
        """The statistics since the last call (then reset), or None if there are none."""
        stats, self.stats = self.stats, self._empty()
        if not stats["layers"]:
            return None
        return {"layers": stats["layers"],
                "aux_loss": float(torch.stack(stats["aux"]).mean()),
                "z_loss": float(torch.stack(stats["z"]).mean())}


class MixLoraExperts(nn.Module):
    """A router (num_experts x hidden, fp32) and num_experts sets of per-linear adapters
    (``make_adapter``: the expert_lora kind's piece, LoRA or DoRA)."""

    def __init__(self, settings: MixLoraSettings, hidden: int,
                 shapes: dict[str, tuple[int, int]], book: RouterBook,
                 make_adapter: Callable[[int, int], LoraAdapter]):
        super().__init__()
        self.settings = settings
        self.book = book
        self.router = nn.Parameter(torch.zeros(settings.num_experts, hidden,
                                               dtype=torch.float32))
        self.experts = nn.ModuleList(
            nn.ModuleDict({proj: make_adapter(n_in, n_out)
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

    def tensors(self) -> dict[str, nn.Parameter]:
        """By saved key names after the block's: ``router.weight`` (num_experts x hidden),
        ``experts.{e}.{projection}.lora_A.weight`` and the rest of each expert's piece."""
        found = {"router.weight": self.router}
        for e, expert in enumerate(self.experts):
            for proj, adapter in expert.items():
                for key, tensor in adapter.tensors().items():
                    found[f"experts.{e}.{proj}.{key}"] = tensor
        return found

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The router trains at lr, as A does; then each expert's pieces' groups."""
        return merge_groups([{"A": [self.router]}]
                            + [adapter.param_groups() for expert in self.experts
                               for adapter in expert.values()])

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
                generator=generator(x.device, seg.dropout_seed, layer_key, JITTER))
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

    def forward(self, ffn: MixLoraFFN, mlp: nn.Module, x: torch.Tensor,
                pre: list[torch.Tensor], base_out: torch.Tensor, rows: torch.Tensor,
                seg: Optional[Segment]) -> torch.Tensor:
        """What this adapter adds to the base feed-forward output of tokens ``x`` (fp32).

        ``pre``: the base input projections' outputs of these tokens; ``base_out``: their
        base feed-forward output.
        """
        s = self.settings
        training = seg is not None and seg.dropout_seed is not None
        token, expert, weight, probs, scores, chosen = self.route(x, rows, seg, ffn.key)
        if seg is not None:
            self._router_losses(ffn, probs, scores, chosen, token)
        delta = torch.zeros((x.shape[0], base_out.shape[-1]), dtype=torch.float32,
                            device=x.device)
        if token.numel() == 0:    # every token over capacity
            return delta

        order = torch.argsort(expert, stable=True)
        token, expert, weight = token[order], expert[order], weight[order]
        sizes = torch.bincount(expert, minlength=s.num_experts).tolist()
        out = self._pair_outputs(ffn, mlp, x[token], pre, base_out, token, sizes,
                                 seg.dropout_seed if training else None)
        delta = delta.index_add(0, token, weight[:, None] * out)
        if training and s.ffn_dropout > 0:
            keep = 1.0 - s.ffn_dropout
            mask = torch.empty_like(delta).bernoulli_(
                keep, generator=generator(x.device, seg.dropout_seed, ffn.key, FFN_DROPOUT))
            delta = delta * mask / keep
        return delta

    def _pair_outputs(self, ffn: MixLoraFFN, mlp: nn.Module, xs: torch.Tensor,
                      pre: list[torch.Tensor], base_out: torch.Tensor, token: torch.Tensor,
                      sizes: list[int], seed: Optional[int]) -> torch.Tensor:
        """E_e(x) - base(x) of each (token, expert) pair, pairs sorted by expert, fp32.
        ``seed``: the segment's dropout seed in training, else None (no dropout)."""
        kind = ffn.kind
        pre_s = [p[token].float() for p in pre]
        act = base_act(mlp)
        h_base = intermediate(kind, pre_s, act)

        def dropout(proj: str, e: int, adapter: LoraAdapter) -> Optional[torch.Generator]:
            if seed is None or adapter.dropout_p <= 0:
                return None
            return generator(xs.device, seed, ffn.proj_keys[proj], EXPERT_DROPOUT, e)

        if self.act is not None or any(p in self.experts[0] for p in kind.inputs):
            # Input projections: the shared base outputs plus each expert's LoRA.
            h = self._intermediates(kind, mlp, xs, pre_s, sizes, dropout,
                                    self.act if self.act is not None else act, h_base)
            # The base output projection, once over every pair, on what the experts changed.
            out_base = base_linear(getattr(mlp, kind.output))
            out = out_base((h - h_base).to(pre[0].dtype)).float()
            if out_base.bias is not None:
                out = out - out_base.bias.float()
        else:
            h = h_base
            out = torch.zeros((len(token), base_out.shape[-1]), dtype=torch.float32,
                              device=xs.device)
        if kind.output not in self.experts[0]:
            return out
        # The output projection's LoRA of each expert, on the expert's intermediate.
        out_base = base_linear(getattr(mlp, kind.output))
        base_on_h = out + base_out[token].float()   # out_base(h): what DoRA rescales
        pieces = [self.experts[e][kind.output].delta(
                      h[rows_e], base_on_h[rows_e], out_base,
                      dropout(kind.output, e, self.experts[e][kind.output]))
                  for e, rows_e in _expert_rows(sizes)]
        return out + torch.cat(pieces) if pieces else out

    def _intermediates(self, kind: Kind, mlp: nn.Module, xs: torch.Tensor,
                       pre_s: list[torch.Tensor], sizes: list[int], dropout: Callable,
                       act: Callable, h_base: torch.Tensor) -> torch.Tensor:
        """Each pair's expert intermediate: the input projections plus its expert's LoRA."""
        pieces = []
        for e, rows_e in _expert_rows(sizes):
            adapters = self.experts[e]
            values = []
            for j, proj in enumerate(kind.inputs):
                value = pre_s[j][rows_e]
                if proj in adapters:
                    adapter = adapters[proj]
                    value = value + adapter.delta(xs[rows_e], value,
                                                  base_linear(getattr(mlp, proj)),
                                                  dropout(proj, e, adapter))
                values.append(value)
            pieces.append(intermediate(kind, values, act))
        return torch.cat(pieces) if pieces else h_base

    def _router_losses(self, ffn: MixLoraFFN, probs: torch.Tensor, scores: torch.Tensor,
                       chosen: torch.Tensor, kept: torch.Tensor) -> None:
        """The load-balancing and z losses of these tokens, recorded in a begun pass.

        Computed in every training forward, recorded or not: gradient checkpointing's
        recomputation must run the same operations as the forward it replays.
        """
        s = self.settings
        choices = torch.bincount(chosen, minlength=s.num_experts).float()
        share = choices / choices.sum().clamp_min(1.0)
        aux = s.num_experts * (share * probs.mean(dim=0)).sum()
        z = torch.logsumexp(scores, dim=-1).square().mean()
        loss = s.router_aux_loss_coef * aux + s.router_z_loss_coef * z
        if not self.book.collecting:
            return
        if s.router_aux_loss_coef == 0 and s.router_z_loss_coef == 0:
            loss = None
        if s.routing_strategy == "mixlora-switch":
            tokens = torch.bincount(chosen[kept], minlength=s.num_experts).tolist()
            dropped = int(chosen.shape[0] - kept.shape[0])
        else:
            tokens = choices.long().tolist()
            dropped = 0
        self.book.record(ffn.block_name, loss, tokens, dropped, aux.detach(), z.detach())


def _expert_rows(sizes: list[int]):
    """(expert, its slice) of (token, expert) pairs sorted by expert, ``sizes[e]`` pairs
    each; experts that got none are skipped."""
    start = 0
    for e, size in enumerate(sizes):
        if size:
            yield e, slice(start, start + size)
        start += size
