"""mlora-tui's training engine: many LoRA adapters trained at once on one shared base model.

The package is importable as a library (``engine.trainer.Engine``) and is what the engine
process runs. Only ``engine.config``, ``engine.errors`` and ``engine.convert`` are free of
torch, so the CLI can validate configs without importing it.
"""

__version__ = "0.1.0"
