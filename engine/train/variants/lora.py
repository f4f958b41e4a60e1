"""Plain LoRA, and rsLoRA (the same with scaling alpha / sqrt(r) instead of alpha / r).

A LoraAdapter on each targeted linear, wrapped in a MultiLoraLinear, computed by the layer's
batched math. Kinds whose only difference is the per-linear piece (DoRA) subclass this one
and name another ``adapter_class``. LoRA+ lives in the optimizer (B's learning rate,
engine.train.lora.PARAM_GROUPS), not here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.core.errors import UserError
from engine.train.lora import BatchLayout, LoraAdapter, dense_weight, wrap_linears
from engine.train.variants.base import Variant, register


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@register
class LoraVariant(Variant):
    adapter_class: type[LoraAdapter] = LoraAdapter   # its piece on each targeted linear

    @classmethod
    def claims(cls, fields) -> bool:
        return not fields.get("use_dora") and not fields.get("routing_strategy")

    def linear_adapter(self, in_features: int, out_features: int) -> LoraAdapter:
        """Its piece for one linear, uninitialised. Fields a saved adapter_config.json may
        leave out take the defaults `mlora generate` has always used."""
        fields = self.fields
        r = fields["r"]
        scaling = lora_scaling(r, fields.get("lora_alpha", r), bool(fields.get("use_rslora")))
        return self.adapter_class(in_features, out_features, r, scaling,
                                  fields.get("lora_dropout", 0.0))

    def attach(self, model: nn.Module, layout: BatchLayout, linears: list[str], *,
               init_seed: int, device: torch.device) -> None:
        # One CPU generator drawn in module order: the same init on every device and
        # whichever other adapters exist.
        generator = torch.Generator(device="cpu").manual_seed(init_seed)
        for module_name, module in wrap_linears(model, linears, layout).items():
            if self.name in module.adapters:
                raise UserError(f"adapter {self.name!r} is already attached to {module_name}")
            adapter = self.linear_adapter(module.in_features, module.out_features)
            adapter.reset(generator, dense_weight(module.base).detach().cpu())
            module.adapters[self.name] = adapter.to(device)
