"""Real engines on a tiny llama for the TUI tests: config files, start, watch, stop.

Engines run as the user would run them (``mlora_tui.launcher.ensure_engine``: their own
process session, a private runtime folder) with ``OMP_NUM_THREADS=1``, so a step takes a
few milliseconds. Jobs get thousands of steps so that they are still running while a test
presses keys; every test stops its engine at the end (``stop_engine``), by request, and
kills it only if it does not go.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Callable

from engine.core.runtime import EngineRecord, pid_alive
from mlora_tui.client import EngineClient, EngineUnavailable


def private_runtime_dir() -> str:
    """A short path (Unix socket paths hold about 107 bytes) that only we can open."""
    return tempfile.mkdtemp(prefix="mlora-rt-")


def engine_env(runtime_dir: str) -> dict[str, str]:
    return {"MLORA_RUNTIME_DIR": runtime_dir, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "MLORA_BACKEND_TYPE": "CPU"}


def adapter_table(name: str, data: Path, **overrides) -> str:
    settings = dict(name=name, data=str(data), prompt="none", r=4, lora_alpha=8,
                    batch_size=12, micro_batch_size=2, num_epochs=3000, lr=1e-2,
                    target_modules=["q_proj", "v_proj"])
    settings.update(overrides)
    return "[[adapter]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())


def write_run(folder: Path, model_dir: Path, adapters: dict[str, dict]) -> Path:
    """A config with one ``[[adapter]]`` per entry of ``adapters`` (name -> overrides), its
    data file, and an absolute output_dir inside ``folder``; returns the config's path."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "copy.jsonl"
    rows = [{"instruction": "Copy.", "input": "cat dog " * (1 + i % 4),
             "output": "CAT DOG " * (1 + i % 3)} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = folder / "run.toml"
    config.write_text(
        f'[model]\nbase_model = "{model_dir}"\ndtype = "fp32"\n\n'
        f'[train]\noutput_dir = "{folder / "out"}"\ncutoff_len = 64\nsave_step = 100000\n\n'
        + "\n".join(adapter_table(name, data, **kw) for name, kw in adapters.items()))
    return config


async def status(record: EngineRecord) -> dict:
    client = await EngineClient.connect(record.socket, client="test")
    try:
        return await client.status()
    finally:
        await client.close()


def job_summary(record: EngineRecord, name: str) -> dict:
    """The engine's own view of a job, from a separate client."""
    jobs = asyncio.run(status(record))["jobs"]
    return next(job for job in jobs if job["name"] == name)


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.1):
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


async def until(pilot, predicate: Callable[[], object], timeout: float, what: str):
    """``wait_for`` inside a Pilot test: the app runs while we wait."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await pilot.pause(0.05)


async def until_job(pilot, record: EngineRecord, name: str, state: str, timeout: float = 20):
    """Wait until the engine itself (asked by another client) reports ``name`` in ``state``."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = (await status(record))["jobs"]
        job = next(job for job in jobs if job["name"] == name)
        if job["state"] == state:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: job {name} is {job['state']}, not {state}")
        await pilot.pause(0.1)


def stop_engine(record: EngineRecord, timeout: float = 30) -> None:
    """Stop the engine gracefully; SIGKILL it if it has not exited after ``timeout`` s."""
    async def ask() -> None:
        client = await EngineClient.connect(record.socket, client="test")
        try:
            await client.stop()
        finally:
            await client.close()
    try:
        asyncio.run(ask())
    except EngineUnavailable:
        pass
    deadline = time.monotonic() + timeout
    while pid_alive(record.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(record.pid):
        os.kill(record.pid, signal.SIGKILL)
