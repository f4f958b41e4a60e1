"""The engine process's listener thread: all socket I/O, for any number of clients.

It uses non-blocking sockets and a selector: it accepts clients, splits their bytes into
lines, answers ``hello`` and ``subscribe`` itself (they touch no engine state, so a client
can watch the model load), queues the other requests for the main thread
(``EngineServer.submit``), and writes replies and events out of per-client buffers. It also
samples resources (memory, CPU, device memory) every ``RESOURCE_INTERVAL_S`` seconds.

Clients never get a copy of the event history (``engine.server.history.EventLog``): each
subscriber has a cursor into it, and the listener copies lines into the client's buffer
only as fast as the client reads, so a late subscriber replays from seq 1 at its own pace
and a client that stops reading costs no memory beyond its buffer. A client that falls
behind the *live* events (those after it subscribed) by more than ``MAX_BACKLOG_BYTES``
beyond what its socket and buffer hold is dropped; training never waits for a client.

Robustness: a malformed line gets an error reply (see ``engine.core.protocol``); an
oversized line or a wrong protocol version closes that connection; nothing a client sends
reaches the engine unless it is a well-formed request. What a client can make the engine
hold is bounded: its unread input (a line of at most ``MAX_LINE_BYTES`` plus one read), its
unread replies (the listener takes no further line from a client while ``FILL_BYTES`` of
output wait for it or ``MAX_PENDING_REQUESTS`` of its requests wait for the main thread:
the client's own sends then block, not the engine), and connections: at most
``MAX_CLIENTS``, and one that sends no hello within ``HELLO_TIMEOUT_S`` is closed. Each
connection the engine closes is logged with the reason.
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
import socket
import threading
import time
from typing import TYPE_CHECKING

from engine.core import protocol as p
from engine.server.resources import RESOURCE_INTERVAL_S, ResourceSampler

if TYPE_CHECKING:
    from engine.server.process import EngineServer

log = logging.getLogger("mlora.engine")

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

