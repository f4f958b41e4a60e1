"""Time, memory and other processes' load, as every benchmark script measures them.

Nothing here imports torch at import time: ``bench.bench``'s parent process uses it too.
"""

from __future__ import annotations

import math
import os
import sys
import time

# glibc's allocator settings of shared/environment.md; on CPU they halve the step time and
# its noise, but the engine does not set them, so the scripts use them only when asked.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "1073741824",
}
# A step during which other processes kept more cores than this busy is "disturbed": one
# busy core from elsewhere slows a CPU step 3-30x, not 2x.
DISTURBED_CORES = 0.5


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return None


def hwm_mib() -> float | None:
    """Peak RSS of this process image (VmHWM). Unlike getrusage's maxrss it does not carry
    the parent's high-water mark over fork and exec."""
    return _proc_kib("/proc/self/status", "VmHWM:")


def mem_available_mib() -> float | None:
    return _proc_kib("/proc/meminfo", "MemAvailable:")


def _proc_kib(path: str, key: str) -> float | None:
    """A ``key: N kB`` line of a /proc file, in MiB."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def maxrss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes on the machine have been busy (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / _CLK_TCK


def loadavg() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:
        return [float("nan")] * 3


class Mark:
    """Wall time, own CPU time and machine-wide busy time at a moment."""

    def __init__(self):
        self.wall = time.perf_counter()
        self.cpu = time.process_time()
        self.busy = machine_busy_seconds()

    def since(self) -> dict:
        """Seconds since the mark, own CPU seconds, and the cores others kept busy."""
        now = Mark()
        seconds = now.wall - self.wall
        cpu = now.cpu - self.cpu
        others = None
        if now.busy is not None and self.busy is not None and seconds > 0:
            others = max(0.0, (now.busy - self.busy - cpu) / seconds)
        return {"wall": seconds, "cpu": cpu, "others": others}


class Quiet:
    """Waits (within a budget) until other processes leave the CPUs alone for a moment."""

    def __init__(self, budget: float):
        self.left = budget
        self.waited = 0.0

    def wait(self, window: float = 0.25) -> None:
        while self.left > 0:
            mark = Mark()
            time.sleep(window)
            others = mark.since()["others"]
            self.left -= window
            self.waited += window
            if others is None or others < DISTURBED_CORES:
                return


def synchronizer(device):
    """A function that waits for ``device``'s queued work (a GPU's), or does nothing."""
    if device.type == "cuda":
        import torch
        return torch.cuda.synchronize
    return lambda: None


class Clock:
    """Times a ``with`` block: wall seconds, own CPU seconds, the cores others kept busy
    (the device synchronised at both ends)."""

    def __init__(self, device):
        self._sync = synchronizer(device)

    def __enter__(self) -> "Clock":
        self._sync()
        self._mark = Mark()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        since = self._mark.since()
        self.seconds, self.cpu, self.others = since["wall"], since["cpu"], since["others"]


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
