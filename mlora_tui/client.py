"""An asyncio client of the engine process (engine/server/process.py). Imports no torch.

    client = await EngineClient.connect(record.socket, client="mlora-tui")
    print(client.engine_info["name"])
    await client.pause("summarize")
    async for event in client.events():      # replay from seq 1, then live
        ...
    await client.close()

One background task reads the connection: replies and errors resolve the future of the
request with the same id, events go to a queue that ``events()`` drains. When the
connection closes, pending requests fail with ``EngineUnavailable`` and ``events()`` ends.
The CLI, which is synchronous, wraps calls in ``run_sync``; ``hello_sync`` is a blocking
one-shot check that an engine answers (the launcher uses it while an engine starts).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from engine.core import protocol as p

T = TypeVar("T")
_END = object()   # on the event queue: the connection closed


class EngineUnavailable(Exception):
    """The engine cannot be reached: no socket, connection refused, or connection lost."""


class RequestFailed(Exception):
    """The engine answered a request with an error (``code`` is one of protocol.ERROR_CODES)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class EngineClient:
    """One connection to an engine. Create it with ``await EngineClient.connect(path)``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._streams: dict[int, asyncio.Queue] = {}   # request id -> its stream messages
        self._events: asyncio.Queue | None = None
        self._closed_reason: str | None = None
        self._refusal: str | None = None   # an error tied to no request (why it closes)
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop())
        self.engine_info: dict = {}

    @classmethod
    async def connect(cls, socket_path: str | os.PathLike, client: str = "mlora",
                      timeout: float = 10.0) -> "EngineClient":
        """Connect and say hello; ``engine_info`` then holds the engine's record and state."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(os.fspath(socket_path),
                                             limit=p.MAX_LINE_BYTES + 1), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise EngineUnavailable(f"cannot connect to the engine at {socket_path}: "
                                    f"{getattr(e, 'strerror', None) or e or 'timed out'}") from None
        self = cls(reader, writer)
        try:
            result = await asyncio.wait_for(
                self.request("hello", version=p.PROTOCOL_VERSION, client=client), timeout)
        except BaseException:
            await self.close()
            raise
        self.engine_info = result.get("engine", {})
        return self

    # -- requests --------------------------------------------------------------------------

    async def request(self, type_: str, _stream: asyncio.Queue | None = None,
                      **params: Any) -> dict:
        """Send one request and wait for its reply's result; RequestFailed on an error.
        ``_stream`` receives the request's stream messages' data (and ``_END`` if the
        connection closes)."""
        if self._closed_reason is not None:
            raise EngineUnavailable(self._closed_reason)
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        if _stream is not None:
            self._streams[request_id] = _stream
        try:
            self._writer.write(p.encode(p.request(request_id, type_, **params)))
            await self._writer.drain()
        except (OSError, RuntimeError) as e:
            self._pending.pop(request_id, None)
            # The engine may have said why it closed (too many clients): read that first.
            try:
                await asyncio.wait_for(asyncio.shield(self._read_task), 2.0)
            except Exception:
                pass
            raise EngineUnavailable(self._closed_reason if self._refusal
                                    else f"the engine connection broke: {e}") from None
        try:
            return await future
        finally:
            self._pending.pop(request_id, None)

    async def status(self) -> dict:
        """{"engine": info, "model": {...} | None, "output_dir": ..., "jobs": [summary, ...]}"""
        return await self.request("status")

    async def pause(self, job: str) -> dict:
        return await self.request("pause", job=job)

    async def resume(self, job: str) -> dict:
        return await self.request("resume", job=job)

    async def cancel(self, job: str) -> dict:
        return await self.request("cancel", job=job)

    async def fork_job(self, name: str, new: str, changes: dict | None = None) -> dict:
        """Fork job ``name`` as ``new`` at the next step boundary, ``changes`` (adapter
        settings such as lr) applied from there on: {"job": new, "from": name, "step": k}."""
        params: dict[str, Any] = {"job": name, "as": new}
        if changes:
            params["set"] = dict(changes)
        return await self.request("fork", **params)

    async def evaluate_job(self, name: str) -> dict:
        """Evaluate a job at the next step boundary: {"job", "tasks": [names], "eval_loss":
        bool}; the results arrive as an "eval" event (``scores``, ``eval_loss``)."""
        return await self.request("evaluate", job=name)

    async def generate(self, prompt: str, *, jobs: list[str] | None = None, base: bool = False,
                       input: str = "", max_new_tokens: int = 64, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int | None = None, raw: bool = False,
                       on_reply: Callable[[dict], None] | None = None,
                       on_update: Callable[[dict], None] | None = None) -> dict:
        """The jobs' adapters (and the base model) answer ``prompt``, with each job's weights
        as of this request, while the engine trains. ``on_reply`` gets the reply (the rows
        and their steps), ``on_update`` each stream message's data (``texts`` so far).
        Returns the last data: ``texts``, ``stops``, ``done`` (and ``error`` if it failed)."""
        params: dict[str, Any] = {"prompt": prompt, "base": base, "input": input,
                                  "max_new_tokens": max_new_tokens,
                                  "temperature": float(temperature), "top_p": float(top_p),
                                  "raw": raw}
        if jobs is not None:
            params["jobs"] = list(jobs)
        if seed is not None:
            params["seed"] = seed
        stream: asyncio.Queue = asyncio.Queue()
        reply = await self.request("generate", _stream=stream, **params)
        if on_reply:
            on_reply(reply)
        while True:
            data = await stream.get()
            if data is _END:
                raise EngineUnavailable(self._closed_reason or "the engine connection closed")
            if on_update:
                on_update(data)
            if data.get("done"):
                return {**data, "rows": reply.get("rows", [])}

    async def save(self, job: str | None = None) -> dict:
        """Checkpoint one job now, or every unfinished one: {"paths": [...]}."""
        return await (self.request("save", job=job) if job else self.request("save"))

    async def add_jobs(self, toml: str, source: str = "<client>") -> dict:
        """Add the jobs of TOML ``[[adapter]]`` tables: {"added": [names]}.

        Relative paths in the tables resolve against the folder of ``source`` when it is
        an absolute file path, else against the folder of the engine's config.
        """
        return await self.request("add_jobs", toml=toml, source=source)

    async def stop(self) -> dict:
        """Ask for a graceful stop (checkpoints, then exit); the connection closes after."""
        return await self.request("stop")

    # -- events ----------------------------------------------------------------------------

    async def events(self, replay: bool = True) -> AsyncIterator[dict]:
        """Subscribe and yield every event (payload dicts with ``seq`` added).

        With ``replay`` the engine first sends every event since it started (seq 1, 2, ...),
        so a late client can draw whole loss curves. Ends when the connection closes.
        """
        async for event in await self.subscribe(replay):
            yield event

    async def subscribe(self, replay: bool = True) -> AsyncIterator[dict]:
        """Like ``events``, but returns once the subscription is in place: requests sent
        after this call are applied after it, so their events cannot be missed."""
        if self._events is not None:
            raise RuntimeError("a connection subscribes once")
        self._events = asyncio.Queue()
        await self.request("subscribe", replay=replay)
        return self._queued_events()

    async def _queued_events(self) -> AsyncIterator[dict]:
        assert self._events is not None
        while True:
            item = await self._events.get()
            if item is _END:
                return
            yield item

    # -- the connection --------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    async def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass
        self._read_task.cancel()
        try:
            await self._read_task
        except asyncio.CancelledError:
            pass
        self._closed("the client closed the connection")

    async def _read_loop(self) -> None:
        reason = "the engine closed the connection"
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    if self._refusal:
                        reason = f"the engine closed the connection: {self._refusal}"
                    break
                self._dispatch(p.decode(line))
        except (OSError, ValueError, p.ProtocolError) as e:
            # ValueError: a line over the reader's limit, which a real engine never sends.
            reason = f"the engine connection broke: {e}"
        except Exception as e:   # a message of the wrong shape: not from an engine of ours
            reason = f"the engine sent a malformed message ({type(e).__name__}: {e})"
        finally:
            self._closed(reason)

    def _dispatch(self, message: dict) -> None:
        kind = message.get("kind")
        if kind == "event":
            event = message.get("event")
            if not isinstance(event, dict):
                raise TypeError(f"an event must be an object, got {type(event).__name__}")
            if self._events is not None:
                self._events.put_nowait({**event, "seq": message.get("seq")})
            return
        request_id = message.get("id")
        if kind == "stream":
            data = message.get("data")
            if not isinstance(data, dict):
                raise TypeError(f"a stream message's data must be an object, got "
                                f"{type(data).__name__}")
            queue = self._streams.get(request_id)
            if queue is not None:
                queue.put_nowait(data)
                if data.get("done"):
                    self._streams.pop(request_id, None)
            return
        future = self._pending.get(request_id) if isinstance(request_id, int) else None
        if future is None or future.done():
            # An error not tied to a request we wait for: the engine says why it is about
            # to close the connection (too many clients, no hello in time).
            if kind == "error":
                self._refusal = f"{message.get('message', '')} ({message.get('code')})"
            return
        if kind == "reply":
            result = message.get("result") or {}
            if not isinstance(result, dict):
                raise TypeError(f"a reply's result must be an object, got "
                                f"{type(result).__name__}")
            future.set_result(result)
        elif kind == "error":
            future.set_exception(RequestFailed(str(message.get("code", p.INTERNAL)),
                                               str(message.get("message", ""))))

    def _closed(self, reason: str) -> None:
        if self._closed_reason is not None:
            return
        self._closed_reason = reason
        for future in self._pending.values():
            if not future.done():
                future.set_exception(EngineUnavailable(reason))
        for queue in self._streams.values():
            queue.put_nowait(_END)
        self._streams.clear()
        if self._events is not None:
            self._events.put_nowait(_END)


