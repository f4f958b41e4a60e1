"""Append-only JSON-lines logs (``metrics.jsonl``) that survive a crash mid-line."""

from __future__ import annotations

from pathlib import Path


def open_log(path: Path):
    """Open a JSON-lines log for appending, on a new line if a crash cut the last one short.

    A reader then loses at most the one cut line, never the first line written after it.
    """
    log = open(path, "a+", encoding="utf-8")
    if log.tell() > 0:
        log.seek(log.tell() - 1)
        if log.read(1) != "\n":
            log.write("\n")
    return log
