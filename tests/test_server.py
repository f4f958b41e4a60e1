"""The engine process behind its socket: clients, control, the registry, survival.

A real engine (`mlora serve`, a tiny Llama, three one-example-a-step jobs training for a
long time) serves the tests of this module in file order; the last one stops it. The
runtime folder is private to the module. No fixed sleeps: every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.core.errors import UserError
from engine.core.runtime import EngineRecord, find_engine, list_engines, runtime_dir
from mlora_tui.cli import app
from mlora_tui.client import EngineClient, RequestFailed
from test_cli import CHILD_ENV, ROWS
from test_protocol import Raw, start_engine, stop_engine
from tiny_models import tiny_model_dir

ADAPTER = """
[[adapter]]
name = "{name}"
data = "data.jsonl"
prompt = "none"
r = 2
lr = 1e-2
batch_size = 1
micro_batch_size = 1
num_epochs = {epochs}
"""


def write_config(folder: Path, model: Path, names=("a", "b", "c"),
                 epochs: int | dict[str, int] = 2000) -> Path:
    """Jobs of one example per step: many small events, so buffers fill in seconds.
    ``epochs``: every job's, or each job's by name (its keys then name the jobs)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    text = (f'[model]\nbase_model = "{model}"\n\n[train]\noutput_dir = "{folder / "out"}"\n'
            f"save_step = 1000000\ncutoff_len = 64\n")
    per_job = epochs if isinstance(epochs, dict) else dict.fromkeys(names, epochs)
    text += "".join(ADAPTER.format(name=n, epochs=e) for n, e in per_job.items())
    path = folder / "run.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def runtime():
    with tempfile.TemporaryDirectory(prefix="mls-", dir="/tmp") as path:
        old = os.environ.get("MLORA_RUNTIME_DIR")
        os.environ["MLORA_RUNTIME_DIR"] = path
        yield path
        if old is None:
            del os.environ["MLORA_RUNTIME_DIR"]
        else:
            os.environ["MLORA_RUNTIME_DIR"] = old


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def served(tmp_path_factory, runtime, model):
    """(process, record, config) of the module's engine."""
    config = write_config(tmp_path_factory.mktemp("served"), model)
    # A small backlog limit, so a client that never reads is dropped within seconds.
    proc, record = start_engine(config, runtime, {"MLORA_CLIENT_BACKLOG_BYTES": "16384"})

    async def every_job_stepped():
        client = await connect(record)
        stepped = set()
        async for event in client.events(replay=True):
            stepped |= {event["job"]} if event["type"] == "step" else set()
            if stepped == {"a", "b", "c"}:
                break
        await client.close()

    run(every_job_stepped())
    yield proc, record, config
    stop_engine(proc, record)


@pytest.fixture
def engine(served):
    return served[1]


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def connect(engine, name="test") -> EngineClient:
    return await EngineClient.connect(engine["socket"], client=name)


async def next_event(stream, predicate, timeout: float = 60) -> dict:
    """The next event of ``stream`` for which ``predicate`` holds."""
    async def find():
        async for event in stream:
            if predicate(event):
                return event
        raise AssertionError("the engine closed the connection")
    return await asyncio.wait_for(find(), timeout)


def is_step(job=None):
    return lambda e: e["type"] == "step" and (job is None or e["job"] == job)


# -- the module's engine -------------------------------------------------------------------------

def test_socket_and_runtime_dir_are_private(engine, runtime):
    assert stat.S_IMODE(os.stat(runtime).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(engine["socket"]).st_mode)
    assert stat.S_IMODE(os.stat(engine["socket"]).st_mode) == 0o600
    assert Path(engine["socket"]).parent == Path(runtime)
    # The engine is registered under its output folder's name, with its log there.
    (record,) = list_engines()
    assert record == EngineRecord(**engine)
    assert record.name == "out" and record.log == str(Path(record.output_dir) / "engine.log")
    assert find_engine("out") == record and find_engine(output_dir=record.output_dir) == record
    assert find_engine(str(record.pid)) == record and find_engine("other") is None
    # Its own session: a hangup of the terminal that started it cannot reach it.
    assert os.getsid(record.pid) == record.pid


