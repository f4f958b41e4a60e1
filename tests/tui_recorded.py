"""A recorded engine state for TUI tests that need no engine: fixed times, fixed numbers.

``recorded_events()`` is what an engine with three adapters would have sent (run_start,
job_added, job_state, step, eval, checkpoint, log and resource events) with times counted
from a fixed instant, so snapshots of the TUI fed from it never change between runs.
"""

from __future__ import annotations

import math

from mlora_tui.gpu import GpuReading, GpuReport
from mlora_tui.state import EngineState

T0 = 1_767_225_600.0          # 2026-01-01 00:00:00 UTC
ENGINE_INFO = {"name": "demo", "pid": 4242, "config": "/work/configs/demo.toml",
               "output_dir": "/work/runs/demo", "base_model": "/models/smollm2-135m"}


def _adapter(name, **kw):
    base = dict(name=name, data=f"data/{name}.jsonl", prompt="alpaca_short", r=8,
                lora_alpha=16.0, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                use_rslora=False, use_dora=False, loraplus_lr_ratio=1.0, optim="adamw",
                lr=1e-3, momentum=0.0, weight_decay=0.0, batch_size=8, micro_batch_size=8,
                num_epochs=2, scheduler_type="cosine", warmup_ratio=0.05, warmup_steps=None,
                cutoff_len=None, train_on_inputs=False, val_set_size=20,
                group_by_length=False, max_grad_norm=1.0, init_from="", seed=None)
    return {**base, **kw}


ADAPTERS = [
    (_adapter("uppercase"), 120, 40),
    (_adapter("sentiment", r=16, use_rslora=True), 100, 60),
    (_adapter("extract_json", use_dora=True, loraplus_lr_ratio=16.0, optim="sgd",
              momentum=0.9), 80, 25),
]


def recorded_events() -> list[dict]:
    events = [{"type": "run_start", "time": T0, "device": "cpu", "dtype": "bf16",
               "quantize": None, "attn_impl": "sdpa", "model_type": "llama",
               "num_params": 134_515_008, "base_model": "/models/smollm2-135m",
               "config": "/work/configs/demo.toml", "output_dir": "/work/runs/demo"}]
    t = T0 + 2
    for adapter, total, _ in ADAPTERS:
        events.append({"type": "job_added", "time": t, "job": adapter["name"],
                       "adapter": adapter, "total_steps": total, "train_examples": total * 4,
                       "val_examples": 20, "targets": adapter["target_modules"]})
        events.append({"type": "job_state", "time": t, "job": adapter["name"],
                       "state": "queued", "reason": None, "step": 0, "total_steps": total})
    events.append({"type": "log", "time": t, "level": "warning",
                   "message": "adapter 'extract_json': 3 examples longer than cutoff_len "
                              "128 were truncated"})
    for adapter, total, _ in ADAPTERS:
        events.append({"type": "job_state", "time": t + 1, "job": adapter["name"],
                       "state": "running", "reason": None, "step": 0, "total_steps": total})
    for step in range(1, 61):
        t += 0.5
        for i, (adapter, total, steps_done) in enumerate(ADAPTERS):
            if step > steps_done:
                continue
            loss = 2.6 * math.exp(-step / (12 + 6 * i)) + 0.35 + 0.08 * math.sin(step * (1.3 + i))
            events.append({"type": "step", "time": t, "job": adapter["name"], "step": step,
                           "total_steps": total, "epoch": round(step / (total / 2), 3),
                           "loss": loss, "lr": 1e-3 * (0.5 + 0.5 * math.cos(math.pi * step / total)),
                           "grad_norm": 0.8, "tokens": 1024, "tokens_per_s": 1830.0 - 210 * i,
                           "eta_s": (total - step) * 0.5})
            if step == 20:
                events.append({"type": "checkpoint", "time": t, "job": adapter["name"],
                               "step": step, "path": f"/work/runs/demo/{adapter['name']}/"
                                                     f"checkpoints/step-{step}"})
            if step == steps_done and steps_done == 25:
                events.append({"type": "job_state", "time": t, "job": adapter["name"],
                               "state": "paused", "reason": "paused by user", "step": step,
                               "total_steps": total})
        if step == 30:
            events.append({"type": "eval", "time": t, "job": "uppercase", "step": 30,
                           "eval_loss": 0.6123})
    events.append({"type": "resource", "time": t, "rss_bytes": 3_221_225_472,
                   "cpu_percent": 187.5, "device": "cpu", "device_memory_bytes": None,
                   "device_memory_total_bytes": None})
    return events


def recorded_state(connected: bool = True) -> EngineState:
    """The state after every recorded event; the clock stands still at the last one."""
    events = recorded_events()
    clock = {"now": T0}
    state = EngineState(clock=lambda: clock["now"])
    state.connected(ENGINE_INFO)
    for seq, event in enumerate(events, 1):
        clock["now"] = event["time"]
        state.apply_event(event, seq=seq)
    if not connected:
        clock["now"] += 3
        state.disconnected("connection closed")
    return state


FIXED_GPUS = GpuReport((GpuReading(0, "NVIDIA H200", utilization=87, memory_used=41 << 30,
                                   memory_total=141 << 30, temperature=54, power=412.0,
                                   power_limit=700.0),
                        GpuReading(1, "NVIDIA H200", utilization=None, memory_used=1 << 30,
                                   memory_total=141 << 30, temperature=None, power=None)))


class FixedGpus:
    """A GPU sampler that always reads the same (or 'no GPU')."""

    def __init__(self, report: GpuReport = FIXED_GPUS):
        self.report = report

    def sample(self) -> GpuReport:
        return self.report

    def close(self) -> None:
        pass


async def settled(pilot) -> None:
    """Wait for the first GPU reading (a thread worker) and the redraw after it; on a
    screen without them (an overlay), only for the next refresh."""
    import time

    screen = pilot.app.screen
    deadline = time.monotonic() + 10
    while getattr(screen, "gpu_report", True) is None and time.monotonic() < deadline:
        await pilot.pause(0.02)
    if hasattr(screen, "redraw"):
        screen.redraw()
    await pilot.pause()
