"""Hostile input, outside the training step: every case gets a clear message, exit code 2
for a user's mistake, loses nothing, and never crashes or blocks the engine.

Cases already proved elsewhere are listed in ``EXISTING`` and checked to still exist
(``test_the_cases_proved_elsewhere_still_exist``), so this file is the one index of them:

- config: malformed TOML, wrong types, unknown keys, missing/empty data files, r = 0,
  micro_batch_size > batch_size, duplicate names, non-UTF-8 config: tests/test_config.py
  (``BAD_CONFIGS``, each also through ``mlora validate``: exit 2, no traceback);
- data: rows missing fields, non-UTF-8 rows, oversized rows: tests/test_data.py;
- protocol against a real engine: random bytes, invalid JSON, not an object, unknown
  type, wrong field types, wrong version, oversized line: tests/test_protocol.py; a
  subscriber that never reads: tests/test_server.py; runtime folder modes: test_server.py.

What is new here runs against real code: a real engine process on a tiny Llama (no mocked
models) for the protocol, the real CLI for exit codes and messages.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.core import protocol as p
from engine.core.config import load_config
from engine.core.errors import ConfigError, DataError, UserError
from engine.core.outputs import (REPLACED_PREFIX, RUN_RECORD, check_output_dir, config_fingerprint,
                                 read_run_record, run_outputs, set_aside_run, write_run_record)
from engine.core.runtime import list_engines, runtime_dir
from mlora_tui.cli import app
from mlora_tui.client import EngineClient, EngineUnavailable, RequestFailed, hello_sync
from test_cli import CHILD_ENV, ROWS, write_run
from test_protocol import GARBAGE, Raw, start_engine, stop_engine
from test_server import ADAPTER as SERVER_ADAPTER
from test_server import write_config
from tiny_models import tiny_model_dir

TESTS = Path(__file__).resolve().parent

# (test module, test function or BAD_CONFIGS id) -> the case it proves.
EXISTING = {
    ("test_config", "malformed_toml"): "malformed TOML",
    ("test_config", "toml_capital_bool"): "malformed TOML (True)",
    ("test_config", "duplicate_key"): "malformed TOML (a key twice)",
    ("test_config", "r_float"): "wrong types",
    ("test_config", "lr_string"): "wrong types",
    ("test_config", "name_int"): "wrong types",
    ("test_config", "model_unknown_key"): "unknown keys",
    ("test_config", "top_level_typo"): "unknown keys",
    ("test_config", "lora_alfa"): "unknown keys",
    ("test_config", "data_missing_file"): "missing data file",
    ("test_config", "data_empty"): "empty data file",
    ("test_config", "r_zero"): "r = 0",
    ("test_config", "lr_ten"): "absurd learning rate",
    ("test_config", "lr_negative"): "negative learning rate",
    ("test_config", "lr_nan"): "NaN learning rate",
    ("test_config", "micro_bigger"): "micro_batch_size > batch_size",
    ("test_config", "duplicate_name"): "duplicate adapter names",
    ("test_config", "duplicate_name_case"): "duplicate adapter names (case)",
    ("test_config", "test_not_utf8"): "non-UTF-8 config",
    ("test_config", "test_bad_config_through_the_cli_exits_2_without_traceback"):
        "every config case: exit 2, no traceback",
    ("test_data", "test_malformed_jsonl_names_file_and_line"): "rows missing fields",
    ("test_data", "test_non_utf8_reports_line_and_offset"): "non-UTF-8 data",
    ("test_data", "test_empty_file"): "empty data file",
    ("test_data", "test_oversized_line"): "oversized data line",
    ("test_data", "test_oversized_json_array_row"): "oversized JSON array row",
    ("test_cli", "test_validate_bad_data_row_names_file_and_line"): "rows missing fields (CLI)",
    ("test_cli", "test_bad_config_in_a_real_process_exits_2_without_traceback"):
        "config error through mlora run",
    ("test_protocol", "test_decode_refuses"): "invalid JSON, not an object, oversized",
    ("test_protocol", "test_parse_request_refuses"): "wrong field types, unknown type",
    ("test_protocol", "test_garbage_gets_errors_and_the_engine_trains_on"):
        "random bytes, bad JSON, unknown type, wrong types, version, oversized: live engine",
    ("test_server", "test_a_client_that_never_reads_is_dropped_and_training_goes_on"):
        "a subscriber that never reads",
    ("test_server", "test_socket_and_runtime_dir_are_private"): "socket 0600, folder 0700",
    ("test_server", "test_a_runtime_dir_others_can_open_is_refused"):
        "runtime folder with loose mode, a symlink",
    ("test_server", "test_add_jobs_over_the_socket"): "bad [[adapter]] TOML over the socket",
}


def test_the_cases_proved_elsewhere_still_exist():
    from test_config import BAD_CONFIGS

    case_ids = {case[0] for case in BAD_CONFIGS}
    for (module, name), case in EXISTING.items():
        tree = ast.parse((TESTS / f"{module}.py").read_text())
        functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        found = name in functions or (module == "test_config" and name in case_ids)
        assert found, f"{module}.{name} ({case}) is gone: move its case here"


# -- environment -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runtime():
    """A private runtime folder for this module's engines (never the user's own)."""
    with tempfile.TemporaryDirectory(prefix="mlh-", dir="/tmp") as path:
        saved = os.environ.get("MLORA_RUNTIME_DIR")
        os.environ["MLORA_RUNTIME_DIR"] = path
        yield path
        if saved is None:
            del os.environ["MLORA_RUNTIME_DIR"]
        else:
            os.environ["MLORA_RUNTIME_DIR"] = saved


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_model_dir("llama", tmp_path_factory)


def mlora(runtime: str, *args: str, cwd: Path, timeout: float = 180):
    """The real CLI in a fresh interpreter, with this module's runtime folder."""
    env = {**CHILD_ENV, "MLORA_RUNTIME_DIR": runtime}
    return subprocess.run([sys.executable, "-m", "mlora_tui.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> str:
    """Exit code 2, the fragments in the message, no traceback; the message."""
    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert "Traceback" not in output
    for fragment in fragments:
        assert " ".join(fragment.split()) in output, (fragment, output)
    return output


# -- configs and data ----------------------------------------------------------------------------

ADAPTER = '[[adapter]]\nname = "a"\ndata = "data.jsonl"\n'


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return tmp_path


@pytest.mark.parametrize("lr", ["1e6", "1.5", "0", "-3e-4", "-inf"])
def test_absurd_learning_rates_are_errors_not_warnings(workdir, lr):
    """lr > 1 or <= 0 is an error: no LoRA run trains with it (typical values are 1e-5 to
    1e-2; past 1 the loss turns NaN within steps), so a warning would only cost GPU time
    and bury the mistake under progress bars. lr = 1 is the largest accepted."""
    path = workdir / "run.toml"
    path.write_text(ADAPTER + f"lr = {lr}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.table, info.value.field) == ('adapter "a"', "lr")
    assert str(info.value).startswith(f'{path} [adapter "a"] lr: expected a')
    path.write_text(ADAPTER + "lr = 1\n")
    assert load_config(path).adapters[0].lr == 1


def _run_config(workdir: Path, extra: str = "") -> Path:
    path = workdir / "run.toml"
    path.write_text(f'[train]\noutput_dir = "{workdir / "out"}"\n' + ADAPTER + extra)
    return path


def test_non_utf8_config_exits_2_from_validate_and_run(workdir, runtime):
    path = workdir / "run.toml"
    path.write_bytes(ADAPTER.encode() + b'prompt = "caf\xe9"\n')
    for command in ("validate", "run"):
        assert_user_error(invoke(command, path), str(path), "not UTF-8", "line 4")
    assert list_engines() == []


@pytest.mark.parametrize("content, line, fragment", [
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "no output"}\n', 2,
     "missing field 'output'"),
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', 2, "not valid UTF-8: byte 0xe9"),
    (b'{"text": "fine"}\n\xff\xfe\x00garbage\n', 2, "not valid UTF-8: byte 0xff"),
])
def test_bad_data_rows_exit_2_from_validate_and_run(workdir, runtime, content, line, fragment):
    data = workdir / "data.jsonl"
    data.write_bytes(content)
    config = _run_config(workdir)
    for command in ("validate", "run"):
        assert_user_error(invoke(command, config), f"{data}:{line}", fragment)
    assert list_engines() == []
    assert not (workdir / "out").exists()     # nothing started, nothing written


def _huge_line_file(path: Path, size: int) -> None:
    """A JSONL file whose second line is ``size`` bytes (a sparse file: no disk used)."""
    with open(path, "wb") as f:
        f.write(b'{"text": "ok"}\n{"text": "')
        f.truncate(size)
        f.seek(size)
        f.write(b'"}\n{"text": "ok"}\n')


def test_a_100_mb_data_line_is_refused_at_once_with_bounded_memory(workdir, runtime):
    """A line over the row limit (1 MiB) is an error naming file and line; reading stops at
    limit + 1 byte of it, so a 100 MB line costs about 1 MB and no time."""
    data = workdir / "data.jsonl"
    _huge_line_file(data, 100 << 20)
    config = _run_config(workdir)
    from engine.core.data_files import load_data_file

    for check in (lambda: load_data_file(data), lambda: invoke("validate", config),
                  lambda: invoke("run", config)):
        tracemalloc.start()
        started = time.monotonic()
        try:
            outcome = check()
        except DataError as e:
            outcome = e
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        if isinstance(outcome, DataError):
            assert (outcome.file, outcome.line) == (str(data), 2)
            message = str(outcome)
        else:
            message = assert_user_error(outcome, f"{data}:2")
        assert "longer than the limit of 1 MiB per row" in message
        assert peak < 16 << 20, f"peak {peak >> 20} MiB"
        assert elapsed < 20
    assert list_engines() == []


# -- output folders: engine/core/outputs.py ------------------------------------------------------------

def _config(workdir: Path, extra: str = "", names=("a",)):
    tables = "".join(f'[[adapter]]\nname = "{n}"\ndata = "data.jsonl"\n{extra}' for n in names)
    path = workdir / "run.toml"
    path.write_text(f'[train]\noutput_dir = "{workdir / "out"}"\n' + tables)
    return load_config(path)


def _fake_adapter_folder(folder: Path, checkpoints_only: bool = False) -> None:
    """The files an engine leaves in an adapter folder (contents do not matter here)."""
    if checkpoints_only:
        (folder / "checkpoints" / "step-10").mkdir(parents=True)
        (folder / "checkpoints" / "step-10" / "adapter_model.safetensors").write_bytes(b"w")
    else:
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        (folder / "adapter_config.json").write_text("{}")


def _refusal(config, **flags) -> str:
    with pytest.raises(ConfigError) as info:
        check_output_dir(config, resume=flags.get("resume", False),
                         overwrite=flags.get("overwrite", False))
    error = info.value
    assert (error.file, error.table, error.field) == (config.source, "train", "output_dir")
    assert str(error).startswith(f"{config.source} [train] output_dir: ")
    return str(error)


def test_an_empty_or_new_output_dir_is_fine(workdir):
    config = _config(workdir)
    check_output_dir(config, resume=False, overwrite=False)      # no folder yet
    (workdir / "out").mkdir()
    check_output_dir(config, resume=False, overwrite=False)      # an empty folder
    # A run that failed at start (a wrong target module): log events, no step, no adapter.
    (workdir / "out" / "metrics.jsonl").write_text(
        json.dumps({"type": "log", "level": "error", "message": "target module"}) + "\n")
    (workdir / "out" / "engine.log").write_text("error\n")
    write_run_record(workdir / "out", _config(workdir, "r = 4\n"))
    assert run_outputs(workdir / "out") == []
    check_output_dir(config, resume=False, overwrite=False)


@pytest.mark.parametrize("make, shown", [
    (lambda out: _fake_adapter_folder(out / "a"), "a/ (adapter files)"),
    (lambda out: _fake_adapter_folder(out / "other", checkpoints_only=True),
     "other/ (checkpoints)"),
    (lambda out: (out.mkdir(), (out / "metrics.jsonl").write_text(
        '{"type": "run_start"}\n{"type": "step", "job": "a", "step": 1, "loss": 2.0}\n')),
     "metrics.jsonl (training steps)"),
])
def test_an_output_dir_holding_a_run_is_refused(workdir, make, shown):
    out = workdir / "out"
    make(out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    config = _config(workdir)
    message = _refusal(config)
    assert f"{out} already holds a run ({shown})" in message
    assert "--resume" in message and "--overwrite" in message and "nothing is deleted" in message
    # Without a checkpoint there is nothing to resume from: the engine would start over.
    assert f"no checkpoint to resume from (none in {out / 'checkpoints'})" in \
        _refusal(config, resume=True)
    check_output_dir(config, resume=False, overwrite=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before   # untouched
    with pytest.raises(UserError, match="contradict"):
        check_output_dir(config, resume=True, overwrite=True)


def test_an_output_dir_that_is_a_file_is_refused(workdir):
    (workdir / "out").write_text("not a folder")
    assert "is a file, not a folder" in _refusal(_config(workdir))


def test_resume_needs_the_same_settings(workdir):
    out = workdir / "out"
    config = _config(workdir, "lr = 1e-3\n", names=("a", "b"))
    path = write_run_record(out, config)
    _fake_adapter_folder(out / "a")
    assert path == out / RUN_RECORD
    assert sorted(p.name for p in out.iterdir()) == ["a", RUN_RECORD]
    assert "no checkpoint to resume from" in _refusal(config, resume=True)
    # What engine.core.checkpoints calls a whole checkpoint: its engine.json written last.
    (out / "checkpoints" / "step-3").mkdir(parents=True)
    (out / "checkpoints" / "step-3" / "engine.json").write_text("{}")
    assert "checkpoints/ (1 checkpoint)" in _refusal(config)
    record = read_run_record(out)
    assert record.fingerprint == config_fingerprint(config)
    assert set(record.settings["adapters"]) == {"a", "b"}
    assert record.settings["model"]["base_model"] == config.model.base_model
    assert record.config == str(workdir / "run.toml")

    check_output_dir(config, resume=True, overwrite=False)               # the same config
    check_output_dir(_config(workdir, "lr = 1e-3\n", names=("a", "b", "c")), resume=True,
                     overwrite=False)                                     # one more adapter
    # A changed setting is named, with both values.
    message = _refusal(_config(workdir, "lr = 2e-3\n", names=("a", "b")), resume=True)
    assert '[adapter "a"] lr: 0.001 in the run, 0.002 now' in message
    assert '[adapter "b"] lr' in message and "Undo the changes" in message
    # The model too.
    changed = _config(workdir, "lr = 1e-3\n", names=("a", "b"))
    changed.model.dtype = "bf16"
    assert '[model] dtype: "fp32" in the run, "bf16" now' in _refusal(changed, resume=True)
    # Where the data lives may change (the engine checks what it holds, example by example).
    (workdir / "moved.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    moved = _config(workdir, "lr = 1e-3\n", names=("a", "b"))
    moved.adapters[0].data = str(workdir / "moved.jsonl")
    check_output_dir(moved, resume=True, overwrite=False)
    # An unreadable record is named.
    (out / RUN_RECORD).write_bytes(b"\xff{not json")
    message = _refusal(config, resume=True)
    assert str(out / RUN_RECORD) in message and "cannot read the run record" in message


def test_the_run_record_is_atomic_and_its_fingerprint_stable(workdir):
    out = workdir / "out"
    config = _config(workdir)
    write_run_record(out, config)
    first = (out / RUN_RECORD).read_text()
    write_run_record(out, config)
    assert sorted(p.name for p in out.iterdir()) == [RUN_RECORD]   # no temporary file left
    assert json.loads(first)["fingerprint"] == read_run_record(out).fingerprint
    assert json.loads(first)["format"] == 1
    # A field at its default value does not count: an older record without it matches.
    data = json.loads(first)
    del data["settings"]["adapters"]["a"]["use_dora"]
    (out / RUN_RECORD).write_text(json.dumps(data))
    check_output_dir(config, resume=True, overwrite=False)
    # A different config has another fingerprint.
    assert config_fingerprint(_config(workdir, "r = 4\n")) != config_fingerprint(config)
    # Not a record at all.
    (out / RUN_RECORD).write_text("[1, 2]")
    with pytest.raises(UserError, match="not a run record"):
        read_run_record(out)


def test_set_aside_moves_the_run_and_keeps_everything(workdir):
    out = workdir / "out"
    _fake_adapter_folder(out / "a")
    _fake_adapter_folder(out / "b", checkpoints_only=True)
    (out / "metrics.jsonl").write_text('{"type": "step"}\n')
    (out / "engine.log").write_text("log\n")
    (out / "checkpoints" / "step-3").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    write_run_record(out, _config(workdir))
    moved = set_aside_run(out)
    assert moved.parent == out and moved.name.startswith(REPLACED_PREFIX)
    assert sorted(p.name for p in moved.iterdir()) == \
        ["a", "b", "checkpoints", "engine.log", "metrics.jsonl", "run.json"]
    assert (moved / "a" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", moved.name])
    assert run_outputs(out) == []        # what was set aside is no run in the way
    assert set_aside_run(out) is None    # nothing left to move


def test_mlora_run_refuses_a_folder_with_another_run_and_overwrite_sets_it_aside(
        tmp_path, tiny_llama, runtime):
    config = write_run(tmp_path, tiny_llama)
    out = tmp_path / "runs"
    first = mlora(runtime, "run", "--json", "--max-steps", "1", str(config), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (checkpoint,) = out.glob("checkpoints/step-*/alpha/adapter_model.safetensors")
    weights = checkpoint.read_bytes()
    listing = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    # Again: refused before any engine starts, naming the folder and the ways on.
    assert "--overwrite" in invoke("run", "--help").output
    assert_user_error(invoke("run", config), f"{config} [train] output_dir:",
                      f"{out} already holds a run", "checkpoints/ (1 checkpoint)", "--resume",
                      "--overwrite")
    assert list_engines() == []
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == listing
    # --resume passes the check: there is a real checkpoint to continue from.
    check_output_dir(load_config(config), resume=True, overwrite=False)

    # --overwrite moves the old run aside, whole, and trains afresh.
    second = mlora(runtime, "run", "--json", "--overwrite", "--max-steps", "1", str(config),
                   cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    (moved,) = out.glob(f"{REPLACED_PREFIX}*")
    assert f"moved the previous run in {out} to {moved}" in " ".join(second.stderr.split())
    assert (moved / checkpoint.relative_to(out)).read_bytes() == weights
    assert checkpoint.is_file() and (out / "metrics.jsonl").is_file()
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(e["type"] == "run_start" for e in events) == 1    # a fresh metrics file


# -- target modules the model does not have -------------------------------------------------------

def test_mlora_run_names_a_missing_target_module_and_exits_2(tmp_path, tiny_llama, runtime):
    config = write_run(tmp_path, tiny_llama)
    config.write_text(config.read_text().replace(
        'name = "alpha"\n', 'name = "alpha"\ntarget_modules = ["q_proj", "nope_proj"]\n', 1))
    proc = mlora(runtime, "run", str(config), cwd=tmp_path)
    output = " ".join((proc.stderr + proc.stdout).split())
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    assert "target module 'nope_proj' not found" in output
    assert "this model's linear layers are: q_proj, k_proj, v_proj, o_proj" in output
    assert list_engines() == []
    # Nothing was trained: the fixed config runs in the same folder without --overwrite.
    config.write_text(config.read_text().replace(', "nope_proj"', ""))
    assert run_outputs(tmp_path / "runs") == []
    check_output_dir(load_config(config), resume=False, overwrite=False)


# -- the protocol against a live engine ------------------------------------------------------------

HELLO_TIMEOUT_S = 3
MAX_CLIENTS = 8


@pytest.fixture(scope="module")
def engine(tmp_path_factory, runtime, tiny_llama):
    """A real engine: three jobs of one example a step, training for a long time."""
    config = write_config(tmp_path_factory.mktemp("hostile"), tiny_llama)
    proc, record = start_engine(config, runtime, {
        "MLORA_CLIENT_BACKLOG_BYTES": "16384", "MLORA_HELLO_TIMEOUT_S": str(HELLO_TIMEOUT_S),
        "MLORA_MAX_CLIENTS": str(MAX_CLIENTS)})
    record["config_path"] = str(config)
    watcher = Watcher(record, replay=True)
    stepped = set()
    while stepped != {"a", "b", "c"}:
        stepped |= {step["job"] for step in watcher.steps(1, timeout=180)}
    watcher.close()
    yield record
    del record["config_path"]
    assert stop_engine(proc, record) == 0


class Watcher:
    """A subscribed connection that counts step events as they come."""

    def __init__(self, engine: dict, replay: bool = False):
        self.raw = Raw(engine["socket"])
        assert self.raw.hello()["kind"] == "reply"
        self.raw.request(2, "subscribe", replay=replay)
        assert self.raw.answer()["kind"] == "reply"

    def steps(self, count: int, timeout: float = 90) -> list[dict]:
        steps = []
        deadline = time.monotonic() + timeout
        while len(steps) < count:
            assert time.monotonic() < deadline, "training stopped"
            message = self.raw.read(max(0.1, deadline - time.monotonic()))
            assert message is not None, "the engine closed the watcher's connection"
            assert message["kind"] == "event", message
            if message["event"]["type"] == "step":
                steps.append(message["event"])
        return steps

    def close(self) -> None:
        self.raw.close()


def closed(raw: Raw) -> bool:
    """Whether the engine closed the connection (a reset when our bytes were unread)."""
    try:
        return raw.read() is None
    except ConnectionResetError:
        return True


def _status_works(engine: dict) -> None:
    raw = Raw(engine["socket"])
    assert raw.hello()["kind"] == "reply"
    raw.request(2, "status")
    reply = raw.answer()
    assert reply["kind"] == "reply" and {j["name"] for j in reply["result"]["jobs"]} >= \
        {"a", "b", "c"}
    raw.close()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


class Sender(threading.Thread):
    """Sends ``chunk`` over ``sock`` again and again until stopped or refused; counts bytes."""

    def __init__(self, sock: socket.socket, chunk: bytes, limit: int):
        super().__init__(daemon=True)
        self.sock, self.chunk, self.limit = sock, chunk, limit
        self.sent = 0
        self.error: Exception | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        self.sock.settimeout(0.2)
        view = memoryview(self.chunk)
        offset = 0
        while not self.stop.is_set() and self.sent < self.limit:
            try:
                n = self.sock.send(view[offset:])
            except socket.timeout:
                continue
            except OSError as e:
                self.error = e
                return
            self.sent += n
            offset = (offset + n) % len(self.chunk)


def test_the_socket_and_its_folder_are_owner_only(engine, runtime):
    assert stat.S_IMODE(os.stat(runtime).st_mode) == 0o700
    assert os.stat(runtime).st_uid == os.getuid()
    assert stat.S_IMODE(os.stat(engine["socket"]).st_mode) == 0o600
    assert os.stat(engine["socket"]).st_uid == os.getuid()


NEW_GARBAGE = [
    # (what is sent, the error code, a fragment of the message)
    (b"[" * 200_000 + b"\n", p.BAD_JSON, "nested too deeply"),
    (b'{"kind": "request", "id": 1, "type": "hello", "version": ' + b"9" * 5000 + b"}\n",
     p.BAD_JSON, "digits"),
    (b'{"kind": "request", "id": "1", "type": "status"}\n', p.BAD_MESSAGE, "integer 'id'"),
    (b'{"kind": "request", "id": 1, "type": "' + b"t" * 900_000 + b'"}\n', p.UNKNOWN_TYPE,
     "more characters"),
    (b'{"kind": "request", "id": 1, "type": "hello", "version": "1"}\n', p.BAD_MESSAGE,
     "'version' must be int"),
    (b'{"kind": "request", "id": 1, "type": "hello", "version": 1e400}\n', p.BAD_MESSAGE,
     "must be int"),
    (b"\x00\x00\x00\r\n", p.BAD_JSON, "not JSON"),
    (b'{"kind": "request", "id": 1, "type": "\\ud800"}\n', p.UNKNOWN_TYPE, "unknown"),
]


def test_garbage_gets_errors_and_never_reaches_the_engine(engine):
    watcher = Watcher(engine)
    cases = [(make(), code, None) for make, code, _ in GARBAGE] + NEW_GARBAGE
    for line, code, fragment in cases:
        raw = Raw(engine["socket"])
        raw.send(line)
        reply = raw.answer()
        assert reply["kind"] == "error" and reply["code"] == code, (line[:80], reply)
        assert len(reply["message"]) < p.MAX_ERROR_CHARS + 100
        if fragment:
            assert fragment in reply["message"], reply
        if code == p.TOO_LONG:
            assert raw.read() is None
        else:
            assert raw.hello()["kind"] == "reply"    # the connection still works
        raw.close()

    # After hello: requests whose answer would quote a huge value, and wrong versions.
    raw = Raw(engine["socket"])
    assert raw.hello()["kind"] == "reply"
    raw.request(3, "pause", job="j" * 1_000_000)           # "no job named 'jjj...'"
    reply = raw.answer()
    assert (reply["kind"], reply["id"], reply["code"]) == ("error", 3, p.USER_ERROR)
    assert reply["message"].startswith("no job named 'jjj") and "more characters" in \
        reply["message"]
    # 2 bytes of UTF-8 in, 6 bytes of JSON escape out: a reply 3 times the request's size.
    raw.send(json.dumps(p.request(6, "pause", job="é" * 500_000), ensure_ascii=False)
             .encode() + b"\n")
    reply = raw.answer()
    assert (reply["id"], reply["code"]) == (6, p.USER_ERROR), reply
    assert reply["message"].startswith("no job named 'ééé")
    raw.request(4, "add_jobs", toml='[[adapter]]\nname = "x"\ndata = "data.jsonl"\nprompt = "none"\n'
                                    'target_modules = ["' + "m" * 900_000 + '"]\n')
    reply = raw.answer()
    assert (reply["id"], reply["code"]) == (4, p.USER_ERROR), reply
    assert "target module 'mmm" in reply["message"] and "more characters" in reply["message"]
    raw.request(5, "status")
    assert raw.answer()["id"] == 5
    raw.close()
    for version in (0, p.PROTOCOL_VERSION + 1, -1):
        raw = Raw(engine["socket"])
        raw.request(1, "hello", version=version)
        reply = raw.answer()
        assert reply["code"] == p.VERSION_MISMATCH and f"version {p.PROTOCOL_VERSION}" in \
            reply["message"]
        assert raw.read() is None
        raw.close()

    assert len(watcher.steps(3)) == 3
    _status_works(engine)
    watcher.close()


def test_a_silent_client_is_closed_after_the_hello_timeout(engine):
    watcher = Watcher(engine)
    silent = Raw(engine["socket"])
    started = time.monotonic()
    _status_works(engine)                  # others are served meanwhile
    watcher.steps(2)
    reply = silent.read(timeout=HELLO_TIMEOUT_S + 30)
    assert reply is not None and reply["code"] == p.HELLO_TIMEOUT, reply
    assert f"no hello within {HELLO_TIMEOUT_S} s" in reply["message"]
    assert silent.read() is None
    assert time.monotonic() - started >= HELLO_TIMEOUT_S - 0.5
    silent.close()
    watcher.steps(2)
    assert re.search(r"closing the connection of client \? \(#\d+\): no hello within",
                     Path(engine["log"]).read_text())
    watcher.close()


def test_too_many_clients_are_refused_and_the_others_served(engine):
    watcher = Watcher(engine)
    held, refused = [], None
    for _ in range(MAX_CLIENTS + 1):
        raw = Raw(engine["socket"])
        raw.request(1, "hello", version=p.PROTOCOL_VERSION, client="many")
        reply = raw.answer()
        if reply["kind"] == "error":
            refused = (raw, reply)
            break
        held.append(raw)
    assert refused is not None, "no connection was refused"
    raw, reply = refused
    assert reply["code"] == p.TOO_MANY_CLIENTS and f"{MAX_CLIENTS} connections" in \
        reply["message"]
    assert closed(raw)
    raw.close()

    async def connect_and_ask_status():
        client = await EngineClient.connect(engine["socket"], timeout=30)
        try:
            return await client.status()
        finally:
            await client.close()

    with pytest.raises(EngineUnavailable, match="too_many_clients"):
        asyncio.run(connect_and_ask_status())
    watcher.steps(2)                       # the held ones and the watcher are served
    held.pop().close()
    deadline = time.monotonic() + 30
    while True:                            # room again once the engine saw the close
        try:
            assert asyncio.run(connect_and_ask_status())["jobs"]
            break
        except EngineUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    for raw in held:
        raw.close()
    watcher.close()


def test_a_client_flooding_lines_without_reading_is_throttled(engine):
    """The engine stops reading from a client that does not read its replies: the
    client's own sends block; the engine's memory does not grow; training goes on."""
    watcher = Watcher(engine)
    rss_before = _rss(engine["pid"])
    flood = Raw(engine["socket"])
    assert flood.hello()["kind"] == "reply"
    garbage = Sender(flood.sock, (b"x" * 999 + b"\n") * 1024, limit=256 << 20)
    statuses = Raw(engine["socket"])
    assert statuses.hello()["kind"] == "reply"
    requests = b"".join(p.encode(p.request(i, "status")) for i in range(10, 5010))
    status_flood = Sender(statuses.sock, requests, limit=len(requests))
    garbage.start()
    status_flood.start()
    watcher.steps(3)
    time.sleep(2)
    sent = garbage.sent
    time.sleep(2)
    assert garbage.error is None
    assert garbage.sent == sent, "the engine still reads from a client that does not read"
    assert sent < 16 << 20, f"the engine read {sent >> 20} MiB of unanswered lines"
    _status_works(engine)
    watcher.steps(3)
    assert _rss(engine["pid"]) - rss_before < 64 << 20
    # Its replies are all there, in order, when it reads at last.
    for _ in range(50):
        reply = flood.read()
        assert reply["code"] == p.BAD_JSON
    ids = [statuses.answer()["id"] for _ in range(40)]
    assert ids == list(range(10, 50))
    garbage.stop.set()
    status_flood.stop.set()
    flood.close()
    statuses.close()
    garbage.join(10)
    status_flood.join(10)
    watcher.steps(2)
    watcher.close()


def test_a_100_mb_line_closes_that_connection_only(engine):
    watcher = Watcher(engine)
    rss_before = _rss(engine["pid"])
    raw = Raw(engine["socket"])
    sender = Sender(raw.sock, b"y" * (1 << 20), limit=100 << 20)
    sender.start()
    reply = raw.answer()
    assert reply["code"] == p.TOO_LONG and f"{p.MAX_LINE_BYTES} bytes" in reply["message"]
    assert raw.read() is None
    sender.join(30)
    assert sender.sent < 16 << 20          # the engine stopped reading it
    assert _rss(engine["pid"]) - rss_before < 64 << 20
    raw.close()
    watcher.steps(3)
    _status_works(engine)
    watcher.close()


def test_a_subscriber_that_never_reads_is_dropped_with_a_logged_reason(engine):
    stuck = Raw(engine["socket"])
    stuck.send(p.encode(p.request(1, "hello", version=p.PROTOCOL_VERSION, client="stuck"))
               + p.encode(p.request(2, "subscribe")))
    watcher = Watcher(engine)
    log = Path(engine["log"])
    deadline = time.monotonic() + 120
    while not re.search(r"client stuck \(#\d+\) dropped: it fell \d+ bytes behind",
                        log.read_text()):
        watcher.steps(1)
        assert time.monotonic() < deadline, "the stuck client was never dropped"
    watcher.steps(3)
    _status_works(engine)
    stuck.close()
    watcher.close()


def test_add_jobs_with_a_missing_target_module_harms_no_running_job(engine, tmp_path):
    folder = Path(engine["config_path"]).parent
    watcher = Watcher(engine)

    async def main():
        client = await EngineClient.connect(engine["socket"], client="test")
        good = SERVER_ADAPTER.format(name="late", epochs=1)
        bad = good.replace("r = 2", 'r = 2\ntarget_modules = ["q_proj", "nope_proj"]')
        with pytest.raises(RequestFailed) as info:
            await client.add_jobs(bad, source=str(folder / "more.toml"))
        assert info.value.code == p.USER_ERROR
        assert "target module 'nope_proj' not found" in info.value.message
        assert "this model's linear layers are: q_proj" in info.value.message
        # A data file with a bad row: named with its line.
        rows = tmp_path / "rows.jsonl"
        rows.write_text(json.dumps(ROWS[0]) + "\n" + '{"instruction": "x"}\n')
        with pytest.raises(RequestFailed) as info:
            await client.add_jobs(good.replace("data.jsonl", str(rows)),
                                  source=str(folder / "more.toml"))
        assert f"{rows}:2" in info.value.message and "output" in info.value.message
        # Nothing of the failed adds stayed: the same name is free, and trains.
        stream = await client.subscribe(replay=False)
        assert await client.add_jobs(good, source=str(folder / "more.toml")) == \
            {"added": ["late"]}
        async for event in stream:
            if event["type"] == "step" and event["job"] == "late":
                break
        jobs = {j["name"]: j["state"] for j in (await client.status())["jobs"]}
        await client.close()
        return jobs

    jobs = asyncio.run(asyncio.wait_for(main(), 180))
    assert {jobs[name] for name in ("a", "b", "c")} <= {"running", "queued"}
    assert len(watcher.steps(3)) == 3
    watcher.close()


def test_the_engine_logged_no_traceback(engine):
    text = Path(engine["log"]).read_text()
    assert "Traceback" not in text and "listener error" not in text, text[-3000:]


# -- the client against something that is not an engine ---------------------------------------------

@pytest.mark.parametrize("answer, fragment", [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not an mlora engine"),
    (b'{"kind": "reply", "id": 1, "result": 5}\n', "not an mlora engine"),
    (b"z" * (3 << 20), "not an mlora engine"),
    (b'{"kind": "event", "seq": 1, "event": [1]}\n{"kind": "reply"}\n', "malformed"),
])
def test_the_client_reports_a_socket_that_is_no_engine(tmp_path, answer, fragment):
    path = tempfile.mktemp(prefix="mlx-", dir="/tmp")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)

    def serve():
        for _ in range(2):
            conn, _ = server.accept()
            conn.recv(65536)
            try:
                conn.sendall(answer)
            except OSError:
                pass
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        if fragment == "malformed":
            with pytest.raises(EngineUnavailable, match="malformed message"):
                asyncio.run(EngineClient.connect(path, timeout=10))
            with pytest.raises(EngineUnavailable):
                hello_sync(path, timeout=10)
        else:
            with pytest.raises(EngineUnavailable, match=fragment):
                hello_sync(path, timeout=10)
            with pytest.raises(EngineUnavailable):
                asyncio.run(EngineClient.connect(path, timeout=10))
    finally:
        thread.join(10)
        server.close()
        os.unlink(path)


# -- the runtime folder ------------------------------------------------------------------------------

def test_a_runtime_dir_of_another_user_is_refused(monkeypatch, tmp_path):
    """Simulated without root: the folder's owner is not the uid the process has."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    monkeypatch.setenv("MLORA_RUNTIME_DIR", str(theirs))
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 4242)
    with pytest.raises(UserError, match=f"belongs to uid {real_uid}, not to you"):
        runtime_dir()
    assert_user_error(invoke("ps"), f"{theirs} belongs to uid {real_uid}",
                      "MLORA_RUNTIME_DIR")


def test_mlora_run_refuses_a_loose_runtime_dir_before_starting(monkeypatch, workdir):
    loose = workdir / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    monkeypatch.setenv("MLORA_RUNTIME_DIR", str(loose))
    config = _run_config(workdir)
    assert_user_error(invoke("run", config), f"{loose} has mode 0777",
                      f"chmod 700 {loose}")
    assert sorted(p.name for p in loose.iterdir()) == []    # no socket, no record
    assert not (workdir / "out").exists()


def test_the_launcher_refuses_a_folder_with_another_run_for_the_tui_too(tmp_path):
    """`mlora-tui CONFIG` starts its engine through ensure_engine, which checks the folder
    as `mlora run` does (nothing is started, the old run is untouched)."""
    from mlora_tui.launcher import ensure_engine

    (tmp_path / "data.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n")
    out = tmp_path / "out"
    (out / "checkpoints" / "step-3").mkdir(parents=True)
    (out / "checkpoints" / "step-3" / "engine.json").write_text("{}")
    config = tmp_path / "run.toml"
    (tmp_path / "model").mkdir()   # never loaded: the check comes before any engine
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    config.write_text(f'[model]\nbase_model = "{tmp_path / "model"}"\n[train]\n'
                      f'output_dir = "{out}"\n[[adapter]]\nname = "a"\ndata = "data.jsonl"\n')
    with pytest.raises(UserError, match="already holds a run"):
        ensure_engine(config, timeout=5)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


def test_mlora_tui_refuses_a_folder_with_another_run_before_its_screen_opens(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    out = tmp_path / "out"
    (out / "checkpoints" / "step-3").mkdir(parents=True)
    (out / "checkpoints" / "step-3" / "engine.json").write_text("{}")
    (out / "metrics.jsonl").write_text(json.dumps({"type": "step", "job": "a"}) + "\n")
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\nbase_model = "{tmp_path / "model"}"\n[train]\n'
                      f'output_dir = "{out}"\n[[adapter]]\nname = "a"\ndata = "data.jsonl"\n')
    proc = subprocess.run([sys.executable, "-m", "mlora_tui.tui_entry", str(config)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TERM": "dumb"})
    assert proc.returncode == 2, proc.stderr
    assert "already holds a run" in proc.stderr and "--resume" in proc.stderr
    assert "Traceback" not in proc.stderr
