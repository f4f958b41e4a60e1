"""Start an engine process, or find the one already running. Imports no torch.

``ensure_engine(config)`` is what `mlora run` and `mlora-tui CONFIG` call: it checks the
config here first (``engine.core.preflight``, unless the caller did: so a typo is
reported before any process starts), returns the live
engine serving the config's output_dir if there is one, and otherwise starts
``python -m mlora_tui.cli serve CONFIG`` in its own session (closing the terminal or
losing SSH does not reach it), with stdin from /dev/null and its output appended to
``<output_dir>/engine.log``, and waits until its socket answers ``hello``.
``attach_target(name)`` picks the engine `mlora attach` and `mlora-tui --attach` talk to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from engine.core.errors import UserError
from engine.core.outputs import check_output_dir
from engine.core.preflight import Preflight, preflight
from engine.core.runtime import EngineNotFound, EngineRecord, describe, find_engine, list_engines
from mlora_tui.client import EngineUnavailable, RequestFailed, hello_sync

__all__ = ["ensure_engine", "attach_target", "EngineNotFound", "log_tail"]


def ensure_engine(config_path: str | os.PathLike, *, log_to: str | os.PathLike | None = None,
                  timeout: float = 120.0, max_steps: int | None = None,
                  model_overrides: dict | None = None, resume: bool = False,
                  checked: Preflight | None = None) -> EngineRecord:
    """The live engine for this config's output_dir, started when there is none.

    ``log_to`` replaces ``<output_dir>/engine.log`` as the engine's log; ``max_steps`` and
    ``model_overrides`` (``[model]`` fields) and ``resume`` (continue from the newest
    checkpoint) apply only to an engine started here. ``checked``: the caller's
    ``preflight`` of the same config and options, so nothing is read twice. Raises
    UserError for a bad config or data file or an output folder holding another run
    (nothing started), or when the engine exits before it answers (with the end of its log).
    """
    if checked is None:
        checked = preflight(config_path, model_overrides=model_overrides, resume=resume)
    output_dir = checked.output_dir
    running = find_engine(output_dir=output_dir)
    if running is not None:
        return running
    if not checked.output_checked:
        # The engine that served the folder when it was checked has exited since: the
        # folder is now its finished run, which a new engine must not append to.
        check_output_dir(checked.config, resume=resume, overwrite=False)

    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(os.path.abspath(log_to or output_dir / "engine.log"))
    command = [sys.executable, "-m", "mlora_tui.cli", "serve", os.path.abspath(config_path),
               "--log", str(log_path)]
    if max_steps is not None:
        command += ["--max-steps", str(max_steps)]
    if model_overrides:
        command += ["--model-overrides", json.dumps(model_overrides)]
    if resume:
        command.append("--resume")
    with open(log_path, "ab") as log_file:
        start = log_file.tell()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   close_fds=True)
    # Reap it when it exits, so a long-lived launcher (the TUI) leaves no zombie whose
    # pid still looks alive.
    threading.Thread(target=process.wait, name="mlora-engine-reaper", daemon=True).start()

    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if process.poll() is not None:
            # Another launcher may have won the race for this output_dir: use its engine.
            running = find_engine(output_dir=output_dir)
            if running is not None:
                return running
            raise UserError(f"the engine exited with code {process.returncode} before it "
                            f"was ready; the end of {log_path}:\n"
                            f"{log_tail(log_path, start=start)}")
        record = find_engine(output_dir=output_dir)
        if record is not None and record.pid == process.pid:
            try:
                hello_sync(record.socket, client="launcher")
                return record
            except (EngineUnavailable, RequestFailed):
                pass
        if time.monotonic() > deadline:
            raise UserError(f"the engine (pid {process.pid}) did not answer within "
                            f"{timeout:g} s; it may still be starting: see {log_path}")
        time.sleep(delay)
        delay = min(0.5, delay * 1.5)


def attach_target(name: str | None = None) -> EngineRecord:
    """The engine called ``name`` (or with that pid), or the only one when ``name`` is None.

    Raises EngineNotFound (a UserError) naming the running engines when there is no
    such engine, none at all, or several and no name.
    """
    engines = list_engines()
    if name is not None:
        for engine in engines:
            if name in (engine.name, str(engine.pid)):
                return engine
        raise EngineNotFound(f"no engine named {name!r} is running (running: "
                             f"{describe(engines)})")
    if not engines:
        raise EngineNotFound("no engine is running; start one with  mlora run CONFIG  "
                             "(or mlora run CONFIG --detach)")
    if len(engines) > 1:
        raise EngineNotFound(f"{len(engines)} engines are running, name one: "
                             f"{describe(engines)}")
    return engines[0]


def log_tail(path: str | os.PathLike, lines: int = 20, start: int = 0) -> str:
    """The last ``lines`` lines of a log file from byte ``start`` on."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            tail = deque(f, maxlen=lines)
    except OSError as e:
        return f"(cannot read it: {e.strerror or e})"
    return "".join(line.decode("utf-8", "replace") for line in tail).rstrip() or "(empty)"
