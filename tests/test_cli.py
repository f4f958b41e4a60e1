"""The `mlora` command line: torch-free start, validate, convert, run, attach, ps, jobs, stop,
generate, and exit codes.

Training runs in real engine processes on a tiny random Llama (as a user would run it);
quick commands go through Typer's CliRunner. Every engine of this module registers in a
runtime folder of its own. Generated text is checked against PEFT and plain transformers,
not against the code's own output.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.core import protocol
from engine.core.runtime import EngineRecord, list_engines, write_record
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


@pytest.fixture(scope="module", autouse=True)
def runtime():
    """A runtime folder of this module's own, for engines started here and in-process."""
    with tempfile.TemporaryDirectory(prefix="mlc-", dir="/tmp") as path:
        saved = os.environ.get("MLORA_RUNTIME_DIR")
        os.environ["MLORA_RUNTIME_DIR"] = CHILD_ENV["MLORA_RUNTIME_DIR"] = path
        yield path
        del CHILD_ENV["MLORA_RUNTIME_DIR"]
        if saved is None:
            del os.environ["MLORA_RUNTIME_DIR"]
        else:
            os.environ["MLORA_RUNTIME_DIR"] = saved


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

def test_help_does_not_import_torch():
    """Importing the modules is tests/test_torch_free.py's; this is what --help runs."""
    code = (
        "import json, sys\n"
        "import mlora_tui.cli\n"
        "sys.argv = ['mlora', 'run', '--help']\n"
        "try:\n"
        "    mlora_tui.cli.main()\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "after_help = sorted(m for m in %r if m in sys.modules)\n"
        "print(json.dumps([after_help, code]))\n"
    ) % (HEAVY_MODULES,)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    after_help, exit_code = json.loads(proc.stdout.strip().splitlines()[-1])
    assert after_help == []
    assert exit_code == 0
    # The exit codes are documented in the run command's help.
    assert "130" in proc.stdout and "Exit codes" in proc.stdout
    assert "--detach" in proc.stdout and "mlora attach NAME" in proc.stdout


def test_top_level_help_lists_the_commands_and_exit_codes():
    proc = mlora("--help")
    assert proc.returncode == 0
    for command in ("run", "attach", "ps", "jobs", "stop", "serve", "validate", "convert",
                    "generate"):
        assert command in proc.stdout
    assert "3 no such engine running" in " ".join(proc.stdout.split())
    proc = mlora("jobs", "--help")
    assert proc.returncode == 0
    for command in ("list", "add", "pause", "resume", "cancel", "save"):
        assert command in proc.stdout


@pytest.mark.parametrize("args", [["attach"], ["attach", "nope"], ["stop"], ["jobs", "list"],
                                  ["jobs", "pause", "alpha"], ["jobs", "save", "-e", "x"]])
def test_no_engine_exits_3(args):
    result = invoke(*args)
    assert result.exit_code == 3, result.output
    assert "no engine" in result.stderr and "Traceback" not in result.output


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
    from engine.core.config import load_config

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

def test_run_json_trains_both_adapters_to_the_end(trained, runtime):
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
    run_end, engine_exit = events[-2:]
    assert run_end["type"] == "run_end"
    assert {name: job["state"] for name, job in run_end["jobs"].items()} == \
        {"alpha": "done", "beta": "done"}
    assert engine_exit["type"] == "engine_exit" and engine_exit["code"] == 0
    # People get the way to try each adapter on stderr.
    assert f"mlora generate --adapter {output_dir / 'alpha'}" in proc.stderr
    # The engine ran in its own process, logged to engine.log, and is gone.
    assert "exited with code 0" in (output_dir / "engine.log").read_text()
    assert list_engines() == [] and os.listdir(runtime) == ["registry.lock"]


