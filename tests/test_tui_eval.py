"""Evaluation scores in the TUI (issue 12): the jobs table's score column, the adapter
pane's scores, and `e`, which asks the engine to evaluate the selected job now.

Fed from the recorded engine state (tests/tui_recorded.py) plus eval events with scores;
what `e` sends is seen by a stand-in client that records its requests (the engine's side of
the request is tested with the engine).
"""

from __future__ import annotations

import asyncio
import io
import time

import pytest

from mlora_tui.app import MloraApp
from mlora_tui.gpu import NO_GPU
from mlora_tui.widgets.jobs_table import COLUMNS, visible_columns
from tui_recorded import T0, FixedGpus, recorded_state, settled

ARC = {"acc": 0.612, "acc_stderr": 0.02, "acc_norm": 0.6305, "acc_norm_stderr": 0.02, "n": 500}
BOOLQ = {"acc": 0.7, "acc_stderr": 0.03, "n": 200}
WIKI = {"loss": 2.5, "perplexity": 12.18, "tokens": 2048}


def scored_state(seq: int = 10_000):
    """The recorded run after an evaluation of uppercase (every task) and sentiment (a
    scores-only event: its eval loss stays unknown)."""
    state = recorded_state()
    state.apply_event({"type": "eval", "time": T0 + 40, "job": "uppercase", "step": 30,
                       "scores": {"arc": ARC, "boolq": BOOLQ, "wiki": WIKI}}, seq=seq)
    state.apply_event({"type": "eval", "time": T0 + 40, "job": "sentiment", "step": 30,
                       "scores": {"arc": {**ARC, "acc": 1.0}}}, seq=seq + 1)
    return state


def cell(app: MloraApp, job: str, column: str) -> str:
    return app.screen.jobs_table.get_cell(job, column).plain.strip()


def shown_columns(app: MloraApp) -> list[str]:
    return [column.key.value for column in app.screen.jobs_table.ordered_columns
            if column.width]


class RecordingClient:
    """Stands in for EngineClient: records the requests the TUI sends."""

    def __init__(self, refuse: str | None = None):
        self.requests: list[tuple[str, str]] = []
        self.refuse = refuse

    async def evaluate_job(self, name: str) -> dict:
        from mlora_tui.client import RequestFailed

        self.requests.append(("evaluate", name))
        if self.refuse:
            raise RequestFailed("bad_request", self.refuse)
        return {}


def test_the_score_column_shows_the_first_tasks_acc_and_only_once_there_are_scores():
    async def scenario():
        state = recorded_state()
        app = MloraApp(state=state, gpu_sampler=FixedGpus(NO_GPU))
        async with app.run_test(size=(200, 50)) as pilot:
            await pilot.pause()
            # No job has scores: no column of dashes.
            assert "score" not in shown_columns(app)
            assert len(shown_columns(app)) == len(COLUMNS) - 1
            # A scores-only event: the column comes, the eval loss stays.
            state.apply_event({"type": "eval", "time": T0 + 40, "job": "uppercase", "step": 30,
                               "scores": {"arc": ARC, "boolq": BOOLQ, "wiki": WIKI}},
                              seq=10_000)
            app.screen.redraw()
            await pilot.pause()
            assert "score" in shown_columns(app)
            assert cell(app, "uppercase", "score") == "61.2%"
            assert cell(app, "uppercase", "eval_loss") == "0.6123"
            assert cell(app, "sentiment", "score") == "-"
            state.apply_event({"type": "eval", "time": T0 + 41, "job": "sentiment",
                               "step": 31, "scores": {"arc": {**ARC, "acc": 1.0}}}, seq=10_100)
            app.screen.redraw()
            await pilot.pause()
            assert cell(app, "sentiment", "score") == "100.0%"      # six cells: fits
            # Sorting by score puts the best first.
            app.screen.sort_column = "score"
            app.screen.redraw()
            await pilot.pause()
            assert [row.key.value for row in app.screen.jobs_table.ordered_rows] == [
                "sentiment", "uppercase", "extract_json"]
    asyncio.run(scenario())


@pytest.mark.parametrize("width, gone", [
    (120, []),
    (100, ["lr"]),
    (90, ["lr", "tokens_per_s", "r"]),
    # At 80 columns the score takes the variant's place.
    (80, ["lr", "tokens_per_s", "r", "variant"]),
    (70, ["lr", "tokens_per_s", "r", "variant", "score"]),
])
def test_the_score_column_drops_after_the_variant_and_before_the_epoch(width, gone):
    every = [key for key, *_ in COLUMNS]

    async def scenario():
        app = MloraApp(state=scored_state(), gpu_sampler=FixedGpus(NO_GPU))
        async with app.run_test(size=(width, 40)) as pilot:
            await pilot.pause()
            assert shown_columns(app) == [key for key in every if key not in gone]
            assert cell(app, "uppercase", "score") == "61.2%"     # hidden or not
    asyncio.run(scenario())
    # The table's own rule, as the widths say (the pane's border and the scroll bar).
    assert "score" in visible_columns(80 - 3) and "score" not in visible_columns(80 - 3, False)


