"""The engine process: one ``Engine`` behind a Unix socket, for any number of clients.

``mlora serve CONFIG`` runs ``serve``. Two threads share the work:

- The **main thread** (``EngineServer``) loads the model and runs
  ``Engine.run(poll=...)``. ``poll``, called between steps, takes the requests the
  listener queued and applies them in arrival order (pause, resume, cancel, evaluate,
  add_jobs, fork, save, stop, status): only this thread touches the engine, so a command never lands in the
  middle of a step.
- The **listener thread** (``engine.server.listener``) does all socket I/O, answers
  ``hello`` and ``subscribe`` itself, queues the other requests for the main thread, and
  samples resources (``engine.server.resources``).

Events: every event (the engine's, the ``resource`` samples, the server's own ``log`` and
final ``engine_exit``) goes through ``EventLog.append`` (``engine.server.history``), which
numbers it, keeps its encoded line for replay and hands it to the run's one event writer
(``engine.core.events``). When the output folder is deleted mid-run, the writer makes
``metrics.jsonl`` again and this process makes ``engine.log`` (its stdout and stderr) and
``run.json`` again; ``engine_exit`` says what ``metrics.jsonl`` lacks (``metrics_lost``).

SIGTERM and the ``stop`` request stop gracefully (checkpoints, then exit); a second
SIGTERM/SIGINT aborts; SIGHUP is ignored, so a closed terminal or a lost SSH connection
never stops training.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from engine import __version__
from engine.core import protocol as p
from engine.core.config import RunConfig, apply_model_overrides, load_config, parse_adapter_tables
from engine.core.errors import ConfigError, UserError
from engine.core.events import restore_file
from engine.core.jobs import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USER_ERROR,
                              FAILED)
from engine.core.outputs import write_run_record
from engine.core.runtime import (EngineRecord, bind_socket, claim_name, registry_lock,
                                 remove_record, socket_path, write_record)
from engine.server.history import EventLog
from engine.server.listener import FLUSH_TIMEOUT_S, Listener

log = logging.getLogger("mlora.engine")


def serve(config_path: str | os.PathLike, *, max_steps: int | None = None,
          log_path: str | os.PathLike | None = None,
          model_overrides: dict[str, Any] | None = None, resume: bool = False) -> int:
    """Run the engine process for ``config_path`` until its jobs end or it is stopped.

    ``model_overrides`` replace ``[model]`` fields of the file (m-LoRA's command-line flags);
    ``resume`` continues every job from the newest checkpoint in the output folder.

    Returns the exit code: 0 the run ended (every job finished, ``max_steps``, or a stop);
    1 a job failed or the engine crashed; 2 a config, data or model error, or another
    engine already serves this output_dir; 130 aborted by a second signal.
    """
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        run_config = load_config(config_path)
        if model_overrides:
            apply_model_overrides(run_config, model_overrides)
        output_dir = Path(os.path.abspath(run_config.train.output_dir))
        # The engine may outlive the caller's working directory: every path is absolute.
        run_config.train.output_dir = str(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        log_file = Path(os.path.abspath(log_path or output_dir / "engine.log"))
        with registry_lock():
            name = claim_name(output_dir)
            path = socket_path()
            listener = bind_socket(path)
            record = EngineRecord(
                name=name, pid=os.getpid(), socket=str(path),
                config=os.path.abspath(config_path), output_dir=str(output_dir),
                base_model=run_config.model.base_model, started=time.time(),
                log=str(log_file))
            write_record(record)
    except UserError as e:
        log.error("%s", e)
        return EXIT_USER_ERROR
    except OSError as e:
        log.error("cannot start the engine: %s", e)
        return EXIT_USER_ERROR
    try:
        _detach_from_terminal(record)
        server = EngineServer(run_config, record, listener, max_steps=max_steps,
                              resume=resume)
    except BaseException:
        remove_record(record.pid)
        listener.close()
        Path(record.socket).unlink(missing_ok=True)
        raise
    return server.run()


def _detach_from_terminal(record: EngineRecord) -> None:
    """Log to the record's log file, not to a terminal that may close; ignore SIGHUP."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if os.getsid(0) != os.getpid():
        try:
            os.setsid()   # its own session: the terminal's Ctrl-C and hangup stay away
        except PermissionError:
            pass          # a process group leader (a shell job): SIG_IGN covers hangup
    log_stat = None
    if os.path.exists(record.log):
        log_stat = os.stat(record.log)
    err_stat = os.fstat(2)
    if log_stat and (err_stat.st_dev, err_stat.st_ino) == (log_stat.st_dev, log_stat.st_ino):
        return    # started by the launcher: stdout and stderr already go to the log
    sys.stderr.write(f"engine {record.name} (pid {record.pid}) serving {record.config}\n"
                     f"  socket {record.socket}\n  log    {record.log}\n"
                     f"  watch  mlora attach {record.name}   stop  mlora stop {record.name}\n")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    _point_stdio_at(record.log)


def _point_stdio_at(log_path: str) -> None:
    """Send stdout and stderr (Python's logging writes to stderr) to ``log_path``."""
    sys.stderr.flush()
    sys.stdout.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class EngineServer:
    """The engine and its listener; ``run`` is the main thread's whole life."""

    def __init__(self, run_config: RunConfig, record: EngineRecord,
                 listen_sock: socket.socket, max_steps: int | None = None,
                 resume: bool = False):
        self.run_config = run_config
        self.record = record
        self.max_steps = max_steps
        self.resume = resume
        self.engine = None
        self.state = "loading"            # loading -> running -> stopping
        self.stop_reason: str | None = None
        self.events = EventLog(Path(run_config.train.output_dir) / "metrics.jsonl",
                               restore=self._restore_files)
        self.requests: queue.Queue[tuple[int, int, str, dict]] = queue.Queue()
        self._requests_lock = threading.Lock()
        self.listener = Listener(self, listen_sock)
        self._signals = 0
        self._unannounced: str | None = None     # a stop reason not yet said in a log event
        self._announce_lock = threading.Lock()
        self._final_status: dict | None = None

    # -- shared with the listener ------------------------------------------------------------

    def info(self) -> dict:
        return {**self.record.to_json(), "protocol": p.PROTOCOL_VERSION,
                "version": __version__, "state": self.state}

    def status_without_engine(self) -> dict:
        """``status`` while the model loads (no jobs yet) or after the run (the last one)."""
        if self._final_status is not None:
            return {**self._final_status, "engine": self.info()}
        return {"engine": self.info(), "model": None,
                "output_dir": self.run_config.train.output_dir, "jobs": []}

    def submit(self, client_id: int, request_id: int, type_: str, params: dict) -> bool:
        """Queue a request for the main thread; False while loading (status only) or after
        the run, when no one would apply it."""
        with self._requests_lock:
            if self.state == "stopping" or (type_ == "status" and self.state == "loading"):
                return False
            self.requests.put((client_id, request_id, type_, params))
            return True

    def broadcast(self, event: dict) -> None:
        logged = self.events.append(event)
        self.listener.wake()
        for each in logged:
            self._log_event(each)

    @staticmethod
    def _log_event(event: dict) -> None:
        """The events a person reads in engine.log, as lines of it."""
        kind = event.get("type")
        if kind == "log":
            level = {"warning": logging.WARNING, "error": logging.ERROR}.get(
                event.get("level"), logging.INFO)
            log.log(level, "%s", event.get("message"))
        elif kind == "job_state":
            reason = f" ({event['reason']})" if event.get("reason") else ""
            log.info("job %s: %s at step %s%s", event.get("job"), event.get("state"),
                     event.get("step"), reason)
        elif kind in ("checkpoint", "adapter_saved"):
            log.info("job %s: %s %s", event.get("job"), kind.replace("_", " "),
                     event.get("path"))

    def say(self, message: str, level: str = "info") -> None:
        self.broadcast({"type": "log", "time": time.time(), "level": level,
                        "message": message})

    def _restore_files(self) -> list[str]:
        """The event writer's hook when the output folder has gone: this process's log
        and the run record come back with ``metrics.jsonl``."""
        made = []
        if not os.path.exists(self.record.log):
            made.append(restore_file("engine.log", lambda: _point_stdio_at(self.record.log)))
        if self.engine is not None:     # until then, Engine() has not written run.json
            made.append(restore_file("run.json", lambda: write_run_record(
                self.run_config.train.output_dir, self.run_config)))
        return made

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        code, reason = EXIT_OK, "the run ended"
        try:
            # Said before the listener runs, so that it is event 1 for every client.
            self.say(f"engine {self.record.name} (pid {self.record.pid}) listening on "
                     f"{self.record.socket}; loading {self.run_config.model.base_model}")
            self.listener.start()
            # torch takes seconds to import: clients can connect and watch meanwhile.
            from engine.train.engine import Engine

            self.engine = Engine(self.run_config, on_event=self.broadcast, write_metrics=False,
                                 resume=self.resume)
            self.state = "running"
            if self.stop_reason:
                self.engine.request_stop()
            # What clients asked while the model loaded applies before the first step (a
            # stop among it then costs no step).
            self._poll(False)
            self.engine.run(max_steps=self.max_steps, poll=self._poll)
            self.announce_stop()
            failed = [j.name for j in self.engine.jobs.values() if j.state == FAILED]
            if failed:
                code, reason = EXIT_FAILED, "failed: " + ", ".join(failed)
            elif self.stop_reason:
                reason = self.stop_reason
            elif self.max_steps is not None and any(
                    not j.finished for j in self.engine.jobs.values()):
                reason = f"max_steps ({self.max_steps}) reached"
            else:
                reason = "every job finished"
        except UserError as e:
            code, reason = EXIT_USER_ERROR, str(e)
            self.say(str(e), level="error")
        except KeyboardInterrupt:
            code, reason = EXIT_INTERRUPTED, "aborted by a second signal"
            self.say("aborted; adapters and checkpoints written before now are intact",
                     level="error")
        except Exception as e:
            code, reason = EXIT_FAILED, f"engine error: {e!r}"
            log.error("engine error\n%s", traceback.format_exc())
            self.say(f"engine error: {e!r} (traceback in {self.record.log})", level="error")
        finally:
            self._shutdown(code, reason)
        return code

    def _on_signal(self, signum: int, frame) -> None:
        # Runs between two bytecodes of the main thread, perhaps while it holds the event
        # lock: set flags only, and wake the listener, which says so.
        self._signals += 1
        if self._signals > 1:
            raise KeyboardInterrupt
        self.stop_reason = f"stopped by {signal.Signals(signum).name}"
        self._unannounced = self.stop_reason
        if self.engine is not None:
            self.engine.request_stop()
        self.listener.wake()

    def announce_stop(self) -> None:
        """Say why the engine is stopping, once (from either thread, never a signal handler)."""
        with self._announce_lock:
            reason, self._unannounced = self._unannounced, None
        if reason:
            self.say(f"{reason}: stopping after the current step, with checkpoints")

    def _poll(self, wait: bool) -> None:
        """Engine.run's hook between steps: apply every queued request, in order."""
        self.announce_stop()
        try:
            item = self.requests.get(timeout=0.5) if wait else self.requests.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*item)
            try:
                item = self.requests.get_nowait()
            except queue.Empty:
                return

    def _apply(self, client_id: int, request_id: int, type_: str, params: dict) -> None:
        try:
            if type_ == "generate":     # its stream messages name the request
                params = {**params, "_request_id": request_id}
            result = getattr(self, f"_do_{type_}")(client_id, **params)
            message = p.reply(request_id, result)
        except UserError as e:
            message = p.error(p.USER_ERROR, str(e), request_id)
        except Exception as e:
            log.error("request %s failed\n%s", type_, traceback.format_exc())
            message = p.error(p.INTERNAL, f"{type_} failed: {e!r}", request_id)
        self.listener.send_from_main(client_id, message)

    # One method per engine request (engine.core.protocol.REQUESTS): the main thread runs them.

    def _do_status(self, client_id: int) -> dict:
        return {"engine": self.info(), **self.engine.status()}

    def _do_pause(self, client_id: int, job: str) -> dict:
        self.engine.pause(job)
        return {"job": job, "state": self.engine.jobs[job].state}

    def _do_resume(self, client_id: int, job: str) -> dict:
        self.engine.resume(job)
        return {"job": job, "state": self.engine.jobs[job].state}

    def _do_cancel(self, client_id: int, job: str) -> dict:
        self.engine.cancel(job)
        return {"job": job, "state": self.engine.jobs[job].state}

    def _do_fork(self, client_id: int, job: str, **params) -> dict:
        new = self.engine.fork(job, params["as"], params.get("set"))   # "as": a keyword
        return {"job": new.name, "from": job, "step": new.step}

    def _do_evaluate(self, client_id: int, job: str) -> dict:
        return self.engine.request_evaluation(job)

    def _do_generate(self, client_id: int, **params) -> dict:
        request_id = params.pop("_request_id")
        return self.engine.playground.start(client_id, request_id,
                                            self.listener.send_from_main, **params)

    def _do_save(self, client_id: int, job: str | None = None) -> dict:
        return {"paths": [str(path) for path in self.engine.save_now(job)]}

    def _do_stop(self, client_id: int) -> dict:
        self.stop_reason = self._unannounced = "stop requested by a client"
        self.engine.request_stop()
        self.announce_stop()
        return {}

    def _do_add_jobs(self, client_id: int, toml: str, source: str = "<client>") -> dict:
        adapters = parse_adapter_toml(toml, source, self.run_config,
                                      existing=list(self.engine.jobs))
        added = []
        for adapter in adapters:
            try:
                self.engine.add_job(adapter, from_config=False)
            except UserError as e:
                done = f" (added before it: {', '.join(added)})" if added else ""
                raise UserError(f"{e}{done}") from None
            added.append(adapter.name)
        return {"added": added}

    # -- the end ---------------------------------------------------------------------------

    def _shutdown(self, code: int, reason: str) -> None:
        """Answer what is left, unregister, tell every client, let them read, close."""
        # A signal now would cut the clean-up short; the run is over anyway.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.engine is not None:
            self._final_status = {"engine": self.info(), **self.engine.status()}
        with self._requests_lock:
            self.state = "stopping"
        while True:
            try:
                client_id, request_id, type_, _ = self.requests.get_nowait()
            except queue.Empty:
                break
            self.listener.send_from_main(client_id, p.error(
                p.USER_ERROR, f"the engine stopped before applying {type_}", request_id))
        # Unregister first: from now on no one mistakes this engine for a live one.
        remove_record(self.record.pid)
        self.broadcast({"type": "engine_exit", "time": time.time(), "code": code,
                        "reason": reason, "metrics_lost": self.events.writer.losses()})
        self.listener.finish(timeout=FLUSH_TIMEOUT_S + 2)
        try:
            os.unlink(self.record.socket)
        except FileNotFoundError:
            pass
        self.events.close()
        log.info("engine %s exited with code %d: %s", self.record.name, code, reason)


