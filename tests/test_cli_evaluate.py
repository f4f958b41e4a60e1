"""`mlora evaluate` as a user runs it: the JSON document, the table, the files it writes, and
a clear message with exit code 2 (no traceback) for each kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlora_tui.cli import app
from test_engine_exactness import peft_initial_adapter
from test_eval_tasks import ROWS
from tiny_models import build_tiny_model, tiny_model_dir


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_eval")
    model = tiny_model_dir("llama", tmp_path_factory)
    # Two adapters with one folder name under different parents: rows parent/name.
    first = peft_initial_adapter(model, root / "runA" / "job")
    second = peft_initial_adapter(model, root / "runB" / "job", use_dora=True)
    arc = root / "arc.jsonl"
    arc.write_text("".join(json.dumps(r) + "\n" for r in ROWS["arc-e"] * 3))
    boolq = root / "boolq.jsonl"
    boolq.write_text("".join(json.dumps(r) + "\n" for r in ROWS["boolq"]))
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(4)))
    return {"root": root, "model": model, "a": first, "b": second, "arc": arc, "boolq": boolq,
            "text": text}


def test_json_document_rows_tasks_and_files(setup, tmp_path):
    out = tmp_path / "results.json"
    result = invoke("evaluate", "--adapter", setup["a"], "--adapter", setup["b"], "--base",
                    "--task", f"arc-e={setup['arc']}", "--task", f"yn:boolq={setup['boolq']}",
                    "--task", f"perplexity={setup['text']}", "--limit", "5", "--json",
                    "-o", out)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert set(document["results"]) == {"base", "runA/job", "runB/job"}
    for row in document["results"].values():
        assert set(row) == {"arc-e", "yn", "perplexity"}
        assert row["arc-e"]["n"] == 5 and 0 <= row["arc-e"]["acc"] <= 1
        assert "acc_norm" in row["arc-e"] and "acc_stderr" in row["arc-e"]
        assert row["yn"]["n"] == 2 and "acc_norm" not in row["yn"]
        assert row["perplexity"]["tokens"] > 0
        assert row["perplexity"]["perplexity"] > 1
    assert json.loads(out.read_text()) == document
    saved = json.loads((setup["a"] / "eval_results.json").read_text())
    assert saved == {"results": {"runA/job": document["results"]["runA/job"]}}


def test_table_marks_the_best_of_each_column(setup):
    result = invoke("evaluate", "--adapter", setup["a"], "--base",
                    "--task", f"arc-e={setup['arc']}")
    assert result.exit_code == 0, result.output
    assert "evaluation" in result.output and "base" in result.output
    assert "*" in result.output and "arc-e" in result.output


@pytest.mark.parametrize("args, fragment", [
    (["--task", "arc-e=missing.jsonl"], "missing.jsonl"),
    (["--task", "nonsense={arc}"], "unknown task format"),
    (["--task", "arc-e={arc}", "--limit", "0"], "limit"),
    (["--task", "x:arc-e={arc}", "--task", "x:boolq={boolq}"], "x"),
    (["--task", "mc={arc}"], "arc.jsonl:1"),
    ([], "--task"),
])
def test_bad_tasks_exit_2_with_a_message(setup, args, fragment):
    args = [a.format(arc=setup["arc"], boolq=setup["boolq"]) for a in args]
    result = invoke("evaluate", "--adapter", setup["a"], *args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and fragment in result.output
    assert "Traceback" not in result.output


def test_bad_adapters_exit_2_with_a_message(setup, tmp_path):
    task = f"arc-e={setup['arc']}"
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("evaluate", "--adapter", empty, "--task", task)
    assert result.exit_code == 2 and "not an adapter folder" in result.output
    # An adapter on another base model: both named.
    other = build_tiny_model("llama", tmp_path / "other-model", seed=1)
    elsewhere = peft_initial_adapter(other, tmp_path / "elsewhere")
    result = invoke("evaluate", "--adapter", setup["a"], "--adapter", elsewhere, "--task", task)
    assert result.exit_code == 2, result.output
    assert "different base models" in result.output
    assert str(other) in result.output.replace("\n", "")
    # A PEFT field the loader cannot honour is named.
    edited = tmp_path / "edited"
    edited.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (edited / name).write_bytes((setup["a"] / name).read_bytes())
    config = json.loads((edited / "adapter_config.json").read_text())
    config["modules_to_save"] = ["lm_head"]
    (edited / "adapter_config.json").write_text(json.dumps(config))
    result = invoke("evaluate", "--adapter", edited, "--task", task)
    assert result.exit_code == 2 and "modules_to_save" in result.output
    assert "Traceback" not in result.output


def test_a_folder_named_base_is_refused(setup, tmp_path):
    base_named = peft_initial_adapter(setup["model"], tmp_path / "base")
    result = invoke("evaluate", "--adapter", base_named, "--task", f"arc-e={setup['arc']}")
    assert result.exit_code == 2 and "reserved" in result.output


def test_the_run_summary_ends_with_base_against_each_adapter():
    from rich.console import Console

    from mlora_tui.progress import RunSummary

    summary = RunSummary()
    metrics = {"acc": 0.5, "acc_norm": 0.4, "n": 40}
    for event in [{"type": "job_added", "job": "a", "total_steps": 2},
                  {"type": "job_added", "job": "b", "total_steps": 2},
                  {"type": "base_eval", "scores": {"sentiment": {**metrics, "acc": 0.35}}},
                  {"type": "eval", "job": "a", "step": 2, "scores": {"sentiment": metrics}},
                  {"type": "eval", "job": "b", "step": 2, "eval_loss": 1.5,
                   "scores": {"sentiment": {**metrics, "acc": 0.9, "acc_norm": 0.85}}},
                  {"type": "run_end", "jobs": {"a": {"state": "done", "step": 2},
                                               "b": {"state": "done", "step": 2}}}]:
        summary.handle(event)
    console = Console(record=True, width=100)
    summary.render(console)
    text = console.export_text()
    assert "eval scores" in text
    rows = {line.strip("│ ").split()[0]: line for line in text.splitlines()
            if line.startswith("│")}
    assert "35.0 / 40.0" in rows["base"] and "50.0 / 40.0" in rows["a"]
    assert "90.0 / 85.0 *" in rows["b"]
