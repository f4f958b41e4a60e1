"""The TUI's layout at the four terminal sizes of the issue (80x24, 100x30, 120x40,
200x60) and more, fed from a recorded engine state (no engine,
fixed times, fixed GPU readings), so the snapshots change only when the layout does.

Update them after a deliberate layout change with
``pytest tests/test_tui_snapshots.py --snapshot-update`` and look at the SVGs.
"""

from __future__ import annotations

import pytest

from mlora_tui.app import MloraApp
from mlora_tui.gpu import NO_GPU
from tui_recorded import FixedGpus, recorded_state, settled


pytestmark = pytest.mark.usefixtures("utc")   # conftest: local times pinned to UTC


def _long_paths(state):
    """The demo as a user runs it: absolute data paths, a packed run."""
    for job in state.jobs.values():
        job.adapter["data"] = f"/home/someone/projects/mlora-tui/configs/data/{job.name}.jsonl"
    state.model["packing"] = True
    return state


def test_layout_80x24_jobs_full_width_and_the_chart_under_tabs(snap_compare):
    app = MloraApp(state=_long_paths(recorded_state()), gpu_sampler=FixedGpus(NO_GPU))
    assert snap_compare(app, terminal_size=(80, 24), run_before=settled)


def test_layout_80x24_adapter_tab_shortens_paths_in_the_middle(snap_compare):
    async def run_before(pilot):
        await settled(pilot)
        await pilot.press("2")
        await settled(pilot)

    app = MloraApp(state=_long_paths(recorded_state()), gpu_sampler=FixedGpus(NO_GPU))
    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_layout_80x24_backend_tab(snap_compare):
    async def run_before(pilot):
        await settled(pilot)
        await pilot.press("3")
        await settled(pilot)

    app = MloraApp(state=_long_paths(recorded_state()), gpu_sampler=FixedGpus())
    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_layout_120x40_with_two_gpus(snap_compare):
    app = MloraApp(state=_long_paths(recorded_state()), gpu_sampler=FixedGpus())
    assert snap_compare(app, terminal_size=(120, 40), run_before=settled)


def test_layout_200x60_with_two_gpus(snap_compare):
    app = MloraApp(state=_long_paths(recorded_state()), gpu_sampler=FixedGpus())
    assert snap_compare(app, terminal_size=(200, 60), run_before=settled)


def test_layout_100x30_without_gpu(snap_compare):
    app = MloraApp(state=recorded_state(), gpu_sampler=FixedGpus(NO_GPU))
    assert snap_compare(app, terminal_size=(100, 30), run_before=settled)


def test_layout_160x45_with_two_gpus(snap_compare):
    app = MloraApp(state=recorded_state(), gpu_sampler=FixedGpus())
    assert snap_compare(app, terminal_size=(160, 45), run_before=settled)


def test_layout_160x45_disconnected_with_every_loss_on_a_paused_job(snap_compare):
    async def run_before(pilot):
        await settled(pilot)
        await pilot.press("down", "down", "l")
        await settled(pilot)

    app = MloraApp(state=recorded_state(connected=False), gpu_sampler=FixedGpus())
    assert snap_compare(app, terminal_size=(160, 45), run_before=run_before)


def test_confirm_modal_100x30(snap_compare):
    async def run_before(pilot):
        await settled(pilot)
        await pilot.press("x")

    app = MloraApp(state=recorded_state(), gpu_sampler=FixedGpus(NO_GPU))
    assert snap_compare(app, terminal_size=(100, 30), run_before=run_before)