def parse_adapter_toml(text: str, source: str, run_config: RunConfig,
                       existing: list[str]) -> list:
    """``[[adapter]]`` tables sent by a client, validated as in a config file.

    Relative paths in them resolve against the folder of ``source`` when it is an absolute
    file path (``mlora jobs add FILE`` sends the file's), else against the folder of the
    engine's config.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}", file=source) from None
    for key in data:
        if key != "adapter":
            raise ConfigError(f"only [[adapter]] tables can be added to a running engine; "
                              f"[{key}] comes from the engine's config", file=source,
                              table=key)
    tables = data.get("adapter")
    if isinstance(tables, dict):
        raise ConfigError("expected [[adapter]] tables (double brackets), got a single "
                          "[adapter] table", file=source, table="adapter")
    if os.path.isabs(source):
        base_dir = Path(source).parent
    else:
        base_dir = Path(os.path.abspath(run_config.source)).parent
    adapters = parse_adapter_tables(tables or [], source, run_config.train, base_dir)
    taken = {name.lower(): name for name in existing}
    for adapter in adapters:
        if adapter.name.lower() in taken:
            raise ConfigError(f"an adapter named {taken[adapter.name.lower()]!r} is already "
                              f"in this engine; names must be unique (each is a folder under "
                              f"output_dir)", file=source, table=f'adapter "{adapter.name}"',
                              field="name")
    return adapters
