"""How the TUI writes numbers: losses, rates, sizes, durations and clock times, with a dash
for what is not known yet."""

from __future__ import annotations

import math
import re
import time
from typing import Mapping

from engine.core.jobs import CANCELLED, DONE, FAILED, PAUSED, PRUNED, QUEUED, RUNNING
from mlora_tui.progress import format_duration, percent, score_text  # noqa: F401 (re-exported)

DASH = "-"
NA = "N/A"

STATE_STYLES = {
    QUEUED: "dim",
    RUNNING: "bold $success",
    PAUSED: "bold $warning",
    DONE: "$primary",
    FAILED: "bold $error",
    CANCELLED: "dim $secondary",
    PRUNED: "dim",
}
LOG_STYLES = {"debug": "dim", "info": "", "warning": "$warning", "error": "bold $error"}


def _known(value: float | None) -> bool:
    return value is not None and not (isinstance(value, float) and not math.isfinite(value))


def loss(value: float | None) -> str:
    """Six characters at most for any loss below 10,000."""
    if not _known(value):
        return DASH
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"


def lr(value: float | None) -> str:
    return f"{value:.1e}" if _known(value) else DASH


def rate(value: float | None) -> str:
    return f"{value:,.0f}" if _known(value) else DASH


def eta(seconds: float | None) -> str:
    return format_duration(seconds) if _known(seconds) else DASH


def epoch(value: float | None) -> str:
    """Five characters at most below 100,000 epochs."""
    if not _known(value):
        return DASH
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def count(value: int | None) -> str:
    if value is None:
        return DASH
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def size(num_bytes: float | None) -> str:
    """Bytes in binary units (``512.0 MiB``), or N/A."""
    if not _known(num_bytes):
        return NA
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return NA


def clock(seconds: float | None) -> str:
    """A wall-clock time of day, local: ``14:03:27``."""
    return time.strftime("%H:%M:%S", time.localtime(seconds)) if seconds else DASH


_VARIABLE = re.compile(r"\$([a-z][a-z0-9-]*)")


def theme_style(spec: str, variables: Mapping[str, str]) -> str:
    """A Rich style from a spec that may name theme colours (``bold $warning``), so text
    drawn in Python follows the theme as CSS does."""
    return _VARIABLE.sub(lambda m: variables.get(m.group(1), "default"), spec)


ELLIPSIS = "…"


def shorten_middle(text: str, width: int) -> str:
    """``text`` in at most ``width`` cells: a path keeps its last parts whole
    (``…/configs/data/uppercase.jsonl``), since the file name and its folders say the most;
    any other text keeps its start and its end."""
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    if "/" in text:
        parts = text.split("/")
        tail = parts[-1]
        for part in reversed(parts[1:-1]):
            if len(tail) + len(part) + 3 > width:     # "…/" + part + "/"
                break
            tail = f"{part}/{tail}"
        if len(tail) + 2 <= width:
            return f"{ELLIPSIS}/{tail}"
        return ELLIPSIS + text[len(text) - width + 1:]
    head = (width - 1) // 2
    return text[:head] + ELLIPSIS + text[len(text) - (width - 1 - head):]
