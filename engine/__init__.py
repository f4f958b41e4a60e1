"""mlora-tui's training engine: many LoRA adapters trained at once on one shared base model.

The package is importable as a library (``engine.trainer.Engine``) and is what the engine
process (``engine.server``) runs. The modules a front end needs are free of torch:
``config``, ``errors``, ``convert``, ``gen``, ``families``, ``prompts``, ``data``,
``protocol`` and ``runtime``; the CLI and the TUI import only those.
"""

__version__ = "0.1.0"
