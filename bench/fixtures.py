"""The tests' tiny tokenizer and model builder (tests/tiny_tokenizer.py, tests/tiny_models.py)
for the benchmarks.

tests/ is no package and its modules import each other by bare name, so each is loaded
from its path and registered in ``sys.modules`` under that bare name; nothing is added to
``sys.path``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def _test_module(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_tiny_tokenizer(vocab_size: int = 320):
    return _test_module("tiny_tokenizer").build_tiny_tokenizer(vocab_size)


def build_tiny_model(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    _test_module("tiny_tokenizer")   # tiny_models imports it by bare name
    return _test_module("tiny_models").build_tiny_model(family, path, seed, **overrides)
