"""MixLoRA: a mixture of LoRA experts on the feed-forward blocks (arXiv 2404.15159).

An adapter with ``routing_strategy`` set is a MixLoRA adapter. Its attention targets get one
plain LoRA each (the LoRA or DoRA variant of its own fields, on MultiLoraLinear as any
adapter's). Each feed-forward block it targets gets ``num_experts`` experts and a router
(experts.py), behind the block's MixLoraFFN (blocks.py):

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

Router losses and statistics cover the job's own non-padding tokens only (padded rows:
``Segment.token_mask``, set by ``begin_pass``; a packed pass: every position of the segment,
with ``Segment.token_rows`` giving each token's example), in row order either way, so
packed and padded passes route and draw alike. Per layer and micro-batch,
``aux = E * sum_i f_i P_i`` (f_i: the share of expert choices that went to expert i before
capacity, P_i: the mean probability of i; 1 when balanced) and ``z = mean(logsumexp(scores)^2)``;
``extra_loss`` is the mean over layers of ``aux_coef * aux + z_coef * z``, which the step adds
as if to each target token's loss, so it is normalised exactly as the LM loss
(docs/mixlora.md). ``step_events`` gives the ``router`` event of each optimizer step.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from engine.core.config import ACT_FNS, resolve_mixlora
from engine.core.errors import ConfigError
from engine.train.adapters import adapter_modules
from engine.train.lora import BatchLayout, Segment, dense_weight, merge_groups, mix_seed
from engine.train.variants.base import Variant, register, variant_for
from engine.train.variants.mixlora.blocks import (FeedForward, MixLoraFFN, base_linear, feed_forwards,
                                                  install)
from engine.train.variants.mixlora.experts import INIT, MixLoraExperts, MixLoraSettings, RouterBook


@register
class MixLoraVariant(Variant):
    routes_tokens = True

    @classmethod
    def claims(cls, fields) -> bool:
        return bool(fields.get("routing_strategy"))

    def __init__(self, name: str, fields):
        """Raises ValueError or TypeError for fields that do not resolve (a saved config)."""
        super().__init__(name, fields)
        self.settings = MixLoraSettings.from_fields(self.fields)
        # Its linears outside the experts: the kind of its own LoRA fields.
        self.linear = variant_for(name, {**self.fields, "routing_strategy": None})
        self.expert_kind = variant_for(name, self.settings.expert_lora)
        self.book = RouterBook()

    def targets(self, model: nn.Module) -> list[str]:
        """Without target_modules: the model's defaults plus the feed-forward projections."""
        targets = super().targets(model)
        if self.fields.get("target_modules"):
            return targets
        blocks = feed_forwards(model)
        extra = list(blocks[0].projections) if blocks else []
        return list(dict.fromkeys(targets + extra))

    def attach(self, model: nn.Module, layout: BatchLayout, linears: list[str], *,
               init_seed: int, device: torch.device) -> None:
        """Experts and routers on its feed-forward targets in layers with experts; its
        other linears (attention, the feed-forward of layers without experts) get the
        plain kind. Initialisation draws from CPU generators seeded by ``init_seed``."""
        plan = self._plan(model, linears)
        generator = torch.Generator(device="cpu").manual_seed(mix_seed(init_seed, INIT))
        taken = set()
        for block, projs in plan:
            holder = install(block, layout)
            modules = {p: base_linear(getattr(block.module, p)) for p in projs}
            shapes = {p: (m.in_features, m.out_features) for p, m in modules.items()}
            hidden = base_linear(getattr(block.module, block.kind.inputs[0])).in_features
            experts = MixLoraExperts(self.settings, hidden, shapes, self.book,
                                     self.expert_kind.linear_adapter)
            experts.reset(generator, {p: dense_weight(m).detach().cpu()
                                      for p, m in modules.items()})
            holder.adapters[self.name] = experts.to(device)
            taken.update(f"{block.name}.{p}" for p in projs)
        self.linear.attach(model, layout, [n for n in linears if n not in taken],
                           init_seed=init_seed, device=device)

    def _plan(self, model: nn.Module, linears: list[str]) -> list[tuple[FeedForward, list]]:
        """The blocks that get experts, each with its targeted projections; a ConfigError
        for settings or targets that cannot work on this model."""
        settings = self.settings
        where = dict(table=f'adapter "{self.name}"')
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
                              "of them in a layer with experts", field="target_modules",
                              **where)
        for block, _projs in plan:
            holder = getattr(block.module, "mixlora", None)
            if isinstance(holder, MixLoraFFN) and self.name in holder.adapters:
                raise ConfigError(f"adapter {self.name!r} already has experts on "
                                  f"{block.name}", **where)
        return plan

    def param_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Its linears' groups first, then each block's router and experts, each in module
        order (the order its optimizer state and gradient norm have always had)."""
        pieces = sorted(adapter_modules(model, self.name).values(),
                        key=lambda piece: isinstance(piece, MixLoraExperts))
        return merge_groups(piece.param_groups() for piece in pieces)

    def config_fields(self) -> dict:
        return {"peft_type": "MIXLORA", **resolve_mixlora(self.fields)}

    # -- the step -------------------------------------------------------------------------

    def begin_pass(self, segment: Segment, real: torch.Tensor) -> None:
        self.book.begin()
        if segment.token_rows is None:   # padded rows: route the job's real tokens only
            width = segment.length if segment.length is not None else real.shape[1]
            segment.token_mask = real[segment.start:segment.end, :width].to(dtype=torch.bool)

    def extra_loss(self) -> Optional[torch.Tensor]:
        return self.book.end()

    def discard_pass(self) -> None:
        self.book.discard()

    def step_events(self) -> list[tuple[str, dict]]:
        """``router``: ``{"layers": {block: {"tokens": [count per expert], "dropped": n}},
        "aux_loss": a, "z_loss": z}``, tokens each expert processed since the last step (a
        token counts once per expert it went to), tokens over an expert's capacity
        (switch), and the mean of the unweighted losses."""
        stats = self.book.take()
        return [("router", stats)] if stats is not None else []
