"""The TUI driven by Pilot against a real engine on a tiny llama.

One engine serves the module (starting one costs seconds); each test acts on its own job
so that the tests do not depend on each other's order, except the last, which stops the
engine to see the TUI notice and come back to a new one. What a key did is checked with a
separate client asking the engine, never only by what the TUI shows.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from textual.command import CommandPalette

from engine.core.runtime import EngineRecord

from mlora_tui.app import MloraApp
from mlora_tui.launcher import ensure_engine
from mlora_tui.state import CONNECTED, DISCONNECTED
from mlora_tui.widgets.add_adapters import AddAdaptersScreen
from mlora_tui.widgets.confirm import ConfirmScreen
from mlora_tui.widgets.help_screen import HelpScreen
from tiny_models import tiny_model_dir
from tui_engine import (adapter_table, engine_env, private_runtime_dir, stop_engine, until,
                        until_job, write_run)
from tui_recorded import FixedGpus

JOBS = {"watch": {}, "pauseme": {"r": 2, "use_rslora": True}, "cancelme": {"use_dora": True}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config path, engine record) of an engine training three jobs for minutes."""
    runtime = private_runtime_dir()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in engine_env(runtime).items():
            mp.setenv(name, value)
        model = tiny_model_dir("llama", tmp_path_factory)
        config = write_run(tmp_path_factory.mktemp("tui-run"), model, JOBS)
        record = ensure_engine(config)
        try:
            yield config, record
        finally:
            stop_engine(record)
            shutil.rmtree(runtime, ignore_errors=True)


def app_for(record: EngineRecord) -> MloraApp:
    return MloraApp(lambda: record, gpu_sampler=FixedGpus())


def cell(app: MloraApp, job: str, column: str) -> str:
    return app.screen.jobs_table.get_cell(job, column).plain.strip()


async def select(pilot, app: MloraApp, job: str) -> None:
    """Put the cursor on ``job``'s row, as the arrow keys would."""
    table = app.screen.jobs_table
    await until(pilot, lambda: table.is_valid_row_index(0) and job in
                {row.key.value for row in table.ordered_rows}, 20, f"the row of {job}")
    table.move_cursor(row=table.get_row_index(job))
    await until(pilot, lambda: app.screen.selected == job, 5, f"{job} selected")


