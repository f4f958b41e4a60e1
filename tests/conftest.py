"""Shared pytest set-up: tests import helpers from this folder (tiny_tokenizer, tiny_models)."""

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def utc(monkeypatch):
    """Clock times on screen are local times: pin the zone (TUI snapshots)."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()
