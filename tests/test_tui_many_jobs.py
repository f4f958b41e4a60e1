"""Fifty jobs (a sweep's worth) in the TUI: a frame where every job has stepped redraws in
well under the issue's 50 ms, in the single-job view and with every loss overlaid.

The app runs headless at 120x40 from a state fed with what an engine would send (no
engine): each job added, running, forty steps of losses, an eval every ten steps. A frame
is then: one more step for all fifty jobs applied to the state, the screen's redraw from
it, every message that queues (the table's own updates), Textual's composition of the
changed regions and their encoding as terminal output (which the headless driver would
skip, so the test does it). The median of several frames must stay under 50 ms times 3:
the machine (2 cores) is shared with other test runs, and a frame that misses by 3x is a
real regression, not noise. ``-s`` prints the medians (the figure in BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time

from mlora_tui.app import MloraApp
from mlora_tui.gpu import NO_GPU
from mlora_tui.state import EngineState
from tui_recorded import ENGINE_INFO, FixedGpus, T0, _adapter

JOBS, STEPS, TOTAL, FRAMES = 50, 40, 200, 15
BUDGET_S, MARGIN = 0.050, 3


def _loss(job: int, step: int) -> float:
    return 2.5 * math.exp(-step / (10 + job % 7)) + 0.2 + 0.01 * job + 0.05 * math.sin(step + job)


def _step_events(step: int) -> list[dict]:
    events = []
    for i in range(JOBS):
        name = f"sweep-{i:02d}"
        events.append({"type": "step", "time": T0 + step, "job": name, "step": step,
                       "total_steps": TOTAL, "epoch": step / 100, "loss": _loss(i, step),
                       "lr": 1e-3, "grad_norm": 0.7, "tokens": 2048,
                       "tokens_per_s": 900.0 + i, "eta_s": (TOTAL - step) * 2.0})
        if step % 10 == 0:
            events.append({"type": "eval", "time": T0 + step, "job": name, "step": step,
                           "eval_loss": _loss(i, step) + 0.1})
    return events


def fifty_jobs() -> tuple[EngineState, int]:
    """The state after every job's first ``STEPS`` steps, and the next seq number."""
    state = EngineState(clock=lambda: T0)
    state.connected(ENGINE_INFO)
    events = [{"type": "run_start", "time": T0, "device": "cuda:0", "dtype": "bf16",
               "attn_impl": "sdpa", "model_type": "llama", "num_params": 134_515_008,
               "output_dir": "/work/runs/sweep"}]
    for i in range(JOBS):
        name = f"sweep-{i:02d}"
        adapter = _adapter(name, r=(4, 8, 16, 32)[i % 4], lr=1e-4 * (1 + i % 5))
        events += [{"type": "job_added", "time": T0, "job": name, "adapter": adapter,
                    "total_steps": TOTAL, "train_examples": 800, "val_examples": 20,
                    "targets": adapter["target_modules"]},
                   {"type": "job_state", "time": T0, "job": name, "state": "running",
                    "reason": None, "step": 0, "total_steps": TOTAL}]
    for step in range(1, STEPS + 1):
        events += _step_events(step)
    for seq, event in enumerate(events, 1):
        state.apply_event(event, seq=seq)
    return state, len(events) + 1


async def _frame_times(overlay: bool) -> tuple[list[float], str]:
    state, seq = fifty_jobs()
    app = MloraApp(state=state, gpu_sampler=FixedGpus(NO_GPU))
    times = []
    async with app.run_test(size=(120, 40)) as pilot:
        display = app._display

        def encoding_display(screen, update) -> None:
            # What a real terminal driver does with the frame; headless skips it.
            if update is not None and hasattr(update, "render_segments"):
                update.render_segments(app.console)
            display(screen, update)

        app._display = encoding_display
        screen = app.screen
        if overlay:
            await pilot.press("l")
        await pilot.pause()
        for step in range(STEPS + 1, STEPS + 1 + FRAMES):
            for event in _step_events(step):
                state.apply_event(event, seq=seq)
                seq += 1
            # No await between the events and the redraw: the 4 Hz timer cannot take
            # this frame first.
            start = time.perf_counter()
            screen.redraw()
            await pilot._wait_for_screen()
            screen._on_timer_update()
            times.append(time.perf_counter() - start)
            await pilot.pause()
        table = screen.jobs_table
        last = STEPS + FRAMES
        assert table.row_count == JOBS
        assert table.get_cell("sweep-49", "step").plain.strip().startswith(f"{last}/")
        assert state.jobs["sweep-00"].loss_steps[-1] == last
        return times, str(screen.loss_chart.border_title)


def test_fifty_jobs_redraw_a_frame_in_under_50_ms():
    for overlay in (False, True):
        times, title = asyncio.run(_frame_times(overlay))
        median = statistics.median(times)
        view = "all losses" if overlay else "one job"
        print(f"\n50 jobs, {view}: median frame {median * 1000:.1f} ms "
              f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}, {len(times)} frames)")
        assert median < BUDGET_S * MARGIN, (view, times)
        if overlay:
            assert title.startswith("Loss · best 5 of 50"), title


def test_the_charts_toggles_redraw_it_and_every_line_fits_the_pane():
    async def scenario() -> None:
        state, _ = fifty_jobs()
        app = MloraApp(state=state, gpu_sampler=FixedGpus(NO_GPU))
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            chart = app.screen.loss_chart
            width = chart.content_size.width
            selected = app.screen.selected
            assert chart.border_title == f"Loss · {selected}"
            caption = chart.render().plain.split("\n")[-1]
            assert caption.startswith(f"● {selected}") and "◆" in caption
            assert chart.toggle_log_scale() is True and chart.toggle_smoothing() is True
            await pilot.pause()
            assert chart.border_title == f"Loss · {selected} · log · EMA"
            lines = chart.render().plain.split("\n")
            labels = [line.split("┤")[0].strip() for line in lines if "┤" in line]
            assert labels == ["10", "1", "0.1"]         # losses from 2.7 down to 0.2
            app.screen.action_toggle_overlay()
            await pilot.pause()
            assert chart.border_title == "Loss · best 5 of 50 and the selected · log · EMA"
            lines = chart.render().plain.split("\n")
            assert all(len(line) <= width for line in lines)
            # sweep-00 has the highest losses but is selected; the five best are those
            # with the lowest eval loss.
            best = [job.name for job in sorted(state.jobs.values(),
                                               key=lambda job: job.eval_loss)[:5]]
            assert [name for name in best + ["sweep-00"]
                    if name in " ".join(lines[-2:])] == best + ["sweep-00"]
            chart.toggle_log_scale()
            await pilot.pause()
            assert chart.border_title.endswith("the selected · EMA")
    asyncio.run(scenario())
