"""mlora-tui's training engine: many LoRA adapters trained at once on one shared base model.

Subpackages by what they need:

- ``engine.core``: no torch. Config, errors, the socket protocol, the runtime folder, data
  files, prompt templates, model families, the memory estimate, output folders, shared job
  facts (states, variant labels, exit codes), the checks before start, the event writer.
  The CLI and the TUI import only this (and ``engine.tools``).
- ``engine.train``: torch. The base model, the multi-adapter layers and their variants,
  packing, the loss, the jobs, the engine and its step, checkpoints, generation.
- ``engine.server``: the engine process (``mlora serve``): socket listener, resources.
- ``engine.tools``: no torch. ``mlora convert`` and ``mlora gen``.
"""

__version__ = "0.1.0"