def test_entry_reports_mistakes_before_any_screen(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mlora_tui.tui_entry import cli

    monkeypatch.setenv("MLORA_RUNTIME_DIR", str(tmp_path / "runtime"))
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nbase_model = "x"\n[[adapter]]\nname = "a"\ndata = "d.jsonl"\nrank = 3\n')
    runner = CliRunner()
    result = runner.invoke(cli, [str(bad)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{bad} [model] base_model" in result.output
    result = runner.invoke(cli, ["--attach", "nosuch"])
    assert result.exit_code == 3 and "no engine named 'nosuch'" in result.output
    keymap = tmp_path / "keys.toml"
    keymap.write_text('pauze = "z"\n')
    result = runner.invoke(cli, [str(bad), "--keymap", str(keymap)])
    assert result.exit_code == 2
    result = runner.invoke(cli, ["--attach", "x", str(bad)])
    assert result.exit_code == 2 and "not both" in result.output


def test_keymap_file_names_unknown_ids_and_bad_values(tmp_path):
    from engine.core.errors import UserError
    from mlora_tui.app import binding_ids
    from mlora_tui.tui_entry import load_keymap

    path = tmp_path / "keys.toml"
    path.write_text('pause = "space"\nstop = "ctrl+x"\n')
    assert load_keymap(path, binding_ids()) == {"pause": "space", "stop": "ctrl+x"}
    path.write_text('pauze = "z"\n')
    with pytest.raises(UserError, match="'pauze' is not a key binding id; known: .*pause"):
        load_keymap(path, binding_ids())
    path.write_text('pause = 3\n')
    with pytest.raises(UserError, match="pause must be a string of keys"):
        load_keymap(path, binding_ids())


def test_rows_appear_and_losses_update(run):
    _, record = run

    async def scenario():
        app = app_for(record)
        async with app.run_test(size=(160, 45)) as pilot:
            await until(pilot, lambda: app.screen.jobs_table.row_count == 3, 20, "three rows")
            assert [row.key.value for row in app.screen.jobs_table.ordered_rows] == list(JOBS)
            await until(pilot, lambda: cell(app, "watch", "loss") != "-", 20, "a loss")
            first_step = int(cell(app, "watch", "step").split("/")[0])
            first_loss = cell(app, "watch", "loss")
            await until(pilot, lambda: int(cell(app, "watch", "step").split("/")[0])
                        > first_step + 5, 20, "the step to move on")
            assert cell(app, "watch", "loss") != first_loss
            assert cell(app, "watch", "state") == "running"
            assert cell(app, "watch", "variant") == "lora"
            assert cell(app, "pauseme", "variant") == "lora+rslora"
            # The history behind the chart starts at the first step: replayed on connect.
            history = app.state.jobs["watch"].history
            assert history[0][0] == 1 and len(history) > 5
            assert app.screen.loss_chart.border_title == "Loss · watch"
            assert "● live" in str(app.screen.status_bar.render())
            # s: a checkpoint now (the run's save_step is never reached).
            await pilot.press("s")
            await until(pilot, lambda: any(line.message.startswith("watch: checkpoint at step")
                                           for line in app.state.logs), 20, "a checkpoint")
            # Every job at one step: the checkpoint holds a folder for "watch".
            assert list((Path(record.output_dir) / "checkpoints").glob("step-*/watch"))
    asyncio.run(scenario())


def test_pause_and_resume_keys_change_the_engine_and_dim_what_does_not_apply(run):
    _, record = run

    async def scenario():
        app = app_for(record)
        async with app.run_test(size=(160, 45)) as pilot:
            await until(pilot, lambda: "pauseme" in app.state.jobs and
                        app.state.jobs["pauseme"].state == "running", 20, "pauseme running")
            await select(pilot, app, "pauseme")
            keys = app.screen.active_bindings
            assert keys["p"].enabled and not keys["r"].enabled      # resume is dimmed
            await pilot.press("r")                   # dimmed: does nothing, asks nothing
            await pilot.pause()
            assert not any("resume" in line.message for line in app.state.logs)

            await pilot.press("p")
            await until_job(pilot, record, "pauseme", "paused")
            await until(pilot, lambda: cell(app, "pauseme", "state") == "paused", 10,
                        "the row to say paused")
            await until(pilot, lambda: app.screen.active_bindings["r"].enabled, 5,
                        "resume to light up")
            assert not app.screen.active_bindings["p"].enabled
            await pilot.press("r")
            await until_job(pilot, record, "pauseme", "running")
            # Rows are updated in place, never rebuilt: the cursor stayed on its job
            # through every redraw since it was put there.
            assert app.screen.jobs_table.highlighted_job == "pauseme"
            assert app.screen.jobs_table.cursor_row == 1
    asyncio.run(scenario())


def test_cancel_asks_first_and_then_cancels_only_that_job(run):
    _, record = run

    async def scenario():
        app = app_for(record)
        async with app.run_test(size=(160, 45)) as pilot:
            await until(pilot, lambda: app.screen.jobs_table.row_count == 3, 20, "rows")
            await select(pilot, app, "cancelme")
            await pilot.press("x")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")                   # backing out changes nothing
            assert not isinstance(app.screen, ConfirmScreen)
            await pilot.press("x")
            await pilot.press("y")
            job = await until_job(pilot, record, "cancelme", "cancelled")
            assert job["reason"] == "cancelled by user"
            await until(pilot, lambda: cell(app, "cancelme", "state") == "cancelled", 10,
                        "the row to say cancelled")
            await until(pilot, lambda: not app.screen.active_bindings["x"].enabled, 5,
                        "cancel to dim for a finished job")
            watch = await until_job(pilot, record, "watch", "running")
            assert watch["state"] == "running"
    asyncio.run(scenario())


def test_add_adapters_shows_the_engines_error_in_place_then_adds(run, tmp_path):
    config, record = run
    data = Path(config).parent / "copy.jsonl"
    bad = tmp_path / "bad.toml"
    bad.write_text(adapter_table("added", data, rank=3))
    good = tmp_path / "good.toml"
    good.write_text(adapter_table("added", data, num_epochs=1))

    async def scenario():
        app = app_for(record)
        async with app.run_test(size=(160, 45)) as pilot:
            await until(pilot, lambda: app.state.connection == CONNECTED, 20, "connection")
            await pilot.press("a")
            modal = app.screen
            assert isinstance(modal, AddAdaptersScreen)
            modal.query_one("#path").value = str(bad)
            await pilot.press("enter")
            error = modal.query_one("#error")
            await until(pilot, lambda: "rank" in str(error.render()), 20, "the engine's error")
            text = str(error.render())
            assert str(bad) in text and 'did you mean "r"' in text
            assert app.screen is modal                       # still open, to fix the file
            modal.query_one("#path").value = str(good)
            await pilot.press("enter")
            await until(pilot, lambda: not isinstance(app.screen, AddAdaptersScreen), 20,
                        "the modal to close")
            await until_job(pilot, record, "added", "done", timeout=30)
            await until(pilot, lambda: app.screen.jobs_table.row_count == 4, 10, "a fourth row")
    asyncio.run(scenario())


def test_filter_help_and_overlay(run):
    _, record = run

    async def scenario():
        app = app_for(record)
        async with app.run_test(size=(160, 45)) as pilot:
            table = app.screen.jobs_table
            await until(pilot, lambda: table.row_count >= 3, 20, "rows")
            await pilot.press("slash", "p", "a", "u")
            await until(pilot, lambda: table.row_count == 1, 5, "the filter")
            assert table.ordered_rows[0].key.value == "pauseme"
            await pilot.press("escape")
            await until(pilot, lambda: table.row_count >= 3, 5, "every row back")
            assert [r.key.value for r in table.ordered_rows][:3] == list(JOBS)   # in order
            await pilot.press("l")
            assert app.screen.loss_chart.border_title == "Loss · all adapters"
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            shown = {key: (description, enabled, binding_id)
                     for key, description, enabled, binding_id in app.screen.rows}
            assert shown["p"][0].startswith("Take the selected job out")
            assert shown["S"][0].startswith("Stop the engine") and shown["S"][2] == "stop"
            await pilot.press("escape")
            assert not isinstance(app.screen, HelpScreen)
            await select(pilot, app, "watch")
            await pilot.press("ctrl+p")
            assert isinstance(app.screen, CommandPalette)
            monitor = app.screen_stack[-2]
            titles = [command.title for command in app.get_system_commands(monitor)]
            assert "Pause watch" in titles and "Resume watch" not in titles   # it runs
            await pilot.press("escape")
    asyncio.run(scenario())


def test_remapped_keys_work_and_show_in_help(run):
    _, record = run

    async def scenario():
        app = MloraApp(lambda: record, gpu_sampler=FixedGpus(), keymap={"pause": "z"})
        async with app.run_test(size=(160, 45)) as pilot:
            await until(pilot, lambda: app.screen.jobs_table.row_count >= 3, 20, "rows")
            keys = app.screen.active_bindings
            assert "z" in keys and keys["z"].binding.action == "pause" and "p" not in keys
            await pilot.press("question_mark")
            assert ("z", "pause") in {(key, binding_id) for key, _, _, binding_id in app.screen.rows}
    asyncio.run(scenario())


def test_quit_leaves_the_engine_and_stop_ends_it_then_the_tui_finds_the_next_one(run):
    """Last: the TUI shows a stopped engine as disconnected, with the time of its last
    update, and reconnects by itself to the engine started again for the same run."""
    config, record = run

    async def scenario():
        app = app_for(record)
        async with app.run_test(size=(160, 45)) as pilot:
            await until(pilot, lambda: app.state.connection == CONNECTED and app.state.model,
                        20, "a live engine")
            await pilot.press("S")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await until(pilot, lambda: app.state.connection == DISCONNECTED, 30,
                        "the engine to go")
            await pilot.pause(0.3)
            status = str(app.screen.status_bar.render())
            assert "engine disconnected" in status and "last update" in status
            assert "stop requested by a client" in status
            # The same run continued: a new process, pid and socket. (Without resume the
            # folder, which holds that run, is refused.)
            from engine.core.errors import UserError
            with pytest.raises(UserError, match="already holds a run"):
                ensure_engine(config)
            second = await asyncio.to_thread(ensure_engine, config, resume=True)
            try:
                assert second.pid != record.pid
                await until(pilot, lambda: app.state.connection == CONNECTED and
                            app.state.engine.get("pid") == second.pid, 30, "reconnection")
                await until(pilot, lambda: app.screen.jobs_table.row_count >= 3, 20, "rows")
            finally:
                await pilot.press("q")
                await asyncio.to_thread(stop_engine, second)
        assert app.return_code == 0
    asyncio.run(scenario())
