"""DoRA (weight-decomposed LoRA, arXiv 2402.09353) with PEFT's math, so adapters load there.

A trained magnitude vector m rescales the row-normalised adapted weight:
``W' = m * (W + s B A) / ||W + s B A||`` (row norms, detached as in the paper's section 4.3
and PEFT), so the delta of rows x is ``(m / ||.|| - 1) W x + (m / ||.||) s B A x``. With
dropout, PEFT recomputes ``W x`` on the dropped-out input; so does this.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.train.lora import LoraAdapter, dense_weight
from engine.train.variants.base import register
from engine.train.variants.lora import LoraVariant


class DoraAdapter(LoraAdapter):
    """LoRA's A and B plus the magnitude vector, on one linear."""

    batched = False   # reads the base weight and output: not the layer's plain-LoRA math

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float,
                 dropout: float):
        super().__init__(in_features, out_features, r, scaling, dropout)
        self.magnitude = nn.Parameter(torch.zeros(out_features, dtype=torch.float32))

    @torch.no_grad()
    def reset(self, generator: torch.Generator, base_weight: torch.Tensor) -> None:
        """LoRA's init, and m = ||W|| (the adapter starts as the identity)."""
        super().reset(generator, base_weight)
        self.magnitude.copy_(self.weight_norm(base_weight))

    def weight_norm(self, base_weight: torch.Tensor) -> torch.Tensor:
        """Row norms of W + scaling * B A, detached."""
        with torch.no_grad():
            adapted = base_weight.float() + self.scaling * (self.lora_B @ self.lora_A)
            return torch.linalg.norm(adapted, dim=1)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module,
              generator: torch.Generator | None, length: int | None = None) -> torch.Tensor:
        x = x.float()
        dropped = self.dropped_input(x, generator, length)
        lora_out = (dropped @ self.lora_A.t()) @ self.lora_B.t()
        weight = dense_weight(base)
        mag_norm_scale = self.magnitude / self.weight_norm(weight)
        if dropped is not x:
            base_result = dropped @ weight.t()
        else:
            base_result = base_out.float()
            if base.bias is not None:
                base_result = base_result - base.bias.float()
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_out * self.scaling

    def tensors(self) -> dict[str, nn.Parameter]:
        return {**super().tensors(), "lora_magnitude_vector": self.magnitude}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {**super().param_groups(), "magnitude": [self.magnitude]}


@register
class DoraVariant(LoraVariant):
    adapter_class = DoraAdapter

    @classmethod
    def claims(cls, fields) -> bool:
        return bool(fields.get("use_dora")) and not fields.get("routing_strategy")
