"""Benchmark scripts, not tests: run them from the repository root as modules, e.g.
``python -m bench.bench --help``. Method and results: BENCHMARKS.md.

Scripts: ``bench`` (this engine against PEFT by model shape and number of adapters, each
variant in its own worker process), ``demo_throughput`` (the demo config in one process),
``op_count`` (operators dispatched per step), ``lora_layer`` (the batched LoRA layer
alone), ``tui_screenshot`` (README's picture of the TUI, docs/tui.svg). Shared by them: ``baseline`` (the one PEFT baseline), ``measure`` (time, memory,
other processes' load), ``data`` (synthetic rows, the micro-batch plan), ``fixtures`` (the
tests' tiny tokenizer and models).
"""
