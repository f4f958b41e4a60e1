"""The `mlora` command line: torch-free start, validate, convert, run and generate, exit codes.

Training runs in real subprocesses on a tiny random Llama (as a user would run it); quick
commands go through Typer's CliRunner. Generated text is checked against PEFT and plain
transformers, not against the code's own output.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlora_tui.cli import app
from tiny_models import tiny_model_dir

HEAVY_MODULES = ("torch", "transformers", "textual")

ROWS = [
    {"instruction": "Convert this sentence to uppercase.", "input": "the quick brown fox",
     "output": "THE QUICK BROWN FOX"},
    {"instruction": "Convert this sentence to uppercase.", "input": "hello world",
     "output": "HELLO WORLD"},
    {"instruction": "Classify the sentiment.", "input": "great movie", "output": "positive"},
    {"instruction": "Classify the sentiment.", "input": "terrible film", "output": "negative"},
    {"instruction": "How are you?", "output": "hello world"},
    {"instruction": "Extract the name as JSON.", "input": "Alice is 31.",
     "output": "{\"name\": \"Alice\"}"},
    {"instruction": "Extract the name as JSON.", "input": "Bob is 27.",
     "output": "{\"name\": \"Bob\"}"},
    {"instruction": "Say the numbers.", "output": "0123456789"},
]

CONFIG = """\
[model]
base_model = "{base_model}"

[train]
output_dir = "{output_dir}"
save_step = {save_step}

[[adapter]]
name = "alpha"
data = "data.jsonl"
r = 4
lr = 1e-2
batch_size = 2
micro_batch_size = 2
num_epochs = {epochs}

[[adapter]]
name = "beta"
data = "data.jsonl"
prompt = "chat"
r = 2
use_dora = true
lr = 1e-2
batch_size = 4
micro_batch_size = 2
num_epochs = {epochs}
"""


def write_run(folder: Path, base_model: Path, *, epochs: int = 1, save_step: int = 100) -> Path:
    """A config for two adapters on the tiny model, with its data file, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    path = folder / "run.toml"
    path.write_text(CONFIG.format(base_model=base_model, output_dir=folder / "runs",
                                  save_step=save_step, epochs=epochs))
    return path


# One math thread: the tiny model gains nothing from more, and on a busy machine torch's
# spinning worker threads make each tiny step take seconds instead of milliseconds.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def mlora(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh interpreter, as the console script does."""
    return subprocess.run([sys.executable, "-m", "mlora_tui.cli", *args], cwd=cwd, env=CHILD_ENV,
                          capture_output=True, text=True, timeout=timeout)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_model_dir("llama", tmp_path_factory)


@pytest.fixture
def config(tmp_path, tiny_llama) -> Path:
    return write_run(tmp_path, tiny_llama)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    """One `mlora run --json` of two adapters to the end: (process, events, output dir)."""
    folder = tmp_path_factory.mktemp("trained")
    config_path = write_run(folder, tiny_llama)
    proc = mlora("run", "--json", str(config_path), cwd=folder)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    return proc, events, folder / "runs"


# -- starting fast --------------------------------------------------------------------------

def test_help_and_tui_entry_do_not_import_torch():
    code = (
        "import json, sys\n"
        "import mlora_tui.cli, mlora_tui.progress, mlora_tui.tui_entry\n"
        "after_import = sorted(m for m in %r if m in sys.modules)\n"
        "sys.argv = ['mlora', 'run', '--help']\n"
        "try:\n"
        "    mlora_tui.cli.main()\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "after_help = sorted(m for m in %r if m in sys.modules)\n"
        "print(json.dumps([after_import, after_help, code]))\n"
    ) % (HEAVY_MODULES, HEAVY_MODULES)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    after_import, after_help, exit_code = json.loads(proc.stdout.strip().splitlines()[-1])
    assert after_import == [] and after_help == []
    assert exit_code == 0
    # The exit codes are documented in the run command's help.
    assert "130" in proc.stdout and "Exit codes" in proc.stdout


def test_top_level_help_lists_the_commands():
    proc = mlora("--help")
    assert proc.returncode == 0
    for command in ("run", "validate", "convert", "generate"):
        assert command in proc.stdout


