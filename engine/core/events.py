"""The one writer of a run's event log, ``<output_dir>/metrics.jsonl``, for the library
``Engine`` and the engine process alike. No torch.

What it promises (RELIABILITY.md, "The file system"):

- each event is one JSON line, handed to the kernel at once (a crash loses at most the
  line being written); a log whose last line a crash cut short goes on on a new line;
- the file deleted mid-run (with its folder, say) is made again: its first line is a
  warning that the events before it are lost, and the caller's ``restore`` hook makes the
  run's other files again (``engine.log``, ``run.json``) and says which;
- a write that fails (a full disk) never stops training: the caller gets one error
  notice, the writer tries again at most every ``retry_s`` seconds without another word,
  and the first line it writes again says how many events are missing and when;
- ``losses()`` says what the log lacks, so that a summary never claims a whole log.

``write`` returns the writer's own notices (``log`` events). The caller shows them as it
shows its events, before the event it wrote, and does not write them again: the writer has
put them in the log already where it could.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# How often a log that cannot be written is tried again (the variable is for tests).
RETRY_S = float(os.environ.get("MLORA_EVENTS_RETRY_S", 10.0))


def notice(level: str, message: str) -> dict:
    """A ``log`` event of the writer (or of a ``restore`` hook's caller)."""
    return {"type": "log", "time": time.time(), "level": level, "message": message}


def restore_file(name: str, make: Callable[[], object]) -> str:
    """Run ``make`` (which writes ``name`` again) for a ``restore`` hook; what to tell."""
    try:
        make()
    except OSError as exc:
        return f"{name} could not be made again ({exc.strerror or exc})"
    return f"{name} made again"


def _clock(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


def _line(event: dict) -> bytes:
    return (json.dumps(event, default=str) + "\n").encode("utf-8")


def _open(path: Path) -> int:
    """An append descriptor of ``path``, on a new line if a crash cut the last one short,
    so that a reader loses at most the cut line, never the first one written after it."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.write(fd, b"\n")
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass
class _Gap:
    """Events not written since a write failed."""

    since: float
    reason: str
    until: float
    retry_at: float
    count: int = 1

    def describe(self, ended: bool) -> str:
        if not ended:
            return f"the events from {_clock(self.since)} on (not written: {self.reason})"
        return (f"{self.count} event(s) from {_clock(self.since)} to {_clock(self.until)} "
                f"(not written: {self.reason})")


class EventWriter:
    """Appends events to ``path`` (see the module docstring). Thread-safe.

    ``restore``, called when the file has disappeared, makes the run's other files again
    and returns one phrase per file for the warning (see ``restore_file``); it must not
    raise ``OSError``.
    """

    def __init__(self, path: str | os.PathLike, restore: Callable[[], list[str]] | None = None,
                 retry_s: float = RETRY_S):
        self.path = Path(path)
        self._restore = restore
        self._retry_s = retry_s
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._opened = False        # once opened, a missing file means it was deleted
        self._identity: tuple[int, int] | None = None   # the file last opened
        self._closed = False
        self._gap: _Gap | None = None
        self._losses: list[str] = []

    def write(self, event: dict) -> list[dict]:
        """Append ``event``; the writer's notices, to show before it (see the module doc)."""
        line = _line(event)
        when = event.get("time") or time.time()
        with self._lock:
            if self._closed:
                return []
            if self._gap is not None and time.monotonic() < self._gap.retry_at:
                self._gap.count += 1
                self._gap.until = when
                return []
            try:
                notices, losses = self._reopen(when)
                self._append(b"".join(_line(n) for n in notices) + line)
            except OSError as exc:
                return self._failed(exc, when)
            self._losses += losses
            self._gap = None
            return notices

    def losses(self) -> list[str]:
        """What the log lacks, one phrase each (none: every event is in it)."""
        with self._lock:
            gap = [self._gap.describe(ended=False)] if self._gap is not None else []
            return self._losses + gap

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_fd()

    def _reopen(self, when: float) -> tuple[list[dict], list[str]]:
        """Open the file where needed: the notices to write first, and the losses they
        tell of (kept once that write succeeds)."""
        if self._fd is not None:
            if self._still_there():
                return [], []
            gone = True     # deleted, or replaced: its events went where no one looks
        else:
            # After a failed write, what is there now is the log (a disk freed by
            # replacing the file is no loss); only its absence is.
            gone = self._opened and not self.path.exists()
        self._drop_fd()
        notices, losses = [], []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if gone:
            made = self._restore() if self._restore is not None else []
            notices.append(notice("warning", (
                f"{self.path} disappeared (deleted, moved or replaced, perhaps with its "
                f"folder): it starts again here and the events before are lost"
                + "".join(f"; {phrase}" for phrase in made))))
            losses.append(f"the events before {_clock(when)} (lost when the file "
                          f"disappeared)")
        self._fd = _open(self.path)
        self._opened = True
        stat = os.fstat(self._fd)
        self._identity = (stat.st_dev, stat.st_ino)
        if self._gap is not None:
            gap = self._gap
            notices.append(notice("warning", (
                f"{self.path} can be written again; {gap.count} event(s) from "
                f"{_clock(gap.since)} to {_clock(gap.until)} are not in it "
                f"({gap.reason})")))
            losses.append(gap.describe(ended=True))
        return notices, losses

    def _still_there(self) -> bool:
        """Whether ``path`` is still the file last opened (not deleted, not replaced)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (stat.st_dev, stat.st_ino) == self._identity

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            if not written:
                raise OSError("the write made no progress")
            view = view[written:]

    def _failed(self, exc: OSError, when: float) -> list[dict]:
        # The descriptor goes: the next try opens the path again, whatever it is by then.
        self._drop_fd()
        retry_at = time.monotonic() + self._retry_s
        if self._gap is not None:
            self._gap.count += 1
            self._gap.until, self._gap.retry_at = when, retry_at
            return []
        reason = exc.strerror or str(exc)
        self._gap = _Gap(since=when, reason=reason, until=when, retry_at=retry_at)
        return [notice("error", (
            f"cannot write {self.path} ({reason}); training goes on without it, and it is "
            f"tried again every {self._retry_s:g} s: the events until then are not in it"))]

    def _drop_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass        # a descriptor whose writes failed may fail to close: it is gone
            self._fd = None
