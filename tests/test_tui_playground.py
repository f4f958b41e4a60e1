"""The TUI's playground (mlora_tui/widgets/playground.py), driven by Pilot.

Standalone (``mlora-tui --playground DIR...``): the screen loads a tiny llama and two PEFT
adapters itself, in a worker thread, and its greedy answers equal ``generate_many``'s for the
chosen rows. Against a real engine (key `g`): two jobs answer while the engine trains, each
column titled with the step its weights are from, the step the engine reported.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from mlora_tui.widgets.playground import AnswerColumn, PlaygroundApp, PlaygroundScreen
from tiny_models import tiny_model_dir
from tui_engine import engine_env, private_runtime_dir, stop_engine, until, write_run

PROMPT = "Say hi"
MAX_NEW = 6


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_model_dir("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> list[Path]:
    from test_engine_exactness import peft_initial_adapter

    root = tmp_path_factory.mktemp("pg_adapters")
    return [peft_initial_adapter(tiny_llama, root / "alpha"),
            peft_initial_adapter(tiny_llama, root / "beta", use_rslora=True)]


def columns(app) -> dict[str, AnswerColumn]:
    return app.screen.columns


async def type_prompt(pilot, text: str) -> None:
    for ch in text:
        await pilot.press("space" if ch == " " else ch)


def test_standalone_playground_answers_equal_generate_many(adapters):
    from engine.train.generate import generate_many

    async def scenario():
        app = PlaygroundApp(adapters)
        async with app.run_test(size=(80, 24)) as pilot:
            screen = app.screen
            assert isinstance(screen, PlaygroundScreen)
            rows = screen.rows_list
            # base, alpha (the first adapter, chosen), beta
            assert [str(rows.get_option_at_index(i).prompt) for i in range(3)] == \
                ["base", "alpha", "beta"]
            assert list(rows.selected) == ["alpha"]
            assert "template alpaca" in str(screen.prompt_box.border_subtitle)
            await type_prompt(pilot, PROMPT)
            assert screen.prompt_box.text == PROMPT
            # Choose beta too, with space in the list.
            rows.focus()
            rows.highlighted = 2
            await pilot.press("space")
            assert sorted(rows.selected) == ["alpha", "beta"]
            max_box = screen.query_one("#pg-max")
            max_box.value = str(MAX_NEW)
            screen.prompt_box.focus()
            await pilot.press("ctrl+enter")
            await until(pilot, lambda: not screen.busy and set(columns(app)) == {"alpha", "beta"}
                        and all(c.text for c in columns(app).values())
                        and str(screen.status.render()) == "done", 120, "both answers")
            shown = {name: column.text for name, column in columns(app).items()}
            # Side by side at 80 columns: two columns of at least MIN_COLUMN cells fit.
            assert screen.answers.styles.grid_size_columns == 2
        return shown

    shown = asyncio.run(scenario())
    expected = {g.name: g.text for g in generate_many(adapters, PROMPT,
                                                      max_new_tokens=MAX_NEW)}
    assert shown == expected


def test_standalone_playground_refuses_an_empty_prompt_and_no_rows(adapters):
    async def scenario():
        app = PlaygroundApp(adapters[:1])
        async with app.run_test(size=(80, 24)) as pilot:
            screen = app.screen
            await pilot.press("ctrl+enter")
            assert "type a prompt" in str(screen.status.render())
            await type_prompt(pilot, "x")
            screen.rows_list.deselect_all()
            await pilot.press("ctrl+enter")
            assert "choose at least one row" in str(screen.status.render())
            screen.rows_list.select_all()
            screen.query_one("#pg-max").value = "0"
            await pilot.press("ctrl+enter")
            assert "max tokens must be 1 to" in str(screen.status.render())
            await pilot.press("escape")
        assert app.return_code in (0, None)
    asyncio.run(scenario())


def test_entry_checks_the_folders_before_any_screen(tmp_path):
    from typer.testing import CliRunner

    from mlora_tui.tui_entry import cli

    result = CliRunner().invoke(cli, ["--playground", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such folder" in result.output
    result = CliRunner().invoke(cli, ["--playground", str(tmp_path)])
    assert result.exit_code == 2 and "not an adapter folder" in result.output
    result = CliRunner().invoke(cli, ["--playground"])
    assert result.exit_code == 2 and "at least one adapter folder" in result.output


# -- against a running engine -------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama):
    from mlora_tui.launcher import ensure_engine

    runtime = private_runtime_dir()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in engine_env(runtime).items():
            mp.setenv(name, value)
        config = write_run(tmp_path_factory.mktemp("pg-run"), tiny_llama,
                           {"one": {}, "two": {"use_rslora": True}})
        record = ensure_engine(config)
        try:
            yield record
        finally:
            stop_engine(record)
            shutil.rmtree(runtime, ignore_errors=True)


def test_g_opens_the_playground_and_two_jobs_answer_while_the_engine_trains(run):
    from mlora_tui.app import MloraApp
    from tui_engine import status
    from tui_recorded import FixedGpus

    record = run

    async def scenario():
        app = MloraApp(lambda: record, gpu_sampler=FixedGpus())
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: app.screen.jobs_table.row_count == 2, 30, "two rows")
            await until(pilot, lambda: app.state.jobs["one"].step > 2, 30, "a few steps")
            assert app.screen.selected == "one"
            await pilot.press("g")
            screen = app.screen
            assert isinstance(screen, PlaygroundScreen)
            assert list(screen.rows_list.selected) == ["one"]     # the selected job
            assert "template none (one)" in str(screen.prompt_box.border_subtitle)
            await type_prompt(pilot, "Copy.")
            screen.rows_list.highlighted = 2
            screen.rows_list.focus()
            await pilot.press("space")
            screen.query_one("#pg-max").value = "24"
            await pilot.press("ctrl+enter")
            await until(pilot, lambda: set(screen.columns) == {"one", "two"} and
                        all(c.text for c in screen.columns.values()) and not screen.busy,
                        60, "both jobs' answers")
            assert str(screen.status.render()) == "done"
            titles = {name: str(c.border_title) for name, c in screen.columns.items()}
            steps = {name: int(title.rsplit("step ", 1)[1]) for name, title in titles.items()}
            assert all(step > 2 for step in steps.values()), titles
            assert all(c.border_subtitle in ("eos", "length") for c in screen.columns.values())
            # The engine trained on meanwhile.
            one = next(j for j in (await status(record))["jobs"] if j["name"] == "one")
            assert one["step"] > steps["one"] and one["state"] == "running"
            await pilot.press("escape")
            assert not isinstance(app.screen, PlaygroundScreen)
    asyncio.run(scenario())