def test_the_adapter_pane_lists_every_tasks_scores():
    async def scenario():
        app = MloraApp(state=scored_state(), gpu_sampler=FixedGpus(NO_GPU))
        async with app.run_test(size=(200, 60)) as pilot:
            await pilot.pause()
            app.screen.jobs_table.move_cursor(row=0)
            await pilot.pause()
            assert app.screen.selected == "uppercase"
            text = _pane_text(app)
            assert "scores" in text and "at step 30" in text
            assert "arc" in text and "acc 61.2%, acc_norm 63.0%, n 500" in text
            assert "boolq" in text and "acc 70.0%, n 200" in text       # no acc_norm
            assert "wiki" in text and "ppl 12.18, 2,048 tokens" in text
            # The scores come before the settings, so a short pane shows them.
            assert text.index("arc") < text.index("lora_alpha")
            app.screen.jobs_table.move_cursor(row=2)                     # no scores yet
            await pilot.pause()
            assert app.screen.selected == "extract_json"
            assert "scores" not in _pane_text(app)
    asyncio.run(scenario())


def _pane_text(app: MloraApp) -> str:
    from rich.console import Console

    body = app.screen.adapter_pane._body
    table = getattr(body, "content", None) or body.renderable
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


async def _requests_done(pilot, app: MloraApp) -> None:
    """Wait for the request workers (not the GPU sampler, which runs for good)."""
    deadline = time.monotonic() + 10
    while any(worker.group == "requests" and not worker.is_finished
              for worker in app.workers) and time.monotonic() < deadline:
        await pilot.pause(0.02)
    await pilot.pause()


def test_e_asks_the_engine_to_evaluate_the_selected_job_and_shows_a_refusal():
    async def scenario():
        app = MloraApp(state=scored_state(), gpu_sampler=FixedGpus(NO_GPU))
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            app.client = client = RecordingClient()
            app.screen.jobs_table.move_cursor(row=1)
            await pilot.pause()
            assert app.screen.selected == "sentiment"
            assert app.screen.active_bindings["e"].enabled
            await pilot.press("e")
            await _requests_done(pilot, app)
            assert client.requests == [("evaluate", "sentiment")]
            assert any(line.message == "sentiment: evaluation requested"
                       for line in app.state.logs)
            # The engine's refusal is a notice and a log line, named by the request.
            app.client = RecordingClient(refuse="job 'sentiment' has no eval tasks")
            await pilot.press("e")
            await _requests_done(pilot, app)
            await pilot.pause()
            assert any(line.level == "error" and line.message ==
                       "evaluate sentiment: job 'sentiment' has no eval tasks"
                       for line in app.state.logs)
            # Disconnected: `e` is dimmed and sends nothing.
            app.client = client
            app.state.disconnected("gone")
            app.screen.redraw()
            await pilot.pause()
            assert not app.screen.active_bindings["e"].enabled
            await pilot.press("e")
            await pilot.pause()
            assert client.requests == [("evaluate", "sentiment")]
    asyncio.run(scenario())


def test_e_is_in_the_footer_and_the_help():
    async def scenario():
        app = MloraApp(state=scored_state(), gpu_sampler=FixedGpus(NO_GPU))
        async with app.run_test(size=(200, 50)) as pilot:
            await pilot.pause()
            assert any(key.key == "e" and key.description == "Eval"
                       for key in app.screen.query("FooterKey"))
            assert any(binding_id == "evaluate" and keys == "e"
                       for keys, _, _, binding_id in app._help_rows())
    asyncio.run(scenario())


def test_layout_80x24_with_scores(snap_compare, utc):
    app = MloraApp(state=scored_state(), gpu_sampler=FixedGpus(NO_GPU))
    assert snap_compare(app, terminal_size=(80, 24), run_before=settled)


def test_layout_80x24_adapter_tab_with_scores(snap_compare, utc):
    async def run_before(pilot):
        await settled(pilot)
        await pilot.press("2")
        await settled(pilot)

    app = MloraApp(state=scored_state(), gpu_sampler=FixedGpus(NO_GPU))
    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_mlora_jobs_list_shows_the_eval_loss_and_the_first_tasks_acc():
    from rich.console import Console

    from mlora_tui.commands.engines import print_jobs

    out = io.StringIO()
    base = {"variant": "lora", "adapter": {}, "state": "done", "total_steps": 10, "step": 10,
            "loss": 0.5}
    print_jobs(Console(file=out, width=200, color_system=None, highlight=False), [
        {**base, "name": "a", "eval_loss": 0.75, "scores": {"wiki": WIKI, "arc": ARC}},
        {**base, "name": "b", "eval_loss": None, "scores": {}},
        {**base, "name": "c"},                        # an older engine: no scores at all
    ])
    a, b, c = out.getvalue().splitlines()
    assert a.endswith("loss 0.5000  val 0.7500  arc 61.2%")
    assert b.endswith("loss 0.5000") and c.endswith("loss 0.5000")
