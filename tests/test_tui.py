"""The TUI driven by Pilot against a real engine on a tiny llama.

One engine serves the module (starting one costs seconds); each test acts on its own job
so that the tests do not depend on each other's order, except the last, which stops the
engine to see the TUI notice and come back to a new one. What a key did is checked with a
separate client asking the engine, never only by what the TUI shows.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest
from textual.command import CommandPalette

from engine.core.runtime import EngineRecord

from mlora_tui.app import MloraApp
from mlora_tui.gpu import NO_GPU
from mlora_tui.launcher import ensure_engine
from mlora_tui.state import CONNECTED, DISCONNECTED
from mlora_tui.widgets.add_adapters import AddAdaptersScreen
from mlora_tui.widgets.confirm import ConfirmScreen
from mlora_tui.widgets.help_screen import HelpScreen
from mlora_tui.widgets.jobs_table import COLUMNS, DROP_ORDER, JobsTable
from tiny_models import tiny_model_dir
from tui_engine import (adapter_table, engine_env, private_runtime_dir, stop_engine, until,
                        until_job, write_run)
from tui_recorded import FixedGpus, recorded_state

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


# -- layout, sorting, mouse and colours, on a recorded state (no engine) ----------------

def recorded_app(gpus=NO_GPU) -> MloraApp:
    return MloraApp(state=recorded_state(), gpu_sampler=FixedGpus(gpus))


def shown_columns(app: MloraApp) -> list[str]:
    return [column.key.value for column in app.screen.jobs_table.ordered_columns
            if column.width]


def row_order(app: MloraApp) -> list[str]:
    return [row.key.value for row in app.screen.jobs_table.ordered_rows]


def test_columns_drop_by_priority_and_the_screen_changes_shape_when_small():
    # The recorded run has no eval scores: no score column (tests/test_tui_eval.py).
    every = [key for key, *_ in COLUMNS if key != "score"]
    kept = ["name", "state", "step", "loss", "eval_loss", "eta"]

    async def scenario():
        app = recorded_app()
        async with app.run_test(size=(200, 60)) as pilot:
            await pilot.pause()
            screen = app.screen
            assert shown_columns(app) == every
            assert not screen.has_class("-small") and not screen.pane_tabs.display
            # Every detail pane side by side.
            assert all(pane.region.height > 0 for pane in (screen.loss_chart, screen.adapter_pane,
                                                           screen.backend_pane, screen.log_pane))
            await pilot.resize_terminal(120, 30)          # the smallest that is large
            await pilot.pause()
            assert not screen.pane_tabs.display and screen.backend_pane.display
            for width, gone in ((100, []), (90, ["lr", "tokens_per_s"]),
                                (80, ["lr", "tokens_per_s", "r", "variant"]),
                                (60, [key for key in DROP_ORDER if key != "score"])):
                await pilot.resize_terminal(width, 40)
                await pilot.pause()
                assert shown_columns(app) == [key for key in every if key not in gone], width
            assert set(kept) <= set(shown_columns(app))
            # The table kept its keys: cells are still found by column key.
            assert cell(app, "uppercase", "lr") == "7.5e-04"
            await pilot.resize_terminal(80, 24)
            await pilot.pause()
            assert screen.has_class("-small") and screen.pane_tabs.display
            # The status line gave up the app's name and the pid for the job counts.
            status = str(screen.status_bar.render())
            assert "mlora-tui" not in status and "1 paused" in status
            # One detail pane at a time, at full width, chosen by tab or by 1-4.
            assert screen.loss_chart.region.width == 80 and not screen.log_pane.display
            await pilot.press("4")
            await pilot.pause()
            assert screen.log_pane.display and screen.log_pane.region.width == 80
            assert not screen.loss_chart.display and app.focused is screen.log_pane
            await pilot.click("#tab-backend")
            await pilot.pause()
            assert screen.backend_pane.display and not screen.log_pane.display
            await pilot.resize_terminal(160, 24)            # wide but short: small too
            await pilot.pause()
            assert screen.has_class("-short") and screen.pane_tabs.display
            await pilot.resize_terminal(160, 45)
            await pilot.pause()
            assert screen.log_pane.display and screen.loss_chart.display
    asyncio.run(scenario())


def test_paths_are_shortened_in_the_middle():
    from mlora_tui.widgets.formatting import shorten_middle

    path = "/home/someone/work/configs/data/uppercase.jsonl"
    assert shorten_middle(path, 60) == path
    assert shorten_middle(path, 30) == "…/configs/data/uppercase.jsonl"
    assert shorten_middle(path, 20) == "…/uppercase.jsonl"
    assert shorten_middle(path, 10) == "…ase.jsonl"
    assert shorten_middle("abcdefghij", 5) == "ab…ij"


def test_o_cycles_the_sort_column_and_the_cursor_stays_on_its_job():
    async def scenario():
        app = recorded_app()
        async with app.run_test(size=(160, 45)) as pilot:
            await pilot.pause()
            screen = app.screen
            assert row_order(app) == ["uppercase", "sentiment", "extract_json"]
            await pilot.press("down")
            assert screen.selected == "sentiment"
            await pilot.press("o")                  # by name
            await pilot.pause()
            assert row_order(app) == ["extract_json", "sentiment", "uppercase"]
            assert screen.jobs_table.highlighted_job == "sentiment" == screen.selected
            assert screen.jobs_pane.border_title == "Jobs · by adapter"
            seen = {}
            for _ in range(len(screen.jobs_table.shown_columns)):   # no score: no scores
                await pilot.press("o")
                await pilot.pause()
                seen[screen.sort_column] = row_order(app)
                assert screen.selected == "sentiment"
            # Running jobs first, then paused; losses ascending; unknown values last.
            assert seen["state"] == ["uppercase", "sentiment", "extract_json"]
            assert seen["loss"] == ["sentiment", "uppercase", "extract_json"]
            assert seen["eval_loss"][0] == "uppercase"
            assert seen["eta"] == ["sentiment", "uppercase", "extract_json"]
            assert screen.sort_column is None           # round again: the added order
            assert row_order(app) == ["uppercase", "sentiment", "extract_json"]
            # Clicking a column's header sorts by it.
            table = screen.jobs_table
            x = sum(column.width for column in table.ordered_columns[:6]) + 2
            assert table.ordered_columns[6].key.value == "loss"
            await pilot.click(JobsTable, offset=(x, 0))
            await pilot.pause()
            assert screen.sort_column == "loss" and row_order(app)[0] == "sentiment"
    asyncio.run(scenario())


def test_clicking_a_row_selects_its_job_and_clicking_a_pane_focuses_it():
    async def scenario():
        app = recorded_app()
        async with app.run_test(size=(160, 45)) as pilot:
            await pilot.pause()
            screen = app.screen
            await pilot.click(JobsTable, offset=(4, 3))    # the header, then rows
            await pilot.pause()
            assert screen.selected == "extract_json"
            assert screen.adapter_pane.border_title == "Adapter extract_json"
            for pane in (screen.backend_pane, screen.loss_chart, screen.adapter_pane,
                         screen.log_pane):
                await pilot.click(f"#{pane.id}", offset=(3, 2))
                await pilot.pause()
                assert pane.has_focus_within if pane is screen.adapter_pane else \
                    app.focused is pane, pane.id
            # Job keys still act on the selected job while a pane has the focus.
            assert screen.active_bindings["p"].enabled is False     # it is paused
            assert screen.active_bindings["r"].enabled
    asyncio.run(scenario())


def test_l_and_e_toggle_the_charts_log_scale_and_smoothing():
    async def scenario():
        app = recorded_app()
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            chart = app.screen.loss_chart
            assert not chart.log_scale and not chart.smoothing
            await pilot.press("L", "E")
            assert chart.log_scale and chart.smoothing
            await pilot.press("L")
            assert not chart.log_scale and chart.smoothing
    asyncio.run(scenario())


def _ansi(app: MloraApp, color_system: str) -> str:
    """The screen as a terminal of ``color_system`` receives it, after the app's filters
    (NO_COLOR's among them)."""
    from io import StringIO

    from rich.console import Console
    from rich.segment import Segments
    from textual.color import Color

    console = Console(file=StringIO(), force_terminal=True, color_system=color_system,
                      width=app.size.width, legacy_windows=False)
    for strip in app.screen._compositor.render_strips():
        for line_filter in app._filters:
            strip = strip.apply_filter(line_filter, Color(0, 0, 0))
        console.print(Segments(list(strip)))
    return console.file.getvalue()


@pytest.mark.parametrize("setting", ["256", "no_color"])
def test_renders_in_256_colours_and_with_no_color(monkeypatch, setting):
    if setting == "no_color":
        monkeypatch.setenv("NO_COLOR", "1")

    async def scenario():
        app = recorded_app()
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.3)
            app.screen.redraw(force=True)
            await pilot.pause()
            out = _ansi(app, "256" if setting == "256" else "truecolor")
            plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
            # What colour says, words say too: every state, and whether it is live.
            for word in ("running", "paused", "● live", "uppercase", "extract_json"):
                assert word in plain
            if setting == "256":
                assert "38;5;" in out and "38;2;" not in out and "48;2;" not in out
            else:
                assert app.no_color
                colours = re.findall(r"[34]8;2;(\d+);(\d+);(\d+)", out)
                assert all(r == g == b for r, g, b in colours)      # greys at most
                assert not re.search(r"[34]8;5;", out)
                # The job under the cursor still stands out: in bold.
                assert re.search(r"\x1b\[1m uppercase", out)
    asyncio.run(scenario())