def test_a_second_engine_for_the_same_output_dir_refuses(served, runtime):
    _proc, record, config = served
    proc = subprocess.run([sys.executable, "-m", "mlora_tui.cli", "serve", str(config)],
                          env={**CHILD_ENV, "MLORA_RUNTIME_DIR": runtime},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"engine 'out' (pid {record['pid']}) already runs" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [e.pid for e in list_engines()] == [record["pid"]]


def test_two_clients_see_the_same_events_and_a_late_one_replays_from_seq_1(engine):
    async def main():
        early = await connect(engine, "early")
        early_events = []
        early_stream = early.events(replay=True)
        # The early client has seen a few steps of every job.
        while {e["job"] for e in early_events if e["type"] == "step"} != {"a", "b", "c"}:
            early_events.append(await next_event(early_stream, lambda e: True))
        late = await connect(engine, "late")
        late_events = []
        async for event in late.events(replay=True):
            late_events.append(event)
            if event["seq"] >= early_events[-1]["seq"]:
                break
        await early.close()
        await late.close()
        return early_events, late_events

    early, late = run(main())
    assert [e["seq"] for e in late] == list(range(1, len(late) + 1))
    assert [e["seq"] for e in early] == list(range(1, len(early) + 1))
    # The same events, field for field, with every step so far.
    assert late[:len(early)] == early
    assert late[0]["type"] == "log" and "listening" in late[0]["message"]
    types = {e["type"] for e in late}
    assert {"run_start", "job_added", "job_state", "step"} <= types
    for job in ("a", "b", "c"):
        steps = [e["step"] for e in late if e["type"] == "step" and e["job"] == job]
        assert steps == list(range(1, len(steps) + 1)) and steps


def test_resource_events(engine):
    async def main():
        client = await connect(engine)
        stream = await client.subscribe(replay=False)
        event = await next_event(stream, lambda e: e["type"] == "resource", timeout=30)
        await client.close()
        return event

    event = run(main())
    assert event["rss_bytes"] > 10 << 20
    assert event["cpu_percent"] is not None and event["cpu_percent"] >= 0
    assert event["device"] == "cpu"
    assert {"device_memory_bytes", "device_memory_total_bytes", "device_utilization"} <= set(event)


def test_pause_resume_cancel_save_over_the_socket(engine):
    async def main():
        watcher = await connect(engine, "watcher")
        stream = await watcher.subscribe(replay=False)
        steerer = await connect(engine, "steerer")

        assert await steerer.pause("a") == {"job": "a", "state": "paused"}
        event = await next_event(stream, lambda e: e["type"] == "job_state" and e["job"] == "a")
        assert (event["state"], event["reason"]) == ("paused", "paused by user")
        paused_at = event["step"]
        # The others train on; "a" does not.
        seen = []
        while sum(1 for e in seen if e["job"] == "b") < 3:
            seen.append(await next_event(stream, is_step()))
        assert all(e["job"] != "a" for e in seen)
        jobs = {j["name"]: j for j in (await steerer.status())["jobs"]}
        assert jobs["a"]["state"] == "paused" and jobs["a"]["step"] == paused_at
        assert jobs["b"]["state"] == "running" and jobs["b"]["step"] > 0

        assert (await steerer.resume("a"))["state"] == "queued"
        await next_event(stream, lambda e: e["type"] == "job_state" and e["job"] == "a"
                         and e["state"] == "running")
        assert (await next_event(stream, is_step("a")))["step"] == paused_at + 1

        saved = await steerer.save("b")
        (path,) = saved["paths"]
        # A checkpoint holds every job at one step; the reply names b's folder in it.
        event = await next_event(stream, lambda e: e["type"] == "checkpoint" and e["job"] == "b")
        assert event["path"] == path
        assert (Path(path) / "adapter_model.safetensors").is_file()
        assert (Path(path) / "optimizer.pt").is_file()

        assert (await steerer.cancel("c"))["state"] == "cancelled"
        event = await next_event(stream, lambda e: e["type"] == "job_state" and e["job"] == "c")
        assert (event["state"], event["reason"]) == ("cancelled", "cancelled by user")
        jobs = {j["name"]: j["state"] for j in (await steerer.status())["jobs"]}
        assert jobs == {"a": "running", "b": "running", "c": "cancelled"}

        # Requests sent back to back, without waiting for replies, apply in order.
        results = await asyncio.gather(steerer.pause("b"), steerer.resume("b"),
                                       steerer.pause("b"), steerer.resume("b"))
        assert [r["state"] for r in results] == ["paused", "queued", "paused", "queued"]
        states = []
        while len(states) < 4:
            event = await next_event(stream, lambda e: e["type"] == "job_state"
                                     and e["job"] == "b")
            states.append(event["state"])
        assert states == ["paused", "queued", "paused", "queued"]

        # Refusals name the job and the reason; nothing changes.
        for call, text in [(steerer.resume("b"), "only paused jobs resume"),
                           (steerer.pause("c"), "is cancelled"),
                           (steerer.cancel("zzz"), "no job named 'zzz'"),
                           (steerer.save("zzz"), "no job named 'zzz'")]:
            with pytest.raises(RequestFailed) as info:
                await call
            assert info.value.code == "user_error" and text in info.value.message
        await watcher.close()
        await steerer.close()

    run(main())


def test_add_jobs_over_the_socket(engine, served, tmp_path):
    config = served[2]
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "rows.jsonl").write_text(config.parent.joinpath("data.jsonl").read_text())
    good = ADAPTER.format(name="d", epochs=1).replace("data.jsonl", "rows.jsonl")

    async def main():
        client = await connect(engine)
        stream = await client.subscribe(replay=False)
        # Relative paths resolve against the folder of the source file.
        assert await client.add_jobs(good, source=str(extra / "more.toml")) == {"added": ["d"]}
        added = await next_event(stream, lambda e: e["type"] == "job_added")
        assert added["job"] == "d" and added["adapter"]["data"] == str(extra / "rows.jsonl")
        assert (await next_event(stream, is_step("d")))["step"] == 1

        for text, source, expected in [
            ('[[adapter]]\nname = "e"\ndata = ', "bad.toml", ["bad.toml", "invalid TOML"]),
            (ADAPTER.format(name="e", epochs=1).replace("r = 2", 'r = "two"'), "typed.toml",
             ['[adapter "e"] r', "integer"]),
            (ADAPTER.format(name="A", epochs=1), "dup.toml",
             ['dup.toml [adapter "A"] name', "'a' is already"]),
            (ADAPTER.format(name="e", epochs=1).replace("data.jsonl", "none.jsonl"),
             "missing.toml", ["data", "none.jsonl"]),
            ('[model]\nbase_model = "x"\n', "model.toml", ["[model]", "only [[adapter]]"]),
        ]:
            with pytest.raises(RequestFailed) as info:
                await client.add_jobs(text, source=source)
            assert info.value.code == "user_error"
            for part in expected:
                assert part in info.value.message, info.value.message
        names = [j["name"] for j in (await client.status())["jobs"]]
        await client.close()
        return names

    assert run(main()) == ["a", "b", "c", "d"]


