"""Resource samples of the engine process: its memory and CPU, and its device's memory.

The listener thread sends one ``resource`` event every ``RESOURCE_INTERVAL_S`` seconds
(fields in ``engine.core.protocol``). torch is imported only once a device exists, that is
once the engine has loaded it.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from typing import Any

log = logging.getLogger("mlora.engine")

RESOURCE_INTERVAL_S = 2.0


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