def test_a_theme_switch_redraws_every_pane_in_the_new_palette():
    from textual.color import Color

    async def scenario():
        app = recorded_app()
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()

            def state_colour() -> str:
                cell = app.screen.jobs_table.get_cell("uppercase", "state")
                return str(cell.spans[0].style).lower()

            assert app.theme_variables["success"].lower() in state_colour()
            before = app.theme_variables["success"].lower()
            # A light and a dark theme, each with a "success" colour of its own.
            for theme in ("solarized-light", "nord"):
                # A modal covers the screen meanwhile, as the palette (where themes are
                # chosen) does.
                await pilot.press("question_mark")
                assert isinstance(app.screen, HelpScreen)
                app.theme = theme
                await pilot.pause()
                await pilot.press("escape")
                await pilot.pause(0.3)
                success = app.theme_variables["success"].lower()
                assert success != before and success in state_colour(), theme
                before = success
                # "● live" in the status line, drawn in Python from the theme's colours.
                r, g, b = Color.parse(success).rgb
                status_line = _ansi(app, "truecolor").splitlines()[0]
                assert re.search(rf"38;2;{r};{g};{b}[;0-9]*m● live", status_line), theme
                assert app.screen.log_pane.lines        # written again, not lost
    asyncio.run(scenario())


def test_readme_key_table_lists_every_key_of_the_monitor_screen_as_bound():
    """One table of keys: README's says what the bindings say (keys and ids)."""
    from mlora_tui.app import MonitorScreen

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("### The TUI's keys", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`"):
            keys = re.findall(r"`([^`]+)`", cells[0])
            ids = re.findall(r"`([^`]+)`", cells[1])
            rows.update(zip(ids, keys))
    display = {"question_mark": "?", "slash": "/"}
    for binding in [*MloraApp.BINDINGS, *MonitorScreen.BINDINGS]:
        if binding.id == "clear-filter":
            assert "`esc` clears it: `clear-filter`" in table
            continue
        assert rows.get(binding.id) == display.get(binding.key, binding.key), binding.id


def test_the_name_column_grows_into_spare_width_for_long_names():
    from tui_recorded import ADAPTERS, T0

    name = "lr3e-4_r16_rslora_seed2"        # a sweep's kind of name
    state = recorded_state()
    state.apply_event({"type": "job_added", "time": T0 + 40, "job": name,
                       "adapter": {**ADAPTERS[0][0], "name": name}, "total_steps": 10,
                       "train_examples": 40, "val_examples": 0, "targets": ["q_proj"]},
                      seq=10_000)

    async def scenario():
        app = MloraApp(state=state, gpu_sampler=FixedGpus(NO_GPU))
        async with app.run_test(size=(200, 40)) as pilot:
            await pilot.pause()
            table = app.screen.jobs_table
            assert table.columns["name"].width == len(name) + 1     # the whole name
            await pilot.resize_terminal(100, 40)                    # no room to spare
            await pilot.pause()
            assert table.columns["name"].width == COLUMNS[0][2] + 1
    asyncio.run(scenario())