def test_mlora_tui_says_it_is_not_built_yet():
    proc = subprocess.run([sys.executable, "-m", "mlora_tui.tui_entry"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert "not built yet" in proc.stderr and "mlora run" in proc.stderr
    assert proc.stdout == ""


# -- validate -------------------------------------------------------------------------------

def test_validate_good_config(config):
    result = invoke("validate", config)
    assert result.exit_code == 0, result.output
    assert "config OK" in result.stdout
    assert "alpha" in result.stdout and "beta" in result.stdout
    assert "8 alpaca rows" in result.stdout
    assert "dora" in result.stdout


@pytest.mark.parametrize("old, new, expected", [
    ('r = 4', 'lerning_rate = 0.1', ['[adapter "alpha"]', "lerning_rate"]),
    ('r = 4', 'r = "four"', ['[adapter "alpha"]', "r", "integer"]),
    ('data = "data.jsonl"\nr = 4', 'data = "missing.jsonl"\nr = 4', ["data", "missing.jsonl"]),
    ('r = 4', 'r = ', ["invalid TOML", "line"]),
])
def test_validate_bad_config_names_file_and_field(config, old, new, expected):
    config.write_text(config.read_text().replace(old, new, 1))
    result = invoke("validate", config)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert str(config) in result.stderr
    for text in expected:
        assert text in result.stderr
    assert isinstance(result.exception, SystemExit)   # no other exception escaped


def test_validate_bad_data_row_names_file_and_line(config):
    data = config.parent / "data.jsonl"
    lines = data.read_text().splitlines()
    lines[2] = '{"instruction": "no output here"}'
    data.write_text("\n".join(lines) + "\n")
    result = invoke("validate", config)
    assert result.exit_code == 2
    assert f"{data}:3" in result.stderr and "output" in result.stderr


def test_bad_config_in_a_real_process_exits_2_without_traceback(config):
    config.write_text(config.read_text().replace("r = 4", "r = 0", 1))
    proc = mlora("run", str(config), cwd=config.parent)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert str(config) in proc.stderr and "r" in proc.stderr
    assert proc.stdout == ""


# -- convert --------------------------------------------------------------------------------

def test_convert_round_trip(tmp_path, tiny_llama):
    from engine.config import load_config

    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    mlora_config = {
        "base_model": str(tiny_llama),
        "cutoff_len": 128,
        "save_step": 7,
        "train_lora_simultaneously_num": 2,
        "lora": [
            {"name": "first", "data": "data.jsonl", "r": 4, "alpha": 8, "dropout": 0.0,
             "target_modules": {"q_proj": True, "k_proj": False, "v_proj": True},
             "optim": "adamw", "lr": 2e-4, "batch_size": 4, "micro_batch_size": 2,
             "num_epochs": 3, "prompt": "alpaca"},
            {"name": "second", "data": "data.jsonl", "r": 8, "lora_alpha": 16,
             "optim": "sgd", "momentum": 0.9, "lr": 0.01, "batch_size": 2,
             "micro_batch_size": 1, "num_epochs": 1},
        ],
    }
    source = tmp_path / "mlora.json"
    source.write_text(json.dumps(mlora_config))
    out = tmp_path / "converted.toml"

    printed = invoke("convert", source)
    assert printed.exit_code == 0, printed.output
    written = invoke("convert", source, "-o", out)
    assert written.exit_code == 0, written.output
    assert out.read_text() == printed.stdout
    assert invoke("validate", out).exit_code == 0

    loaded = load_config(out)
    assert loaded.train.cutoff_len == 128 and loaded.train.save_step == 7
    assert loaded.train.train_lora_simultaneously_num == 2
    first, second = loaded.adapters
    assert (first.name, first.r, first.lora_alpha, first.lr) == ("first", 4, 8, 2e-4)
    assert first.target_modules == ["q_proj", "v_proj"]
    assert (first.batch_size, first.micro_batch_size, first.num_epochs) == (4, 2, 3)
    assert (second.optim, second.momentum, second.lr) == ("sgd", 0.9, 0.01)


def test_convert_bad_json_exits_2(tmp_path):
    source = tmp_path / "broken.json"
    source.write_text('{"lora": [\n')
    result = invoke("convert", source)
    assert result.exit_code == 2
    assert str(source) in result.stderr and "JSON" in result.stderr


# -- run ------------------------------------------------------------------------------------

def test_run_json_trains_both_adapters_to_the_end(trained):
    proc, events, output_dir = trained
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert all({"type", "time"} <= event.keys() for event in events)
    # stdout holds exactly the events the engine logged.
    logged = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert events == logged

    added = {e["job"]: e for e in events if e["type"] == "job_added"}
    assert set(added) == {"alpha", "beta"}
    for name, job in added.items():
        steps = [e["step"] for e in events if e["type"] == "step" and e["job"] == name]
        assert steps == list(range(1, job["total_steps"] + 1))
        folder = output_dir / name
        assert (folder / "adapter_config.json").is_file()
        assert (folder / "adapter_model.safetensors").is_file()
    assert events[-1]["type"] == "run_end"
    assert {name: job["state"] for name, job in events[-1]["jobs"].items()} == \
        {"alpha": "done", "beta": "done"}
    # People get the way to try each adapter on stderr.
    assert f"mlora generate --adapter {output_dir / 'alpha'}" in proc.stderr


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def test_ctrl_c_stops_after_the_step_and_saves_checkpoints(tmp_path, tiny_llama):
    config_path = write_run(tmp_path, tiny_llama, epochs=200)
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr_file:
        proc = subprocess.Popen([sys.executable, "-m", "mlora_tui.cli", "run", "--json",
                                 str(config_path)], cwd=tmp_path, env=CHILD_ENV,
                                stdout=subprocess.PIPE, stderr=stderr_file, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    events = []
    try:
        deadline = time.monotonic() + 60
        # Both jobs have taken an optimizer step (beta accumulates two micro-batches).
        while {e["job"] for e in events if e["type"] == "step"} != {"alpha", "beta"}:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "the run ended before its first step"
            events.append(json.loads(line))
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    while (line := lines.get(timeout=10)) is not None:
        events.append(json.loads(line))
    stderr = stderr_path.read_text()

    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Ctrl-C" in stderr
    final = events[-1]
    assert final["type"] == "run_end"
    checkpoints = {e["job"]: e for e in events if e["type"] == "checkpoint"}
    for name, job in final["jobs"].items():
        assert job["state"] == "running" and 0 < job["step"] < job["total_steps"]
        # The checkpoint is of the last step taken, and loads as an adapter folder.
        assert checkpoints[name]["step"] == job["step"]
        assert (Path(checkpoints[name]["path"]) / "adapter_model.safetensors").is_file()


class _FailingEngine:
    """Stands in for engine.trainer.Engine: one job finishes, one fails."""

    def __init__(self, config, on_event):
        self.on_event = on_event
        self.emit("run_start", device="cpu", dtype="fp32", attn_impl="sdpa", base_model="m",
                  model_type="llama", num_params=1000, config=config.source, output_dir="out")
        for name in ("alpha", "beta"):
            self.emit("job_added", job=name, adapter={"r": 4}, total_steps=2, train_examples=4,
                      val_examples=0, targets=["q_proj"])

    def emit(self, type_, **fields):
        self.on_event({"type": type_, "time": 0.0, **fields})

    def run(self, max_steps=None):
        self.emit("job_state", job="alpha", state="running", reason=None, step=0, total_steps=2)
        self.emit("job_state", job="beta", state="running", reason=None, step=0, total_steps=2)
        self.emit("step", job="alpha", step=1, total_steps=2, epoch=0.5, loss=1.5, lr=1e-3,
                  grad_norm=1.0, tokens=10, tokens_per_s=100.0, eta_s=1.0)
        self.emit("job_state", job="beta", state="failed", reason="loss is NaN at step 1",
                  step=0, total_steps=2)
        self.emit("step", job="alpha", step=2, total_steps=2, epoch=1.0, loss=1.2, lr=1e-3,
                  grad_norm=1.0, tokens=10, tokens_per_s=100.0, eta_s=0.0)
        self.emit("adapter_saved", job="alpha", step=2, path="out/alpha")
        self.emit("job_state", job="alpha", state="done", reason=None, step=2, total_steps=2)
        self.emit("run_end", jobs={"alpha": {"state": "done", "step": 2, "total_steps": 2},
                                   "beta": {"state": "failed", "step": 0, "total_steps": 2}})

    def request_stop(self):
        pass


def test_run_exits_1_when_a_job_fails(config, monkeypatch):
    monkeypatch.setattr("engine.trainer.Engine", _FailingEngine)
    result = invoke("run", config)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""   # bars and messages go to stderr
    assert "beta: failed: loss is NaN at step 1" in result.stderr
    assert "mlora generate --adapter out/alpha" in result.stderr


# -- generate -------------------------------------------------------------------------------

def test_prompt_ids_match_the_training_encoding():
    from engine.data import IGNORE_INDEX, encode_row
    from engine.generate import prompt_ids
    from engine.prompts import load_template
    from tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    for name in ("alpaca", "mlora", "chat", "none"):
        template = load_template(name)
        row = {"instruction": "Say hello world.", "output": "hello world"}
        encoded = encode_row(row, tokenizer, template, cutoff_len=256)
        prompt_length = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
        assert prompt_ids(row["instruction"], tokenizer, template) == \
            encoded.input_ids[:prompt_length], name


def _reference_generation(base_model: Path, adapter: Path | None, prompt: str,
                          template_name: str, max_new_tokens: int) -> str:
    """Greedy decoding with plain transformers (and PEFT for the adapter)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.data import IGNORE_INDEX, encode_row
    from engine.prompts import load_template

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    encoded = encode_row({"instruction": prompt, "output": "x"}, tokenizer,
                         load_template(template_name), cutoff_len=256)
    prompt_length = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    ids = torch.tensor([encoded.input_ids[:prompt_length]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("name, template", [("alpha", "alpaca"), ("beta", "chat")])
def test_generate_matches_peft_and_base_only_matches_the_base_model(trained, tiny_llama,
                                                                    name, template, monkeypatch):
    # The references run on the CPU; so does generate, so greedy choices cannot differ by device.
    monkeypatch.setenv("MLORA_BACKEND_TYPE", "cpu")
    _proc, _events, output_dir = trained
    adapter = output_dir / name
    prompt = "Convert this sentence to uppercase."
    with_adapter = invoke("generate", "--adapter", adapter, "--max-new-tokens", "8", prompt)
    base_only = invoke("generate", "--adapter", adapter, "--base-only",
                       "--max-new-tokens", "8", prompt)
    assert with_adapter.exit_code == 0, with_adapter.output
    assert base_only.exit_code == 0, base_only.output

    expected_adapter = _reference_generation(tiny_llama, adapter, prompt, template, 8)
    expected_base = _reference_generation(tiny_llama, None, prompt, template, 8)
    assert expected_adapter != expected_base   # the trained adapter changes the reply
    assert with_adapter.stdout == expected_adapter + "\n"
    assert base_only.stdout == expected_base + "\n"


def test_generate_with_a_bad_adapter_folder_exits_2(tmp_path, trained, monkeypatch):
    monkeypatch.setenv("MLORA_BACKEND_TYPE", "cpu")
    _proc, _events, output_dir = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("generate", "--adapter", empty, "hello")
    assert result.exit_code == 2
    assert str(empty) in result.stderr and "adapter_config.json" in result.stderr

    # An adapter whose config does not match its weights (r edited by hand).
    edited = tmp_path / "edited"
    shutil.copytree(output_dir / "alpha", edited, ignore=shutil.ignore_patterns("checkpoints"))
    peft_config = json.loads((edited / "adapter_config.json").read_text())
    peft_config["r"] = 2
    (edited / "adapter_config.json").write_text(json.dumps(peft_config))
    result = invoke("generate", "--adapter", edited, "hello")
    assert result.exit_code == 2
    assert str(edited) in result.stderr and "shape" in result.stderr

    result = invoke("generate", "--adapter", output_dir / "alpha", "--base-model",
                    tmp_path / "no-such-model", "hello")
    assert result.exit_code == 2
    assert "no-such-model" in result.stderr
