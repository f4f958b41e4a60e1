"""The backend pane: what the engine runs on and what it costs.

The base model facts come from the engine (``run_start``/``status``: device, dtype,
attention, quantization, model), the process figures from its ``resource`` events (memory,
CPU, device memory), and per-GPU figures from NVML on this machine (``mlora_tui.gpu``),
each N/A on its own when unknown.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from mlora_tui.gpu import GpuReport
from mlora_tui.widgets import formatting as fmt


def _or_na(value: Any, suffix: str = "") -> str:
    return fmt.NA if value is None else f"{value}{suffix}"


def _power(reading) -> str:
    if reading.power is None:
        return fmt.NA
    limit = f"/{reading.power_limit:.0f}" if reading.power_limit is not None else ""
    return f"{reading.power:.0f}{limit} W"


def _memory(used: int | None, total: int | None) -> str:
    if used is None:
        return fmt.NA
    return fmt.size(used) + (f" / {fmt.size(total)}" if total else "")


_KEY_WIDTH = len("dev memory")   # the longest key: the value column starts after it

_PHASES = (("data", "data"), ("forward", "fwd"), ("backward", "bwd"),
           ("optimizer", "opt"), ("events", "events"), ("checkpoint", "ckpt"))


def attention_text(model: dict[str, Any]) -> str:
    """'sdpa, sequences packed': the attention implementation, and whether training packs."""
    text = model.get("attn_impl") or fmt.DASH
    return text + ", sequences packed" if model.get("packing") else text


def step_summary(batch: dict[str, Any]) -> str:
    """'0.84 s · 3 jobs · 412 tok · 12% pad · 2 passes' of a ``batch`` event ('packed'
    instead of the padding when every pass was packed)."""
    seconds = sum((batch.get("seconds") or {}).values())
    parts = [f"{seconds:.2f} s", f"{len(batch.get('jobs') or [])} jobs",
             f"{batch.get('tokens', 0)} tok"]
    packed = batch.get("packed") or 0
    if packed and packed == batch.get("passes"):
        parts.append("packed")            # no padding at all
    elif batch.get("padding") is not None:
        parts.append(f"{100 * batch['padding']:.0f}% pad")
    if (batch.get("passes") or 1) > 1:
        parts.append(f"{batch['passes']} passes")
    return " · ".join(parts)


def phase_shares(seconds: dict[str, float]) -> str:
    """'fwd 41% bwd 48% opt 6% data 1%': where the step's time went, largest first."""
    total = sum(seconds.values())
    if total <= 0:
        return fmt.NA
    labels = dict(_PHASES)
    shares = sorted(((v / total, labels.get(k, k)) for k, v in seconds.items()), reverse=True)
    return " ".join(f"{label} {100 * share:.0f}%" for share, label in shares if share >= 0.005)


class BackendPane(Static):
    """Device, precision and attention of the base model; engine process and GPU usage."""

    can_focus = True    # a click focuses it, and the arrow keys then scroll it

    DEFAULT_CSS = """
    BackendPane {
        background: $surface;
        scrollbar-size-vertical: 1;
        height: 1fr;
        overflow-y: auto;
    }
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._shown: tuple | None = None
        self._args: tuple = ({}, {}, None, None)

    def on_resize(self) -> None:
        self.show(*self._args)      # what fits on a line depends on the width

    def show(self, model: dict[str, Any], engine: dict[str, Any],
             resource: dict[str, Any] | None, gpus: GpuReport | None,
             output_dir: str | None = None, batch: dict[str, Any] | None = None) -> None:
        self._args = (model, engine, resource, gpus, output_dir, batch)
        width = self.scrollable_content_region.width - _KEY_WIDTH - 1
        key = (repr(model), engine.get("pid"), repr(resource), gpus, output_dir, repr(batch),
               width)
        if key == self._shown:
            return
        self._shown = key
        table = Table.grid(padding=(0, 1))
        table.add_column(style="bold", no_wrap=True, min_width=_KEY_WIDTH)
        # Values wrap between words ("41.0 GiB /" then "141.0 GiB"); a word too long for
        # the pane is cut short rather than folded a character a line.
        table.add_column(overflow="ellipsis")
        device = model.get("device")
        kind = device.split(":")[0] if device else None
        table.add_row("device", Text(f"{device} ({kind})" if device else fmt.DASH))
        table.add_row("dtype", Text(model.get("dtype") or fmt.DASH))
        attention = attention_text(model)
        if len(attention) <= width or not model.get("packing"):
            table.add_row("attention", Text(attention, no_wrap=True, overflow="ellipsis"))
        else:   # two rows rather than "sequences packed" wrapped over three lines
            table.add_row("attention", Text(model.get("attn_impl") or fmt.DASH))
            table.add_row("packing", Text("sequences packed", no_wrap=True,
                                          overflow="ellipsis"))
        table.add_row("quantize", Text(model.get("quantize") or "none"))
        if model.get("model_type"):
            table.add_row("model", Text(f"{model['model_type']}, "
                                        f"{fmt.count(model.get('num_params'))} params"))
        table.add_row("engine", Text(f"pid {engine['pid']}" if engine.get("pid") else fmt.DASH))
        resource = resource or {}
        table.add_row("memory", Text(fmt.size(resource.get("rss_bytes"))))
        cpu = resource.get("cpu_percent")
        table.add_row("cpu", Text(fmt.NA if cpu is None else f"{cpu:.0f}%"))
        if resource.get("device_memory_bytes") is not None:
            table.add_row("dev memory", Text(_memory(resource.get("device_memory_bytes"),
                                                     resource.get("device_memory_total_bytes"))))
        if gpus is None:
            table.add_row("gpu", Text("reading...", style="dim"))
        elif not gpus.available:
            table.add_row("gpu", Text(gpus.note or "no GPU", style="dim"))
        for gpu in gpus.gpus if gpus else ():
            table.add_row(f"gpu {gpu.index}", Text(gpu.name or fmt.NA))
            table.add_row("  util", Text(_or_na(gpu.utilization, "%")))
            table.add_row("  memory", Text(_memory(gpu.memory_used, gpu.memory_total)))
            table.add_row("  temp", Text(_or_na(gpu.temperature, "°C")))
            table.add_row("  power", Text(_power(gpu)))
        if batch:
            table.add_row("last step", Text(step_summary(batch)))
            table.add_row("  time in", Text(phase_shares(batch.get("seconds") or {})))
        if output_dir:
            table.add_row("output", Text(fmt.shorten_middle(output_dir, max(width, 8)),
                                         no_wrap=True))
        self.update(table)
