"""Adapter variants, one module each: plain LoRA and rsLoRA (lora.py), DoRA (dora.py),
MixLoRA (mixlora/). The interface they implement and the registry that picks one for an
adapter are in base.py; importing this package registers the built-in variants.
"""

from engine.train.variants import dora, lora, mixlora  # noqa: F401  (they register)
from engine.train.variants.base import Variant, register, variant_for

__all__ = ["Variant", "register", "variant_for"]
