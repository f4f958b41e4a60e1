"""Every event of the engine process: numbered, kept encoded for replay, and logged to
``metrics.jsonl`` by the run's one event writer (``engine.core.events.EventWriter``).

The listener copies the encoded lines out to subscribers (``engine.server.listener``); the
writer keeps the file going through a deleted folder or a full disk and tells of it in
notices, which are numbered and replayed like any other event.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

from engine.core import protocol as p
from engine.core.events import EventWriter


def _numbered(seq: int, payload: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """The payload to keep as event ``seq`` (a warning instead when too large to send)
    and its encoded line."""
    try:
        return payload, p.encode(p.event(seq, payload))
    except p.ProtocolError as e:
        payload = {"type": "log", "time": payload.get("time", time.time()),
                   "level": "warning", "message": f"a {payload.get('type')} event "
                                                  f"was too large to send: {e.message}"}
        return payload, p.encode(p.event(seq, payload))


class EventLog:
    """The numbered history of events, and ``metrics.jsonl``.

    Called from both threads (engine events from the main thread, resource samples from
    the listener), so one lock orders them: seq numbers, history and metrics.jsonl agree.
    ``restore`` is the writer's hook for a deleted output folder (see ``EventWriter``).
    """

    def __init__(self, metrics_path: Path, restore: Callable[[], list[str]] | None = None):
        self.lock = threading.Lock()
        self.lines: list[bytes] = []       # lines[seq - 1] is the encoded event seq
        self.offsets: list[int] = [0]      # offsets[i]: bytes in lines[:i] (for backlogs)
        self.writer = EventWriter(metrics_path, restore=restore)

    def append(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """Number and log ``payload``; the events added: the writer's notices, then it."""
        with self.lock:
            payload, line = _numbered(len(self.lines) + 1, payload)
            notices = self.writer.write(payload)
            for notice in notices:
                self._add(_numbered(len(self.lines) + 1, notice)[1])
            if notices:
                payload, line = _numbered(len(self.lines) + 1, payload)
            self._add(line)
            return notices + [payload]

    def _add(self, line: bytes) -> None:
        self.lines.append(line)
        self.offsets.append(self.offsets[-1] + len(line))

    def close(self) -> None:
        self.writer.close()