def test_mlora_flags_override_the_model_table(tmp_path, tiny_llama):
    """m-LoRA's --bf16 / --attn_impl reach the engine process; bad ones exit 2 at once."""
    config_path = write_run(tmp_path, tiny_llama)
    proc = mlora("run", "--json", "--max-steps", "1", "--bf16", "--attn_impl", "eager",
                 str(config_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    start = next(json.loads(line) for line in proc.stdout.splitlines()
                 if json.loads(line)["type"] == "run_start")
    assert (start["dtype"], start["attn_impl"]) == ("bf16", "eager")

    for flags, message in ((["--fp16", "--bf16"], "--fp16 and --bf16 contradict"),
                           (["--attn-impl", "fast"], "[model] attn_impl: expected one of"),
                           (["--base_model", str(tmp_path / "nowhere")], "no folder at")):
        result = invoke("run", *flags, config_path)
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())
        assert list_engines() == []


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _json_events_until(lines: queue.Queue, done, timeout: float = 60) -> list[dict]:
    """JSON lines from ``lines`` until ``done(events)`` holds."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while not done(events):
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, "the output ended first"
        events.append(json.loads(line))
    return events


def _popen_mlora(*args: str, cwd: Path, stderr_path: Path):
    """The CLI as a child with stdout read line by line on a thread: (process, lines)."""
    with open(stderr_path, "w") as stderr_file:
        proc = subprocess.Popen([sys.executable, "-m", "mlora_tui.cli", *args], cwd=cwd,
                                env=CHILD_ENV, stdout=subprocess.PIPE, stderr=stderr_file,
                                text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    return proc, lines


def _both_stepped(events: list[dict]) -> bool:
    return {e["job"] for e in events if e["type"] == "step"} == {"alpha", "beta"}


def test_ctrl_c_stops_after_the_step_and_saves_checkpoints(tmp_path, tiny_llama):
    config_path = write_run(tmp_path, tiny_llama, epochs=200)
    stderr_path = tmp_path / "stderr.txt"
    proc, lines = _popen_mlora("run", "--json", str(config_path), cwd=tmp_path,
                               stderr_path=stderr_path)
    try:
        # Both jobs have taken an optimizer step (beta accumulates two micro-batches).
        events = _json_events_until(lines, _both_stepped)
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
    final = next(e for e in events if e["type"] == "run_end")
    checkpoints = {e["job"]: e for e in events if e["type"] == "checkpoint"}
    for name, job in final["jobs"].items():
        assert job["state"] == "running" and 0 < job["step"] < job["total_steps"]
        # The checkpoint is of the last step taken, and loads as an adapter folder.
        assert checkpoints[name]["step"] == job["step"]
        assert (Path(checkpoints[name]["path"]) / "adapter_model.safetensors").is_file()
    assert events[-1]["type"] == "engine_exit" and events[-1]["code"] == 0
    # The engine stopped: it is no longer registered.
    assert list_engines() == []


def test_detach_attach_steer_and_stop(tmp_path, tiny_llama):
    config_path = write_run(tmp_path, tiny_llama, epochs=300)
    proc = mlora("run", "--detach", str(config_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (record,) = list_engines()
    assert record.name == "runs" and record.output_dir == str(tmp_path / "runs")
    for hint in ("mlora attach runs", "mlora-tui --attach runs", "mlora stop runs"):
        assert hint in proc.stderr
    try:
        # `mlora attach` replays everything so far; Ctrl-C only detaches.
        stderr_path = tmp_path / "attach.txt"
        attach, lines = _popen_mlora("attach", "runs", "--json", cwd=tmp_path,
                                     stderr_path=stderr_path)
        events = _json_events_until(lines, _both_stepped)
        # The replay starts at the engine's first event, as in metrics.jsonl.
        assert events[0]["type"] == "log" and "listening" in events[0]["message"]
        logged = (tmp_path / "runs" / "metrics.jsonl").read_text().splitlines()
        assert events[0] == json.loads(logged[0])
        attach.send_signal(signal.SIGINT)
        assert attach.wait(timeout=60) == 130, stderr_path.read_text()
        assert "Detached" in stderr_path.read_text()
        assert [e.pid for e in list_engines()] == [record.pid]

        result = invoke("ps")
        assert result.exit_code == 0, result.output
        assert "runs" in result.stdout and str(record.pid) in result.stdout
        assert record.socket in result.stdout and "alpha" in result.stdout

        result = invoke("jobs", "pause", "alpha")
        assert result.exit_code == 0 and "alpha: paused" in result.stderr
        result = invoke("jobs", "list", "--json", "-e", "runs")
        states = {job["name"]: job["state"] for job in map(json.loads, result.stdout.splitlines())}
        assert states == {"alpha": "paused", "beta": "running"}
        result = invoke("jobs", "pause", "alpha")
        assert result.exit_code == 2 and "only running or queued jobs pause" in result.stderr
        result = invoke("jobs", "resume", "alpha")
        assert result.exit_code == 0 and "alpha: queued" in result.stderr

        result = invoke("jobs", "save", "beta")
        assert result.exit_code == 0, result.output
        assert (Path(result.stdout.strip()) / "adapter_model.safetensors").is_file()

        extra = tmp_path / "extra.toml"
        extra.write_text('[[adapter]]\nname = "gamma"\ndata = "data.jsonl"\nr = 2\n'
                         "batch_size = 2\nmicro_batch_size = 2\n")
        result = invoke("jobs", "add", extra)
        assert result.exit_code == 0 and "Added gamma" in result.stderr
        result = invoke("jobs", "add", extra)
        assert result.exit_code == 2 and "name" in result.stderr and "gamma" in result.stderr

        result = invoke("stop", "runs")
        assert result.exit_code == 0, result.output
        assert "checkpoint alpha" in result.stderr and "stopped" in result.stderr
    finally:
        if list_engines():
            os.kill(record.pid, signal.SIGTERM)
    assert list_engines() == []
    assert invoke("attach", "runs").exit_code == 3


def test_an_engine_crash_exits_1_with_the_traceback_in_its_log(tmp_path, tiny_llama):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_llama, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors at all")
    config_path = write_run(tmp_path, broken)
    proc = mlora("run", "--json", str(config_path), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    errors = [e for e in events if e["type"] == "log" and e["level"] == "error"]
    assert errors and "engine error" in errors[-1]["message"]
    assert events[-1]["type"] == "engine_exit" and events[-1]["code"] == 1
    log = (tmp_path / "runs" / "engine.log").read_text()
    assert "Traceback" in log and "exited with code 1" in log
    assert "Traceback" not in proc.stderr
    assert list_engines() == []


def test_an_engine_that_dies_at_start_is_reported_with_its_log(tmp_path, tiny_llama):
    config_path = write_run(tmp_path, tiny_llama)
    # A runtime folder so deep that no Unix socket path fits in it.
    deep = Path(tempfile.mkdtemp(prefix="mlc-deep-", dir="/tmp"))
    try:
        runtime = deep / ("d" * 100)
        env = {**CHILD_ENV, "MLORA_RUNTIME_DIR": str(runtime)}
        proc = subprocess.run([sys.executable, "-m", "mlora_tui.cli", "run", str(config_path)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(deep)
    assert proc.returncode == 2, proc.stderr
    assert "exited with code 2 before it was ready" in proc.stderr
    assert "longer than Unix sockets allow" in proc.stderr and "MLORA_RUNTIME_DIR" in proc.stderr
    assert "Traceback" not in proc.stderr


class _FakeEngine(threading.Thread):
    """A registered engine that speaks the protocol: one job finishes, one fails."""

    EVENTS = [
        ("run_start", dict(device="cpu", dtype="fp32", attn_impl="sdpa", base_model="m",
                           model_type="llama", num_params=1000, config="c.toml",
                           output_dir="out")),
        ("job_added", dict(job="alpha", adapter={"r": 4}, total_steps=2, train_examples=4,
                           val_examples=0, targets=["q_proj"])),
        ("job_added", dict(job="beta", adapter={"r": 4}, total_steps=2, train_examples=4,
                           val_examples=0, targets=["q_proj"])),
        ("job_state", dict(job="alpha", state="running", reason=None, step=0, total_steps=2)),
        ("job_state", dict(job="beta", state="running", reason=None, step=0, total_steps=2)),
        ("step", dict(job="alpha", step=1, total_steps=2, epoch=0.5, loss=1.5, lr=1e-3,
                      grad_norm=1.0, tokens=10, tokens_per_s=100.0, eta_s=1.0)),
        ("job_state", dict(job="beta", state="failed", reason="loss is NaN at step 1", step=0,
                           total_steps=2)),
        ("step", dict(job="alpha", step=2, total_steps=2, epoch=1.0, loss=1.2, lr=1e-3,
                      grad_norm=1.0, tokens=10, tokens_per_s=100.0, eta_s=0.0)),
        ("adapter_saved", dict(job="alpha", step=2, path="out/alpha")),
        ("job_state", dict(job="alpha", state="done", reason=None, step=2, total_steps=2)),
        ("run_end", dict(jobs={"alpha": {"state": "done", "step": 2, "total_steps": 2},
                               "beta": {"state": "failed", "step": 0, "total_steps": 2}})),
        ("engine_exit", dict(code=1, reason="failed: beta")),
    ]

    def __init__(self, runtime: str):
        super().__init__(daemon=True)
        self.path = Path(runtime) / f"{os.getpid()}.sock"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        self.server.listen()
        self.record = EngineRecord(name="fake", pid=os.getpid(), socket=str(self.path),
                                   config="c.toml", output_dir="/out", base_model="m",
                                   started=time.time(), log="/out/engine.log")
        write_record(self.record)

    def run(self) -> None:
        # Connections one at a time: the registry's liveness probe, then the client.
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as stream:
                for line in stream:
                    request_id, type_, _ = protocol.parse_request(protocol.decode(line))
                    result = {"engine": self.record.to_json()} if type_ == "hello" else {}
                    stream.write(protocol.encode(protocol.reply(request_id, result)))
                    if type_ == "subscribe":
                        for seq, (kind, fields) in enumerate(self.EVENTS, start=1):
                            stream.write(protocol.encode(protocol.event(
                                seq, {"type": kind, "time": 0.0, **fields})))
                        stream.flush()
                        break
                    stream.flush()

    def close(self) -> None:
        self.server.close()
        self.path.unlink(missing_ok=True)
        (self.path.parent / f"{os.getpid()}.json").unlink(missing_ok=True)


def test_attach_exits_1_when_a_job_fails(runtime):
    fake = _FakeEngine(runtime)
    fake.start()
    try:
        result = invoke("attach")
    finally:
        fake.close()
    assert result.exit_code == 1, result.output
    assert result.stdout == ""   # bars and messages go to stderr
    assert "beta: failed: loss is NaN at step 1" in result.stderr
    assert "mlora generate --adapter out/alpha" in result.stderr


# -- generate -------------------------------------------------------------------------------

def test_prompt_ids_match_the_training_encoding():
    from engine.core.data import IGNORE_INDEX, encode_row
    from engine.train.generate import prompt_ids
    from engine.core.prompts import load_template
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

    from engine.core.data import IGNORE_INDEX, encode_row
    from engine.core.prompts import load_template

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


def test_run_resume_continues_a_stopped_run_and_plain_run_refuses_it(tmp_path, tiny_llama):
    """`mlora run --max-steps 2`, then `mlora run` again is refused (the folder holds that
    run), `mlora run --resume` continues it to the end, from its checkpoint."""
    config = write_run(tmp_path / "job", tiny_llama, epochs=2)
    first = mlora("run", str(config), "--json", "--max-steps", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    again = mlora("run", str(config), "--json", cwd=tmp_path)
    assert again.returncode == 2 and "--resume" in again.stderr
    assert "Traceback" not in again.stderr
    resumed = mlora("run", str(config), "--json", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    events = [json.loads(line) for line in resumed.stdout.splitlines()]
    (event,) = [e for e in events if e["type"] == "resumed"]
    assert event["engine_step"] == 2
    ends = [e for e in events if e["type"] == "run_end"]
    assert ends and all(job["state"] == "done" for job in ends[-1]["jobs"].values())
