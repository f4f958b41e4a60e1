"""The TUI's layout at the four terminal sizes of the issue (80x24, 100x30, 120x40,
200x60) and more, fed from a recorded engine state (no engine,
fixed times, fixed GPU readings), so the snapshots change only when the layout does.

Update them after a deliberate layout change with
``pytest tests/test_tui_snapshots.py --snapshot-update`` and look at the SVGs.
"""

from __future__ import annotations

import time

import pytest

from mlora_tui.app import MloraApp
from mlora_tui.gpu import NO_GPU
from tui_recorded import FixedGpus, recorded_state


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """Clock times on screen are local times: pin the zone."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


async def _settled(pilot) -> None:
    """Wait for the first GPU reading (a thread worker) and the redraw after it."""
    screen = pilot.app.screen
    deadline = time.monotonic() + 10
    while screen.gpu_report is None and time.monotonic() < deadline:
        await pilot.pause(0.02)
    screen.redraw()
    await pilot.pause()


def _long_paths(state):
    """The demo as a user runs it: absolute data paths, a packed run."""
    for job in state.jobs.values():
        job.adapter["data"] = f"/home/someone/projects/mlora-tui/configs/data/{job.name}.jsonl"
    state.model["packing"] = True
    return state


def test_layout_80x24_jobs_full_width_and_the_chart_under_tabs(snap_compare):
    app = MloraApp(state=_long_paths(recorded_state()), gpu_sampler=FixedGpus(NO_GPU))
    assert snap_compare(app, terminal_size=(80, 24), run_before=_settled)


def test_layout_80x24_adapter_tab_shortens_paths_in_the_middle(snap_compare):
    async def run_before(pilot):
        await _settled(pilot)
        await pilot.press("2")
        await _settled(pilot)

    app = MloraApp(state=_long_paths(recorded_state()), gpu_sampler=FixedGpus(NO_GPU))
    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_layout_80x24_backend_tab(snap_compare):
    async def run_before(pilot):
        await _settled(pilot)
        await pilot.press("3")
        await _settled(pilot)

    app = MloraApp(state=_long_paths(recorded_state()), gpu_sampler=FixedGpus())
    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_layout_120x40_with_two_gpus(snap_compare):
    app = MloraApp(state=_long_paths(recorded_state()), gpu_sampler=FixedGpus())
    assert snap_compare(app, terminal_size=(120, 40), run_before=_settled)


def test_layout_200x60_with_two_gpus(snap_compare):
    app = MloraApp(state=_long_paths(recorded_state()), gpu_sampler=FixedGpus())
    assert snap_compare(app, terminal_size=(200, 60), run_before=_settled)


def test_layout_100x30_without_gpu(snap_compare):
    app = MloraApp(state=recorded_state(), gpu_sampler=FixedGpus(NO_GPU))
    assert snap_compare(app, terminal_size=(100, 30), run_before=_settled)


def test_layout_160x45_with_two_gpus(snap_compare):
    app = MloraApp(state=recorded_state(), gpu_sampler=FixedGpus())
    assert snap_compare(app, terminal_size=(160, 45), run_before=_settled)


def test_layout_160x45_disconnected_with_every_loss_on_a_paused_job(snap_compare):
    async def run_before(pilot):
        await _settled(pilot)
        await pilot.press("down", "down", "l")
        await _settled(pilot)

    app = MloraApp(state=recorded_state(connected=False), gpu_sampler=FixedGpus())
    assert snap_compare(app, terminal_size=(160, 45), run_before=run_before)


def test_confirm_modal_100x30(snap_compare):
    async def run_before(pilot):
        await _settled(pilot)
        await pilot.press("x")

    app = MloraApp(state=recorded_state(), gpu_sampler=FixedGpus(NO_GPU))
    assert snap_compare(app, terminal_size=(100, 30), run_before=run_before)
