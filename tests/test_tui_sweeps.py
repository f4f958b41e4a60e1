"""Sweeps in the TUI: the state kept from a real sweep's events, the jobs table's groups
(folded and unfolded, sorted within), the sweep view (key `w`), pruned trials' keys dimmed,
and 80x24 snapshots of the view and of the grouped table.

The state test feeds the events a real 6-trial grid sweep wrote (tests/test_sweeps.py's
``write_sweep``, about two seconds on a tiny llama). The pilot and snapshot tests use a
recorded 12-trial sweep written here, shaped as the engine's events (fixed times and
numbers), so that the snapshots never change between runs or machines.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math

import pytest

from mlora_tui.app import MloraApp
from mlora_tui.gpu import NO_GPU
from mlora_tui.state import EngineState
from mlora_tui.widgets.jobs_table import FOLD_OVER, group_key, table_rows
from mlora_tui.widgets.sweep_view import SweepScreen, rung, sparkline, sweeps_renderable
from tui_recorded import ENGINE_INFO, T0, FixedGpus, recorded_events, recorded_state, settled


pytestmark = pytest.mark.usefixtures("utc")   # conftest: local times pinned to UTC


# -- a recorded 12-trial sweep ------------------------------------------------------------

LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
RANKS = [4, 8]
PRUNED_TRIALS = {1: 3, 6: 3, 7: 6}          # trial index -> step it was pruned at
RUNNING_TRIALS = {10, 11}                   # still training; the others done
TOTAL = 12


def _curve(index: int, step: int) -> float:
    lr, r = LRS[index % 6], RANKS[index // 6]
    return 2.0 + 0.1 * abs(math.log10(lr) + 2.5) + 0.04 * r / 8 - 0.05 * step + 0.001 * index


def sweep_events() -> list[dict]:
    """A standalone job, then sweep "lr" of 12 trials (lr x r), as the engine sends them:
    job_added with sweep/trial/params, job_state, eval, and after each report the whole
    summary, ranked best first."""
    events = [e for e in recorded_events() if e.get("job") in (None, "uppercase")]
    t = T0 + 100
    history: dict[int, list] = {}
    state: dict[int, str] = {}
    reason: dict[int, str] = {}

    def summary() -> dict:
        trials = []
        for i in sorted(history):
            value = history[i][-1][1] if state[i] == "done" else None
            trials.append({"job": f"lr-{i}", "index": i,
                           "params": {"lr": LRS[i % 6], "r": RANKS[i // 6]}, "state": state[i],
                           "value": value, "metric_history": [list(p) for p in history[i]],
                           "reason": reason.get(i, "")})
        done = sorted((t for t in trials if t["state"] == "done"), key=lambda t: t["value"])
        rest = sorted((t for t in trials if t["state"] != "done"),
                      key=lambda t: (t["state"] == "pruned", t["metric_history"][-1][1]
                                     if t["metric_history"] else math.inf))
        return {"type": "sweep", "time": t, "name": "lr", "metric": "eval_loss",
                "direction": "minimize", "prune": "asha", "parallel": 2, "trials_total": TOTAL,
                "best": done[0]["job"] if done else None, "trials": done + rest}

    for i in range(TOTAL):
        name = f"lr-{i}"
        events.append({"type": "job_added", "time": t, "job": name, "total_steps": 10,
                       "train_examples": 20, "val_examples": 4, "targets": ["q_proj", "v_proj"],
                       "variant": "lora", "adapter": {"r": RANKS[i // 6], "lr": LRS[i % 6]},
                       "sweep": "lr", "trial": i, "params": {"lr": LRS[i % 6], "r": RANKS[i // 6]}})
        events.append({"type": "job_state", "time": t, "job": name, "state": "running",
                       "reason": None, "step": 0, "total_steps": 10})
        history[i], state[i] = [], "running"
        last = PRUNED_TRIALS.get(i, 4 if i in RUNNING_TRIALS else 10)
        for step in range(1, last + 1):
            t += 0.5
            loss = _curve(i, step)
            events.append({"type": "step", "time": t, "job": name, "step": step,
                           "total_steps": 10, "epoch": step / 5, "loss": loss + 0.1,
                           "lr": LRS[i % 6], "tokens_per_s": 900.0, "eta_s": (10 - step) * 0.5})
            events.append({"type": "eval", "time": t, "job": name, "step": step,
                           "eval_loss": loss})
            history[i].append((step, loss))
            events.append(summary())
        if i in PRUNED_TRIALS:
            state[i] = "pruned"
            reason[i] = f"pruned by asha at step {last}: eval_loss {_curve(i, last):.4g}"
        elif i not in RUNNING_TRIALS:
            state[i] = "done"
        if state[i] != "running":
            events.append({"type": "job_state", "time": t, "job": name, "state": state[i],
                           "reason": reason.get(i), "step": last, "total_steps": 10})
            events.append(summary())
    return events


def sweep_state() -> EngineState:
    clock = {"now": T0}
    state = EngineState(clock=lambda: clock["now"])
    state.connected(ENGINE_INFO)
    for seq, event in enumerate(sweep_events(), 1):
        clock["now"] = event["time"]
        state.apply_event(event, seq=seq)
    return state


# -- the state, from a real sweep ---------------------------------------------------------

def test_state_keeps_trials_and_the_latest_summary_of_a_real_sweep(tmp_path, tmp_path_factory):
    from engine.core.config import load_config
    from engine.train.engine import Engine
    from test_sweeps import write_sweep
    from tiny_models import tiny_model_dir

    config = write_sweep(tmp_path, tiny_model_dir("llama", tmp_path_factory))
    Engine(load_config(config)).run()
    out = tmp_path / "out"
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    state = EngineState()
    state.connected({"name": "sweep", "pid": 1})
    for seq, event in enumerate(events, 1):
        state.apply_event(event, seq=seq)
    lrs = [1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1]
    assert sorted(state.jobs) == [f"lr-{i}" for i in range(6)]
    for i, lr in enumerate(lrs):
        job = state.jobs[f"lr-{i}"]
        assert (job.sweep, job.trial, job.params) == ("lr", i, {"lr": lr})
    # The latest summary is the file the engine wrote last: trials ranked, the best named.
    summary = json.loads((out / "sweep-lr.json").read_text())
    assert set(state.sweeps) == {"lr"}
    kept = state.sweeps["lr"]
    assert kept["best"] == summary["best"] and kept["trials"] == summary["trials"]
    pruned = [name for name, job in state.jobs.items() if job.state == "pruned"]
    assert pruned and all(state.jobs[n].finished for n in pruned)
    assert all("pruned by asha at step" in state.jobs[n].reason for n in pruned)
    # Six trials: one group row, unfolded; the trials under it, indented.
    rows = table_rows(list(state.jobs.values()), state.sweeps, "", None, {})
    assert [key for key, _ in rows] == [group_key("lr")] + [f"lr-{i}" for i in range(6)]
    group = rows[0][1]
    assert group["name"] == f"▾ lr: {6 - len(pruned)} done, {len(pruned)} pruned"
    assert group["step"] == "6/6" and group["state"] == "finished"
    assert rows[1][1]["name"] == "  lr-0"
    # The view ranks them as the engine did, the best marked, pruned ones with their rung.
    text = _plain(state)
    order = [line.split()[1] for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert order == [t["job"] for t in summary["trials"]]
    assert f"{summary['best']} *" in text and "asha @ step" in text


def _plain(state: EngineState, width: int = 100) -> str:
    from rich.console import Console
    console = Console(width=width, record=True, color_system=None)
    console.print(sweeps_renderable(state, {}))
    return console.export_text()


def test_sweep_helpers():
    assert sparkline([]) == "-"
    assert sparkline([3.0, 2.0, 1.0]) == "█▄▁"
    assert rung("pruned by asha at step 3: eval_loss 5.526") == "asha @ step 3"
    assert rung("stopped") == "stopped" and rung(None) == ""
    state = sweep_state()
    rows = table_rows(list(state.jobs.values()), state.sweeps, "", None, {})
    # Twelve trials (more than FOLD_OVER): folded, one row for the whole sweep.
    assert TOTAL > FOLD_OVER
    assert [key for key, _ in rows] == ["uppercase", group_key("lr")]
    group = rows[1][1]
    assert group["name"] == "▸ lr: 7 done, 3 pruned"
    assert (group["state"], group["step"]) == ("2 running", "10/12")
    best = state.sweeps["lr"]["best"]
    assert best == "lr-3" and group["eval_loss"] == f"{_curve(3, 10):.4f}"
    # The filter keeps the group while some trial matches.
    rows = table_rows(list(state.jobs.values()), state.sweeps, "lr-1", None, {"lr": True})
    assert [key for key, _ in rows] == [group_key("lr"), "lr-1", "lr-10", "lr-11"]


# -- the screen ---------------------------------------------------------------------------

def _sync(scenario):
    """A Pilot scenario run as a plain test."""
    @functools.wraps(scenario)
    def test():
        asyncio.run(scenario())
    return test


def _keys(app) -> list[str]:
    return [row.key.value for row in app.screen.jobs_table.ordered_rows]


@_sync
async def test_grouped_table_folds_unfolds_and_sorts_within_the_group():
    app = MloraApp(state=sweep_state(), gpu_sampler=FixedGpus(NO_GPU))
    async with app.run_test(size=(80, 24)) as pilot:
        await settled(pilot)
        screen = app.screen
        assert _keys(app) == ["uppercase", group_key("lr")]
        # On the group row no job is selected: the job keys are dimmed.
        await pilot.press("down")
        await settled(pilot)
        assert screen.jobs_table.highlighted_sweep == "lr" and screen.selected is None
        assert screen.check_action("pause", ()) is None
        await pilot.press("enter")
        await settled(pilot)
        trials = [f"lr-{i}" for i in range(TOTAL)]
        assert _keys(app) == ["uppercase", group_key("lr"), *trials]
        assert screen.jobs_table.highlighted_sweep == "lr"
        # Sorted by name, then state, then loss: always within the group.
        await pilot.press("o")
        await settled(pilot)
        assert screen.sort_column == "name"
        assert _keys(app) == [group_key("lr"), *sorted(trials, key=str.lower), "uppercase"]
        while screen.sort_column != "loss":             # the next shown columns
            await pilot.press("o")
        await settled(pilot)
        keys = _keys(app)
        by_loss = sorted(trials, key=lambda n: app.state.jobs[n].loss)
        assert keys[keys.index(group_key("lr")) + 1:][:TOTAL] == by_loss
        # Folded again: the trials leave, the cursor stays on the group.
        screen.jobs_table.move_cursor(row=screen.jobs_table.get_row_index(group_key("lr")))
        await pilot.press("enter")
        await settled(pilot)
        assert set(_keys(app)) == {"uppercase", group_key("lr")}
        assert screen.jobs_table.highlighted_sweep == "lr"


@_sync
async def test_pruned_trial_keys_dimmed_and_w_opens_the_ranked_view():
    app = MloraApp(state=sweep_state(), gpu_sampler=FixedGpus(NO_GPU))
    async with app.run_test(size=(80, 24)) as pilot:
        await settled(pilot)
        screen = app.screen
        screen.unfolded["lr"] = True
        screen.redraw()
        await pilot.pause()
        for name, expected in (("lr-1", None), ("lr-0", None), ("lr-10", True)):
            screen.jobs_table.move_cursor(row=screen.jobs_table.get_row_index(name))
            await settled(pilot)
            assert screen.selected == name
            assert screen.check_action("pause", ()) is expected
            if expected is None:        # pruned or done: nothing to pause, resume, cancel, save
                assert all(screen.check_action(a, ()) is None
                           for a in ("resume", "cancel_job", "save"))
        assert screen.check_action("evaluate", ()) is True      # lr-10 runs
        screen.jobs_table.move_cursor(row=screen.jobs_table.get_row_index("lr-1"))
        await settled(pilot)
        assert screen.check_action("evaluate", ()) is None      # pruned
        assert screen.check_action("sweeps", ()) is True
        await pilot.press("w")
        await pilot.pause()
        assert isinstance(app.screen, SweepScreen)
        table = sweeps_renderable(app.state, {}).renderables[0]
        names = list(table.columns[1].cells)
        ranked = [t["job"] for t in app.state.sweeps["lr"]["trials"]]
        assert [n.removesuffix(" *") for n in names] == ranked and names[0] == "lr-3 *"
        styles = {n.removesuffix(" *"): row.style for n, row in zip(names, table.rows)}
        assert styles["lr-3"] == "bold"
        assert all(styles[f"lr-{i}"] == "dim" for i in PRUNED_TRIALS)
        assert list(table.columns[6].cells)[names.index("lr-1")] == "asha @ step 3"
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is screen


@_sync
async def test_w_is_dimmed_without_a_sweep():
    app = MloraApp(state=recorded_state(), gpu_sampler=FixedGpus(NO_GPU))
    async with app.run_test(size=(120, 40)) as pilot:
        await settled(pilot)
        assert app.screen.check_action("sweeps", ()) is None
        await pilot.press("w")
        await pilot.pause()
        assert not isinstance(app.screen, SweepScreen)


# -- snapshots ----------------------------------------------------------------------------

def test_snapshot_80x24_grouped_table_unfolded(snap_compare):
    async def run_before(pilot):
        await settled(pilot)
        await pilot.press("down", "enter")
        await settled(pilot)

    app = MloraApp(state=sweep_state(), gpu_sampler=FixedGpus(NO_GPU))
    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_snapshot_80x24_grouped_table_folded(snap_compare):
    app = MloraApp(state=sweep_state(), gpu_sampler=FixedGpus(NO_GPU))
    assert snap_compare(app, terminal_size=(80, 24), run_before=settled)


def test_snapshot_80x24_sweep_view(snap_compare):
    async def run_before(pilot):
        await settled(pilot)
        await pilot.press("w")
        await pilot.pause()

    app = MloraApp(state=sweep_state(), gpu_sampler=FixedGpus(NO_GPU))
    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)
