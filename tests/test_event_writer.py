"""The one event writer (``engine.core.events``): a deleted output folder and a full disk.

First the writer alone, on real files; then through a real engine process (`mlora serve`
on a tiny Llama), where the reference is the event stream every client gets: from the
writer's warning on, ``metrics.jsonl`` must hold exactly the events the stream held.

A full disk is the kernel's own: ``metrics.jsonl`` is a symlink to ``/dev/full``, where
every write fails with ENOSPC in ``os.write``, the call the writer makes. Polls have
deadlines; no fixed sleeps.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from engine.core.events import EventWriter
from engine.core.outputs import read_run_record
from mlora_tui.client import EngineClient
from mlora_tui.progress import RunSummary
from test_protocol import runtime, start_engine, stop_engine  # noqa: F401 (a fixture)
from test_server import ADAPTER, write_config
from tiny_models import tiny_model_dir

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"),
                                    reason="no /dev/full to fill the disk with")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _event(n: int) -> dict:
    return {"type": "step", "time": 1000.0 + n, "job": "a", "step": n}


def _fill_disk(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to("/dev/full")


def _free_disk(path: Path) -> None:
    """Replace the /dev/full symlink by an empty file, at once (as a disk freed)."""
    spare = path.with_suffix(".new")
    spare.write_text("")
    os.replace(spare, path)


# -- the writer alone -------------------------------------------------------------------------

def test_a_log_cut_short_by_a_crash_goes_on_on_a_new_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_event(1)) + '\n{"type": "st')
    writer = EventWriter(path)
    assert writer.write(_event(2)) == []
    writer.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == _event(1) and json.loads(lines[2]) == _event(2)
    assert writer.losses() == []


def test_a_deleted_folder_is_made_again_with_a_warning_first(tmp_path):
    out = tmp_path / "run"
    restored = []

    def restore():
        restored.append("run.json")
        (out / "run.json").write_text("{}")
        return ["run.json made again"]
    writer = EventWriter(out / "metrics.jsonl", restore=restore)
    writer.write(_event(1))
    shutil.rmtree(out)
    (notice,) = writer.write(_event(2))
    writer.write(_event(3))
    assert notice["level"] == "warning" and "disappeared" in notice["message"]
    assert notice["message"].endswith("the events before are lost; run.json made again")
    assert _lines(out / "metrics.jsonl") == [notice, _event(2), _event(3)]
    assert restored == ["run.json"] and (out / "run.json").is_file()
    (lost,) = writer.losses()
    assert lost.startswith("the events before ") and "disappeared" in lost


def test_a_log_moved_away_and_replaced_is_told_too(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = EventWriter(path)
    writer.write(_event(1))
    path.rename(tmp_path / "old.jsonl")
    path.write_text("")
    (notice,) = writer.write(_event(2))
    assert "disappeared (deleted, moved or replaced" in notice["message"]
    assert _lines(path) == [notice, _event(2)]
    assert _lines(tmp_path / "old.jsonl") == [_event(1)]


@needs_dev_full
def test_a_full_disk_is_told_once_and_writing_resumes_when_there_is_room(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _fill_disk(path)
    writer = EventWriter(path, retry_s=0)     # every write tries again
    (error,) = writer.write(_event(1))
    assert error["level"] == "error" and "No space left on device" in error["message"]
    assert all(writer.write(_event(n)) == [] for n in range(2, 6))
    assert writer.losses() == [writer.losses()[0]] and " on (not written" in writer.losses()[0]
    _free_disk(path)
    (resumed,) = writer.write(_event(6))
    assert resumed["level"] == "warning"
    assert "can be written again; 5 event(s) from" in resumed["message"]
    writer.write(_event(7))
    assert _lines(path) == [resumed, _event(6), _event(7)]
    (lost,) = writer.losses()
    assert lost.startswith("5 event(s) from ") and "No space left on device" in lost


@needs_dev_full
def test_a_log_that_cannot_be_written_stays_off_until_the_retry(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _fill_disk(path)
    writer = EventWriter(path, retry_s=3600)
    assert len(writer.write(_event(1))) == 1
    _free_disk(path)
    assert [writer.write(_event(n)) for n in range(2, 5)] == [[], [], []]
    assert path.read_text() == ""


# -- through a real engine process -----------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir("llama", tmp_path_factory)


def _drive(record: dict, script) -> list[dict]:
    """Run ``script(client, stream)`` while recording every event, then the rest of the
    stream until the engine exits; every event the client got, in order."""
    async def main():
        client = await EngineClient.connect(record["socket"], client="test")
        seen: list[dict] = []

        async def upto(predicate):
            async for event in stream:
                seen.append(event)
                if predicate(event):
                    return event
            raise AssertionError("the engine closed the connection")
        stream = client.events(replay=True)
        await script(client, upto)
        async for event in stream:
            seen.append(event)
        await client.close()
        return seen
    return asyncio.run(asyncio.wait_for(main(), 300))


def _from(events: list[dict], first: dict) -> list[dict]:
    """The payloads of ``events`` from ``first`` on, as metrics.jsonl holds them."""
    index = next(i for i, e in enumerate(events) if e["seq"] == first["seq"])
    return [{k: v for k, v in e.items() if k != "seq"} for e in events[index:]]


def _summary(events: list[dict]) -> str:
    summary = RunSummary()
    for event in events:
        summary.handle(event)
    console = Console(file=io.StringIO(), width=400)
    summary.render(console)
    return console.file.getvalue()


def _is(kind: str, **fields):
    return lambda e: e["type"] == kind and all(e.get(k) == v for k, v in fields.items())


def _log_with(text: str):
    return lambda e: e["type"] == "log" and text in e["message"]


def test_the_engine_process_makes_a_deleted_output_folder_again(tmp_path, runtime, model):
    config = write_config(tmp_path / "deleted", model, epochs={"long": 2000})
    out = config.parent / "out"
    proc, record = start_engine(config, runtime)
    try:
        async def script(client, upto):
            await upto(_is("step", job="long", step=2))
            # Moved away first: an rmtree racing the engine's next event could fail.
            os.rename(out, config.parent / "gone")
            shutil.rmtree(config.parent / "gone")
            # A job added now saves its adapter into the folder made again.
            await client.add_jobs(ADAPTER.format(name="short", epochs=1))
            await upto(_is("adapter_saved", job="short"))
            await upto(_is("step", job="long"))
            await client.stop()
        events = _drive(record, script)
        proc.wait(120)
    finally:
        stop_engine(proc, record)
    assert proc.returncode == 0
    (warning,) = [e for e in events if _log_with("disappeared")(e)]
    assert warning["level"] == "warning"
    assert "engine.log made again" in warning["message"]
    assert "run.json made again" in warning["message"]
    # Every event from the warning on is in the new log, exactly as clients got it.
    assert _lines(out / "metrics.jsonl") == _from(events, warning)
    assert (out / "short" / "adapter_model.safetensors").is_file()
    assert read_run_record(out) is not None
    engine_log = (out / "engine.log").read_text()
    assert "disappeared" in engine_log and "exited with code 0" in engine_log
    assert "disappeared" in events[-1]["metrics_lost"][0]
    told = _summary(events)
    assert "Every event is in" not in told and "except the events before" in told


@needs_dev_full
def test_the_engine_process_trains_on_through_a_full_disk(tmp_path, runtime, model):
    config = write_config(tmp_path / "full", model, epochs={"short": 1, "long": 2000})
    out = config.parent / "out"
    _fill_disk(out / "metrics.jsonl")
    proc, record = start_engine(config, runtime, {"MLORA_EVENTS_RETRY_S": "0.2"})
    try:
        async def script(client, upto):
            await upto(_is("adapter_saved", job="short"))
            await upto(_is("step", job="long"))
            _free_disk(out / "metrics.jsonl")
            await upto(_log_with("can be written again"))
            await upto(_is("step", job="long"))
            await client.cancel("long")     # the last job ends: the engine exits
        events = _drive(record, script)
        proc.wait(120)
    finally:
        stop_engine(proc, record)
    assert proc.returncode == 0
    (error,) = [e for e in events if _log_with("cannot write")(e)]
    assert error["level"] == "error" and "No space left on device" in error["message"]
    assert (out / "short" / "adapter_model.safetensors").is_file()
    assert any(_is("job_state", job="short", state="done")(e) for e in events)
    (resumed,) = [e for e in events if _log_with("can be written again")(e)]
    assert _lines(out / "metrics.jsonl") == _from(events, resumed)
    assert (out / "engine.log").read_text().count("cannot write") == 1
    (lost,) = events[-1]["metrics_lost"]
    assert "event(s) from" in lost and "No space left on device" in lost
    told = _summary(events)
    assert "Every event is in" not in told and "not written: No space left" in told
