"""GPU readings for the backend pane, from NVML (the ``nvidia-ml-py`` package, ``pynvml``).

Degrades like nvitop: every field is read on its own and is None (shown as N/A) when the
device or driver does not support it; without NVML, or without a driver or a GPU, the
report says "no GPU". Nothing here raises: a monitor must never crash or exit for lack
of a GPU. NVML calls block, so the TUI calls ``GpuSampler.sample`` from a thread worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class GpuReading:
    """One GPU; None for every field NVML cannot give."""

    index: int
    name: str | None = None
    utilization: int | None = None          # percent of time a kernel ran
    memory_used: int | None = None          # bytes
    memory_total: int | None = None         # bytes
    temperature: int | None = None          # degrees C
    power: float | None = None              # watts
    power_limit: float | None = None        # watts


@dataclass(frozen=True)
class GpuReport:
    gpus: tuple[GpuReading, ...] = ()
    note: str = ""          # why there are no readings ("no GPU", "no GPU (NVML: ...)")

    @property
    def available(self) -> bool:
        return bool(self.gpus)


NO_GPU = GpuReport(note="no GPU")


class GpuSampler:
    """Reads every GPU through NVML. ``nvml`` is the ``pynvml`` module (tests pass a fake);
    by default it is imported when first needed."""

    def __init__(self, nvml: Any = None):
        self._nvml = nvml
        self._ready = False
        self._failed: GpuReport | None = None

    def _init(self) -> GpuReport | None:
        """None when NVML is up; otherwise the report to give every time."""
        if self._ready or self._failed is not None:
            return self._failed
        if self._nvml is None:
            try:
                import pynvml
            except Exception:
                self._failed = NO_GPU
                return self._failed
            self._nvml = pynvml
        try:
            self._nvml.nvmlInit()
        except Exception as e:  # no driver, no device, a library mismatch
            self._failed = GpuReport(note=f"no GPU (NVML: {_reason(e)})")
            return self._failed
        self._ready = True
        return None

    def sample(self) -> GpuReport:
        failed = self._init()
        if failed is not None:
            return failed
        nvml = self._nvml
        count = _field(nvml.nvmlDeviceGetCount)
        if not count:
            return NO_GPU
        return GpuReport(tuple(self._reading(nvml, i) for i in range(count)))

    @staticmethod
    def _reading(nvml: Any, index: int) -> GpuReading:
        handle = _field(lambda: nvml.nvmlDeviceGetHandleByIndex(index))
        if handle is None:
            return GpuReading(index)
        name = _field(lambda: nvml.nvmlDeviceGetName(handle))
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        util = _field(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        memory = _field(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        temperature = _field(lambda: nvml.nvmlDeviceGetTemperature(
            handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0)))
        power = _field(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        limit = _field(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0)
        return GpuReading(
            index=index, name=name, utilization=util,
            memory_used=getattr(memory, "used", None), memory_total=getattr(memory, "total", None),
            temperature=temperature, power=power, power_limit=limit)

    def close(self) -> None:
        if self._ready:
            _field(self._nvml.nvmlShutdown)
            self._ready = False


def _field(read: Callable[[], T]) -> T | None:
    # NVMLError_NotSupported, NoPermission, GpuIsLost, ...: this field is N/A, the rest goes on.
    try:
        return read()
    except Exception:
        return None


def _reason(error: Exception) -> str:
    return str(error) or type(error).__name__