def run_sync(coro: Awaitable[T]) -> T:
    """Run one coroutine to the end from synchronous code (the CLI)."""
    return asyncio.run(coro)  # type: ignore[arg-type]


def hello_sync(socket_path: str | os.PathLike, client: str = "mlora",
               timeout: float = 5.0) -> dict:
    """Connect, say hello, return the engine's info, disconnect; blocking.

    Raises EngineUnavailable when nothing answers, RequestFailed when the engine refuses.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(socket_path))
        sock.sendall(p.encode(p.request(1, "hello", version=p.PROTOCOL_VERSION, client=client)))
        data = b""
        # The first line only, and never more than a line may hold.
        while b"\n" not in data and len(data) <= p.MAX_LINE_BYTES:
            chunk = sock.recv(65536)
            if not chunk:
                raise EngineUnavailable(f"the engine at {socket_path} closed the connection")
            data += chunk
    except (OSError, socket.timeout) as e:
        raise EngineUnavailable(f"cannot reach the engine at {socket_path}: "
                                f"{getattr(e, 'strerror', None) or e or 'timed out'}") from None
    finally:
        sock.close()
    try:
        message = p.decode(data.split(b"\n", 1)[0])
        if message.get("kind") == "error":
            raise RequestFailed(str(message.get("code", p.INTERNAL)),
                                str(message.get("message", "")))
        engine = message["result"]["engine"]
        if message.get("kind") != "reply" or not isinstance(engine, dict):
            raise TypeError("not a hello reply")
        return engine
    except (p.ProtocolError, KeyError, TypeError) as e:
        raise EngineUnavailable(f"what answers at {socket_path} is not an mlora engine "
                                f"({getattr(e, 'message', None) or e})") from None