def test_a_client_that_never_reads_is_dropped_and_training_goes_on(engine):
    stuck = Raw(engine["socket"])
    stuck.send(b"".join([
        b'{"kind": "request", "id": 1, "type": "hello", "version": 1, "client": "stuck"}\n',
        b'{"kind": "request", "id": 2, "type": "subscribe"}\n']))
    log = Path(engine["log"])

    async def main():
        client = await connect(engine)
        stream = await client.subscribe(replay=False)
        steps = 0
        # Steps keep coming while the stuck client's buffers fill, until it is dropped.
        deadline = time.monotonic() + 120
        while not re.search(r"client stuck \(#\d+\) dropped", log.read_text()):
            await next_event(stream, is_step())
            steps += 1
            assert time.monotonic() < deadline, "the stuck client was never dropped"
        for _ in range(3):
            await next_event(stream, is_step())
        await client.close()
        return steps

    assert run(main()) > 0
    # What the engine had written before dropping it is still there; then the end.
    stuck.sock.settimeout(30)
    while stuck.sock.recv(1 << 20):
        pass
    stuck.close()


def test_stop_checkpoints_and_exits_0(served, engine, runtime):
    proc = served[0]

    async def main():
        client = await connect(engine)
        stream = await client.subscribe(replay=False)
        assert await client.stop() == {}
        events = [event async for event in stream]   # until the engine closes it
        await client.close()
        return events

    events = run(main())
    assert proc.wait(60) == 0
    run_end = next(e for e in events if e["type"] == "run_end")
    assert run_end["jobs"]["c"]["state"] == "cancelled"
    unfinished = {name for name, job in run_end["jobs"].items()
                  if job["state"] in ("running", "paused", "queued") and job["step"] > 0}
    assert unfinished >= {"a", "b"}
    # Every unfinished job saved a checkpoint of the step it stopped at.
    checkpoints = {e["job"]: e for e in events if e["type"] == "checkpoint"}
    assert set(checkpoints) == unfinished
    for name, event in checkpoints.items():
        assert event["step"] == run_end["jobs"][name]["step"]
        assert (Path(event["path"]) / "adapter_model.safetensors").is_file()
    assert events[-1]["type"] == "engine_exit" and events[-1]["code"] == 0
    assert "stop requested" in events[-1]["reason"]
    assert not Path(engine["socket"]).exists()
    assert not (Path(runtime) / f"{engine['pid']}.json").exists()
    assert list_engines() == []


