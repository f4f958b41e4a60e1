"""The one interface through which the engine, the step and the adapter loader reach every
kind of adapter, and the registry that picks the kind for an adapter's settings.

A ``Variant`` is made for one adapter (``variant_for``: its name in the model and its fields,
an AdapterConfig or a saved adapter_config.json). What differs between kinds lives in the
kind's own module under engine/train/variants and nowhere else:

- the model: ``targets`` (the modules it takes), ``attach`` (a LoraAdapter subclass on each
  targeted linear, or MixLoRA's router and experts on a feed-forward block) and ``detach``;
- the math, inside the pieces it attaches (``LoraAdapter.delta``, a block's forward);
- ``param_groups``: its optimizer parameter groups (engine.train.lora.PARAM_GROUPS);
- what it saves and loads: its pieces' tensors (engine.train.adapters.adapter_tensors) and
  ``config_fields``, what adapter_config.json holds beyond LoRA's fields;
- the step: ``begin_pass`` before a training forward pass, ``extra_loss`` after it (a term
  of the job's loss, weighed as each target token's loss is), ``discard_pass`` when that
  pass failed and is retried, ``step_events`` after each optimizer step;
- ``label``: engine.core.jobs.variant_label, the one definition of it.

A new kind is one new module: a ``Variant`` subclass (usually of ``LoraVariant``) with
``claims``, decorated with ``register``.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

from engine.core.jobs import variant_label
from engine.train.adapters import adapter_modules, detach_adapter
from engine.train.lora import BatchLayout, Segment, merge_groups
from engine.train.models import default_targets


class Variant:
    """One adapter of some kind. The step's hooks do nothing unless a kind needs them."""

    # Whether its layers treat each token apart, and so need Segment.token_rows in packed
    # passes (begin_pass sets Segment.token_mask in padded ones).
    routes_tokens = False

    def __init__(self, name: str, fields: Mapping[str, Any]):
        self.name = name
        self.fields = dict(fields)

    @classmethod
    def claims(cls, fields: Mapping[str, Any]) -> bool:
        """Whether an adapter with these fields is of this kind."""
        raise NotImplementedError

    def label(self) -> str:
        return variant_label(self.fields)

    # -- the model ------------------------------------------------------------------------

    def targets(self, model: nn.Module) -> list[str]:
        """The module names it targets: its target_modules, or the model's defaults."""
        return list(self.fields.get("target_modules") or default_targets(model))

    def attach(self, model: nn.Module, layout: BatchLayout, linears: list[str], *,
               init_seed: int, device: torch.device) -> None:
        """Put its pieces on the model (``linears``: the module names of its targets),
        initialised from ``init_seed`` alone, so the same whatever else is attached."""
        raise NotImplementedError

    def detach(self, model: nn.Module) -> None:
        detach_adapter(model, self.name)

    def param_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        return merge_groups(piece.param_groups()
                            for piece in adapter_modules(model, self.name).values())

    def config_fields(self) -> dict:
        """What its adapter_config.json adds to (or changes in) LoRA's fields."""
        return {}

    # -- the step -------------------------------------------------------------------------

    def begin_pass(self, segment: Segment, real: torch.Tensor) -> None:
        """Before a training forward pass in which ``segment`` holds the job's rows; ``real``
        is the pass's (rows, width) 0/1 mask of real tokens, on the CPU."""

    def extra_loss(self) -> Optional[torch.Tensor]:
        """After that forward pass: a term to add to the job's loss as if it were added to
        each target token's loss, or None."""
        return None

    def discard_pass(self) -> None:
        """The pass begun last failed (out of memory) and will be retried: forget it."""

    def step_events(self) -> list[tuple[str, dict]]:
        """After an optimizer step of the job: events to emit, as (type, fields)."""
        return []


REGISTRY: list[type[Variant]] = []


def register(cls: type[Variant]) -> type[Variant]:
    """Class decorator: make a kind known to ``variant_for``. Kinds registered later are
    asked first, so a new kind may claim adapters that a built-in one would take."""
    REGISTRY.insert(0, cls)
    return cls


def adapter_fields(adapter: Any) -> dict:
    """An AdapterConfig's fields, or a copy of a mapping of them."""
    return asdict(adapter) if is_dataclass(adapter) else dict(adapter)


def variant_for(name: str, adapter: Any) -> Variant:
    """The variant of adapter ``name`` (an AdapterConfig, or a saved adapter_config.json)."""
    fields = adapter_fields(adapter)
    for cls in REGISTRY:
        if cls.claims(fields):
            return cls(name, fields)
    raise LookupError(f"no adapter variant claims {name!r}")
