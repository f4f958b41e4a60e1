"""The engine process: one ``Engine`` behind a Unix socket, for any number of clients.

``mlora serve CONFIG`` runs ``serve``. Two threads share the work:

- The **main thread** loads the model and runs ``Engine.run(poll=...)``. ``poll``, called
  between steps, takes the requests the listener queued and applies them in arrival order
  (pause, resume, cancel, add_jobs, save, stop, status): only this thread touches the
  engine, so a command never lands in the middle of a step.
- The **listener thread** does all socket I/O with non-blocking sockets and a selector:
  it accepts clients, splits their bytes into lines, answers ``hello`` and ``subscribe``
  itself (they touch no engine state, so a client can watch the model load), queues the
  other requests for the main thread, and writes replies and events out of per-client
  buffers. It also samples resources (memory, CPU, device memory) every two seconds.

Events: every event (the engine's, the ``resource`` samples, the server's own ``log`` and
final ``engine_exit``) goes through ``EventLog.append``, which numbers it, keeps its encoded
line for replay and appends it to ``<output_dir>/metrics.jsonl``. Clients never get a copy
of the history: each subscriber has a cursor into it, and the listener copies lines into
the client's buffer only as fast as the client reads, so a late subscriber replays from
seq 1 at its own pace and a client that stops reading costs no memory beyond its buffer.
A client that falls behind the *live* events (those after it subscribed) by more than
``MAX_BACKLOG_BYTES`` beyond what its socket and buffer hold is dropped; training never
waits for a client.

Robustness: a malformed line gets an error reply (see ``engine.core.protocol``); an oversized
line or a wrong protocol version closes that connection; nothing a client sends reaches
the engine unless it is a well-formed request. What a client can make the engine hold is
bounded: its unread input (a line of at most ``MAX_LINE_BYTES`` plus one read), its
unread replies (the listener takes no further line from a client while ``FILL_BYTES`` of
output wait for it or ``MAX_PENDING_REQUESTS`` of its requests wait for the main thread:
the client's own sends then block, not the engine), and connections: at most
``MAX_CLIENTS``, and one that sends no hello within ``HELLO_TIMEOUT_S`` is closed. Each
connection the engine closes is logged with the reason. SIGTERM and the ``stop`` request stop
gracefully (checkpoints, then exit); a second SIGTERM/SIGINT aborts; SIGHUP is ignored,
so a closed terminal or a lost SSH connection never stops training.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import resource
import selectors
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
from engine.core.events import open_log
from engine.core.config import RunConfig, apply_model_overrides, load_config, parse_adapter_tables
from engine.core.errors import ConfigError, UserError
from engine.core.runtime import (EngineRecord, bind_socket, claim_name, registry_lock,
                            remove_record, socket_path, write_record)

log = logging.getLogger("mlora.engine")

RESOURCE_INTERVAL_S = 2.0
# A client may fall this far behind the live event stream before it is dropped. The
# environment variable exists so tests can reach the limit in a few steps.
MAX_BACKLOG_BYTES = int(os.environ.get("MLORA_CLIENT_BACKLOG_BYTES", 8 << 20))
FILL_BYTES = 64 << 10       # a client's buffer is topped up from the history to this size
RECV_BYTES = 64 << 10
FLUSH_TIMEOUT_S = 5.0       # at exit, how long clients get to read the last events
# Limits on what clients can make the engine hold (the environment variables are for tests).
MAX_CLIENTS = int(os.environ.get("MLORA_MAX_CLIENTS", 64))
HELLO_TIMEOUT_S = float(os.environ.get("MLORA_HELLO_TIMEOUT_S", 10.0))
MAX_PENDING_REQUESTS = 16   # a client's requests waiting for the main thread
# A refused client's input is read and dropped (up to this much, for at most
# FLUSH_TIMEOUT_S) until it closes: closing with its bytes unread would reset the
# connection, and a reset can destroy the error message before the client reads it.
LINGER_BYTES = 1 << 20

EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR, EXIT_ABORTED = 0, 1, 2, 130


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
    sys.stderr.flush()
    sys.stdout.flush()
    fd = os.open(record.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(devnull)


# -- events -----------------------------------------------------------------------------------

class EventLog:
    """Every event of this engine: numbered, kept encoded for replay, and logged to disk.

    Called from both threads (engine events from the main thread, resource samples from
    the listener), so one lock orders them: seq numbers, history and metrics.jsonl agree.
    """

    def __init__(self, metrics_path: Path):
        self.lock = threading.Lock()
        self.lines: list[bytes] = []       # lines[seq - 1] is the encoded event seq
        self.offsets: list[int] = [0]      # offsets[i]: bytes in lines[:i] (for backlogs)
        self._metrics = open_log(metrics_path)

    def append(self, payload: dict[str, Any]) -> int:
        with self.lock:
            seq = len(self.lines) + 1
            try:
                line = p.encode(p.event(seq, payload))
            except p.ProtocolError as e:
                payload = {"type": "log", "time": payload.get("time", time.time()),
                           "level": "warning", "message": f"a {payload.get('type')} event "
                                                          f"was too large to send: {e.message}"}
                line = p.encode(p.event(seq, payload))
            self.lines.append(line)
            self.offsets.append(self.offsets[-1] + len(line))
            if self._metrics is not None:
                self._metrics.write(json.dumps(payload, default=str) + "\n")
                self._metrics.flush()
            return seq

    def close(self) -> None:
        with self.lock:
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None


# -- the listener thread -------------------------------------------------------------------------

class _Client:
    """One connection, as the listener sees it."""

    def __init__(self, client_id: int, sock: socket.socket):
        self.id = client_id
        self.sock = sock
        self.name = "?"
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.hello = False
        self.subscribed = False
        self.cursor = 0          # next event (index into EventLog.lines) to copy out
        self.live_from = 0       # events before this index are replay, not backlog
        self.closing = False     # close once outbuf is written (and stop reading)
        self.closing_since: float | None = None
        self.events_mask = 0
        self.connected_at = time.monotonic()
        self.pending = 0         # its requests queued for the main thread, not yet answered
        self.shut = False        # refused: its last message written, our side shut down
        self.discarded = 0       # bytes read and thrown away since then


class Listener(threading.Thread):
    """All socket I/O of the engine process (see the module docstring)."""

    def __init__(self, server: "EngineServer", listen_sock: socket.socket):
        super().__init__(name="mlora-listener", daemon=True)
        self.server = server
        self.listen_sock = listen_sock
        self.selector = selectors.DefaultSelector()
        self.clients: dict[int, _Client] = {}
        self._next_id = 1
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # Replies from the main thread: (client id, encoded line).
        self.outgoing: queue.Queue[tuple[int, bytes]] = queue.Queue()
        self._finishing = threading.Event()
        self._resources = ResourceSampler()

    # Called from the main thread.

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass    # already awake (the pipe is full) or closing

    def send_from_main(self, client_id: int, message: dict) -> None:
        try:
            line = p.encode(message)
        except p.ProtocolError as e:
            # A reply too large for one line must not take the main thread down with it.
            log.error("reply to client #%d not sent: %s", client_id, e.message)
            line = p.encode(p.error(p.INTERNAL, f"the reply was too large to send: "
                                                f"{e.message}", message.get("id")))
        self.outgoing.put((client_id, line))
        self.wake()

    def finish(self, timeout: float) -> None:
        """Stop accepting, let every client read what it is owed, close, and end."""
        self._finishing.set()
        if self.ident is None:    # never started: nothing to flush
            self.listen_sock.close()
            return
        self.wake()
        self.join(timeout)

    # The thread.

    def run(self) -> None:
        self.selector.register(self.listen_sock, selectors.EVENT_READ, "listen")
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        next_sample = time.monotonic()
        deadline = None
        while True:
            try:
                if self._finishing.is_set() and deadline is None:
                    deadline = time.monotonic() + FLUSH_TIMEOUT_S
                    self._stop_accepting()
                if deadline is not None and (not self.clients or time.monotonic() > deadline):
                    break
                timeout = max(0.0, next_sample - time.monotonic())
                if deadline is not None:
                    timeout = min(timeout, 0.1)
                if any(not c.hello and not c.closing for c in self.clients.values()):
                    timeout = min(timeout, 0.25)   # to close silent connections in time
                for key, mask in self.selector.select(timeout):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        client = self.clients.get(key.data)
                        if client is not None:
                            self._service(client, mask)
                self._take_replies()
                self._close_silent_clients()
                self.server.announce_stop()
                if time.monotonic() >= next_sample and deadline is None:
                    next_sample = time.monotonic() + RESOURCE_INTERVAL_S
                    self.server.broadcast(self._resources.sample(self.server.engine))
                for client in list(self.clients.values()):
                    self._pump(client, finishing=deadline is not None)
            except Exception:   # a bug here must not leave the engine deaf
                log.exception("listener error (the engine goes on)")
                time.sleep(0.1)
        for client in list(self.clients.values()):
            self._drop(client, "the engine exited")
        self._stop_accepting()

    def _stop_accepting(self) -> None:
        if self.listen_sock.fileno() >= 0:
            self.selector.unregister(self.listen_sock)
            self.listen_sock.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listen_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:    # out of file descriptors, say: try again later
                log.warning("cannot accept a connection: %s", e)
                return
            sock.setblocking(False)
            client = _Client(self._next_id, sock)
            self._next_id += 1
            full = len(self.clients) >= MAX_CLIENTS
            self.clients[client.id] = client
            client.events_mask = selectors.EVENT_READ
            self.selector.register(sock, client.events_mask, client.id)
            if full:
                self._refuse(client, p.error(
                    p.TOO_MANY_CLIENTS, f"the engine already has {MAX_CLIENTS} connections; "
                                        f"close some (mlora attach, mlora-tui) and retry"))

    def _close_silent_clients(self) -> None:
        """Close connections that sent no hello within HELLO_TIMEOUT_S."""
        now = time.monotonic()
        for client in list(self.clients.values()):
            if not client.hello and not client.closing \
                    and now - client.connected_at > HELLO_TIMEOUT_S:
                self._refuse(client, p.error(
                    p.HELLO_TIMEOUT, f"no hello within {HELLO_TIMEOUT_S:g} s of connecting"))

    def _drop(self, client: _Client, why: str) -> None:
        if self.clients.pop(client.id, None) is None:
            return
        if client.hello:
            log.info("client %s (#%d) disconnected: %s", client.name, client.id, why)
        if client.events_mask:
            self.selector.unregister(client.sock)
        client.sock.close()

    def _service(self, client: _Client, mask: int) -> None:
        if mask & selectors.EVENT_READ and client.shut:
            self._linger(client)
            return
        if mask & selectors.EVENT_READ and not client.closing:
            try:
                data = client.sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as e:
                self._drop(client, str(e))
                return
            if data == b"":
                self._drop(client, "closed by the client")
                return
            if data:
                client.inbuf += data
                self._take_lines(client)
        if mask & selectors.EVENT_WRITE:
            self._write(client)

    def _linger(self, client: _Client) -> None:
        """Read and drop what a refused client still sends, until it closes."""
        try:
            data = client.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(client, str(e))
            return
        client.discarded += len(data)
        if not data:
            self._drop(client, "closed by the client")
        elif client.discarded > LINGER_BYTES:
            self._drop(client, "it kept sending after it was refused")

    def _stalled(self, client: _Client) -> bool:
        """Whether the client must read what it is owed before more of its lines are taken."""
        return len(client.outbuf) >= FILL_BYTES or client.pending >= MAX_PENDING_REQUESTS

    def _take_lines(self, client: _Client) -> None:
        while not client.closing and not self._stalled(client):
            end = client.inbuf.find(b"\n")
            if end < 0:
                if len(client.inbuf) > p.MAX_LINE_BYTES:
                    self._refuse(client, p.error(p.TOO_LONG, f"line longer than "
                                                             f"{p.MAX_LINE_BYTES} bytes"))
                return
            line = bytes(client.inbuf[:end])
            del client.inbuf[:end + 1]
            if len(line) > p.MAX_LINE_BYTES:
                self._refuse(client, p.error(p.TOO_LONG, f"line of {len(line)} bytes is "
                                                         f"longer than {p.MAX_LINE_BYTES}"))
                return
            if line.strip():
                self._handle(client, line)

    def _refuse(self, client: _Client, message: dict) -> None:
        """Send a last error and close the connection once it is written."""
        log.warning("closing the connection of client %s (#%d): %s", client.name, client.id,
                    message["message"])
        self._queue(client, message)
        client.closing = True
        client.closing_since = time.monotonic()
        client.inbuf.clear()

    def _queue(self, client: _Client, message: dict) -> None:
        client.outbuf += p.encode(message)

    def _handle(self, client: _Client, line: bytes) -> None:
        """One request line: answer it here, or hand it to the main thread."""
        try:
            request_id, type_, params = p.parse_request(p.decode(line))
        except p.ProtocolError as e:
            self._queue(client, p.error(e.code, e.message, e.request_id))
            return
        if type_ == "hello":
            if params["version"] != p.PROTOCOL_VERSION:
                self._refuse(client, p.error(
                    p.VERSION_MISMATCH, f"this engine speaks protocol version "
                                        f"{p.PROTOCOL_VERSION}, the client {params['version']}; "
                                        f"use the same mlora-tui version on both sides",
                    request_id))
                return
            client.hello = True
            client.name = params.get("client", "?")
            log.info("client %s (#%d) connected", client.name, client.id)
            self._queue(client, p.reply(request_id, {"engine": self.server.info()}))
        elif not client.hello:
            self._queue(client, p.error(p.NOT_HELLO, "send hello (with the protocol version) "
                                                     "before any other request", request_id))
        elif type_ == "subscribe":
            if client.subscribed:
                self._queue(client, p.error(p.USER_ERROR, "already subscribed", request_id))
                return
            with self.server.events.lock:
                last = len(self.server.events.lines)
            self._queue(client, p.reply(request_id, {"last_seq": last}))
            client.subscribed = True
            client.cursor = 0 if params.get("replay", True) else last
            client.live_from = last
        elif self.server.submit(client.id, request_id, type_, params):
            client.pending += 1
        else:
            if type_ == "status":
                self._queue(client, p.reply(request_id, self.server.status_without_engine()))
            else:
                self._queue(client, p.error(p.USER_ERROR, "the engine is shutting down",
                                            request_id))

    def _take_replies(self) -> None:
        while True:
            try:
                client_id, line = self.outgoing.get_nowait()
            except queue.Empty:
                return
            client = self.clients.get(client_id)
            if client is not None:
                client.outbuf += line
                client.pending = max(0, client.pending - 1)

    def _pump(self, client: _Client, finishing: bool) -> None:
        """Copy owed events into the buffer, drop a client too far behind, and write."""
        events = self.server.events
        if client.inbuf and not client.closing:
            self._take_lines(client)    # lines left while it was stalled
        # A connection being refused gets no more events; at exit everyone gets them all.
        wants_events = client.subscribed and (finishing or not client.closing)
        if wants_events:
            with events.lock:
                end = len(events.lines)
                # Live events not yet in the buffer: the socket and the buffer are full.
                backlog = events.offsets[end] - events.offsets[max(client.cursor,
                                                                   client.live_from)]
                overflow = backlog > MAX_BACKLOG_BYTES
                while not overflow and client.cursor < end and len(client.outbuf) < FILL_BYTES:
                    client.outbuf += events.lines[client.cursor]
                    client.cursor += 1
            if overflow:
                log.warning("client %s (#%d) dropped: it fell %d bytes behind the events",
                            client.name, client.id, backlog)
                self._drop(client, "too far behind")
                return
        if client.outbuf:
            self._write(client)
            if client.id not in self.clients:
                return
        behind = wants_events and client.cursor < len(events.lines)
        if finishing and not client.outbuf and not behind:
            client.closing = True
        refused = client.closing_since is not None and not finishing
        if client.closing and not client.outbuf and not behind:
            if not refused:
                self._drop(client, "closed by the engine")
                return
            if not client.shut:
                # The last message is out: end our side, wait for the client's end.
                try:
                    client.sock.shutdown(socket.SHUT_WR)
                except OSError as e:
                    self._drop(client, str(e))
                    return
                client.shut = True
        if refused and time.monotonic() - client.closing_since > FLUSH_TIMEOUT_S:
            self._drop(client, "refused, and it did not close in time")
            return
        # A client with a whole line waiting (stalled until it reads) is not read further.
        reading = client.shut or (not client.closing and b"\n" not in client.inbuf)
        mask = ((selectors.EVENT_READ if reading else 0)
                | (selectors.EVENT_WRITE if client.outbuf or behind else 0))
        if mask != client.events_mask:
            # Mask 0 (stalled until the main thread answers): out of the selector.
            if not mask:
                self.selector.unregister(client.sock)
            elif not client.events_mask:
                self.selector.register(client.sock, mask, client.id)
            else:
                self.selector.modify(client.sock, mask, client.id)
            client.events_mask = mask

    def _write(self, client: _Client) -> None:
        while client.outbuf:
            try:
                sent = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._drop(client, str(e))
                return
            del client.outbuf[:sent]


# -- resources ----------------------------------------------------------------------------------

class ResourceSampler:
    """This process's memory and CPU, and its device's memory, as a ``resource`` event."""

    def __init__(self) -> None:
        self._last = (time.monotonic(), self._cpu_seconds())
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    @staticmethod
    def _cpu_seconds() -> float:
        t = os.times()
        return t.user + t.system

    def _rss(self) -> int | None:
        try:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            # No /proc (macOS): the peak resident size, in bytes there.
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return peak if sys.platform == "darwin" else peak * 1024

    def sample(self, engine) -> dict:
        now, cpu = time.monotonic(), self._cpu_seconds()
        last_time, last_cpu = self._last
        self._last = (now, cpu)
        elapsed = now - last_time
        event = {"type": "resource", "time": time.time(), "rss_bytes": self._rss(),
                 "cpu_percent": round(100.0 * (cpu - last_cpu) / elapsed, 1) if elapsed > 0
                 else None,
                 "device": None, "device_memory_bytes": None,
                 "device_memory_total_bytes": None, "device_utilization": None}
        device = getattr(engine, "device", None)
        if device is not None:
            event["device"] = str(device)
            event.update(_device_memory(device))
        return event


def _device_memory(device) -> dict:
    """What torch can tell of the device; each field on its own, None when unknown."""
    import torch

    out: dict[str, Any] = {}
    try:
        if device.type == "cuda":
            out["device_memory_bytes"] = torch.cuda.memory_reserved(device)
            out["device_memory_total_bytes"] = torch.cuda.get_device_properties(
                device).total_memory
            try:
                out["device_utilization"] = torch.cuda.utilization(device)
            except Exception:   # needs pynvml; many machines lack it
                pass
        elif device.type == "mps":
            out["device_memory_bytes"] = torch.mps.current_allocated_memory()
            out["device_memory_total_bytes"] = torch.mps.recommended_max_memory()
    except Exception:
        log.debug("device memory unavailable", exc_info=True)
    return out


# -- the main thread ----------------------------------------------------------------------------

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
        self.events = EventLog(Path(run_config.train.output_dir) / "metrics.jsonl")
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
        self.events.append(event)
        self.listener.wake()
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
            from engine.train.engine import FAILED, Engine

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
            code, reason = EXIT_ABORTED, "aborted by a second signal"
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
                        "reason": reason})
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