# -- the registry, without an engine ---------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _record(folder: Path, pid: int, name: str) -> EngineRecord:
    record = EngineRecord(name=name, pid=pid, socket=str(folder / f"{pid}.sock"),
                          config="/c.toml", output_dir=f"/out/{name}", base_model="m",
                          started=time.time(), log="/out/engine.log")
    (folder / f"{pid}.json").write_text(json.dumps(record.to_json()))
    return record


def test_stale_records_and_sockets_are_cleaned(monkeypatch):
    with tempfile.TemporaryDirectory(prefix="mlq-", dir="/tmp") as folder:
        folder = Path(folder)
        monkeypatch.setenv("MLORA_RUNTIME_DIR", str(folder))
        os.chmod(folder, 0o700)
        dead = _dead_pid()
        # A dead engine: its record, and its socket file still bound to nothing.
        dead_record = _record(folder, dead, "dead")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(dead_record.socket)
        sock.close()
        # A live pid that is no engine (a reused pid): its socket file accepts nothing.
        reused = _record(folder, os.getpid(), "reused")
        Path(reused.socket).touch()
        # A socket left without a record, and a half-written record.
        orphan = _dead_pid()
        (folder / f"{orphan}.sock").touch()
        (folder / f"{_dead_pid()}.json").write_text('{"name": "half')

        assert list_engines() == []
        assert find_engine() is None and find_engine("dead") is None
        assert sorted(p.name for p in folder.iterdir()) == []

        result = CliRunner().invoke(app, ["attach"])
        assert result.exit_code == 3 and "no engine is running" in result.stderr
        result = CliRunner().invoke(app, ["ps"])
        assert result.exit_code == 0 and result.stdout == ""


def test_a_runtime_dir_others_can_open_is_refused(monkeypatch, tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    monkeypatch.setenv("MLORA_RUNTIME_DIR", str(loose))
    with pytest.raises(UserError, match="0755.*chmod 700"):
        runtime_dir()
    result = CliRunner().invoke(app, ["ps"])
    assert result.exit_code == 2 and "chmod 700" in result.stderr

    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    monkeypatch.setenv("MLORA_RUNTIME_DIR", str(link))
    with pytest.raises(UserError, match="not a folder"):
        runtime_dir()

    fresh = tmp_path / "fresh" / "rt"
    monkeypatch.setenv("MLORA_RUNTIME_DIR", str(fresh))
    assert runtime_dir() == fresh and stat.S_IMODE(fresh.stat().st_mode) == 0o700

    if os.getuid() == 0:   # only root can give a folder away to test the owner check
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 4242, 4242)
        monkeypatch.setenv("MLORA_RUNTIME_DIR", str(theirs))
        with pytest.raises(UserError, match="belongs to uid 4242"):
            runtime_dir()


# -- surviving the launcher ----------------------------------------------------------------------

def test_the_engine_survives_its_launcher_and_terminal(tmp_path, model, monkeypatch):
    with tempfile.TemporaryDirectory(prefix="mlv-", dir="/tmp") as runtime:
        monkeypatch.setenv("MLORA_RUNTIME_DIR", runtime)
        config = write_config(tmp_path, model, names=("solo",))
        # A "terminal session": a process in its own session starts an engine with the
        # launcher, prints its record and waits; then the session is hung up, as when the
        # terminal closes or SSH drops, and the launcher dies of it.
        code = ("import json, sys\n"
                "from mlora_tui.launcher import ensure_engine\n"
                "record = ensure_engine(sys.argv[1])\n"
                "print(json.dumps(record.to_json()), flush=True)\n"
                "sys.stdin.read()\n")
        launcher = subprocess.Popen([sys.executable, "-c", code, str(config)],
                                    env={**CHILD_ENV, "MLORA_RUNTIME_DIR": runtime},
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    start_new_session=True)
        try:
            record = json.loads(launcher.stdout.readline())
            os.killpg(launcher.pid, signal.SIGHUP)
            assert launcher.wait(60) == -signal.SIGHUP
        finally:
            if launcher.poll() is None:
                launcher.kill()
        assert os.getsid(record["pid"]) == record["pid"] != os.getsid(0)

        async def main():
            client = await EngineClient.connect(record["socket"])
            stream = client.events(replay=True)
            first = await next_event(stream, is_step("solo"))
            later = await next_event(stream, lambda e: is_step("solo")(e)
                                     and e["step"] >= first["step"] + 3)
            await client.close()
            return later

        assert run(main())["step"] >= 4
        # The engine is in the registry, and ensure_engine finds it rather than start another.
        from mlora_tui.launcher import ensure_engine
        assert ensure_engine(config).pid == record["pid"]

        # SIGTERM stops it gracefully: a checkpoint, then exit 0, said to every client.
        async def terminate():
            client = await EngineClient.connect(record["socket"])
            stream = await client.subscribe(replay=False)
            os.kill(record["pid"], signal.SIGTERM)
            events = [event async for event in stream]
            await client.close()
            return events

        events = run(terminate())
        assert any(e["type"] == "log" and "stopped by SIGTERM" in e["message"] for e in events)
        (checkpoint,) = [e for e in events if e["type"] == "checkpoint"]
        assert checkpoint["job"] == "solo"
        assert (Path(checkpoint["path"]) / "adapter_model.safetensors").is_file()
        assert events[-1]["type"] == "engine_exit" and events[-1]["code"] == 0
        assert list_engines() == []
        deadline = time.monotonic() + 30
        while not _exited(record["pid"]):
            assert time.monotonic() < deadline, "the engine process did not exit"
            time.sleep(0.05)


def _exited(pid: int) -> bool:
    """Gone, or a zombie (a container's init may never reap an orphan)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
