"""One variant label for one adapter, wherever it is shown: `mlora validate`, `mlora jobs
list` (text and JSON), the progress lines of `mlora run`, and the TUI's job view (fed by the
engine's status replies and its events, in either order).

The expected labels are written out here, as issue 11 spells them (the kind, then
``+rslora`` and ``+loraplus`` when set), not computed by the code under test. One real
engine on a tiny llama trains one job of each variant.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
from dataclasses import asdict

import pytest
from rich.console import Console
from typer.testing import CliRunner

from engine.core.config import load_config
from engine.core.jobs import variant_label
from mlora_tui.cli import app
from mlora_tui.client import EngineClient
from mlora_tui.launcher import ensure_engine
from mlora_tui.progress import RunProgress
from mlora_tui.state import EngineState
from mlora_tui.widgets.jobs_table import row_cells
from tiny_models import tiny_model_dir
from tui_engine import engine_env, private_runtime_dir, stop_engine, write_run

# MixLoRA's experts live on the feed-forward projections.
FFN = {"target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]}
# job name -> (its [[adapter]] settings, the label every front end must show)
VARIANTS = {
    "plain": ({}, "lora"),
    "rslora": ({"use_rslora": True}, "lora+rslora"),
    "dora": ({"use_dora": True}, "dora"),
    "loraplus": ({"loraplus_lr_ratio": 4.0}, "lora+loraplus"),
    "all-three": ({"use_dora": True, "use_rslora": True, "loraplus_lr_ratio": 4.0},
                  "dora+rslora+loraplus"),
    "mixlora": ({**FFN, "routing_strategy": "mixlora", "num_experts": 2, "top_k": 1},
                "mixlora"),
    "switch": ({**FFN, "routing_strategy": "mixlora-switch", "num_experts": 2,
                "expert_capacity": 4}, "mixlora-switch"),
    "dynamic": ({**FFN, "routing_strategy": "mixlora-dynamic", "num_experts": 2,
                 "top_p": 0.7}, "mixlora-dynamic"),
}
LABELS = {name: label for name, (_, label) in VARIANTS.items()}
# One micro-batch per step and a small rank: the engine only has to be alive.
CHEAP = {"r": 2, "batch_size": 2, "micro_batch_size": 2}


@pytest.fixture(scope="module")
def runtime():
    path = private_runtime_dir()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in engine_env(path).items():
            mp.setenv(name, value)
        yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    model = tiny_model_dir("llama", tmp_path_factory)
    return write_run(tmp_path_factory.mktemp("variants"), model,
                     {name: {**CHEAP, **settings} for name, (settings, _) in VARIANTS.items()})


@pytest.fixture(scope="module")
def engine(config, runtime):
    record = ensure_engine(config)
    try:
        yield record
    finally:
        stop_engine(record)


@pytest.fixture(scope="module")
def seen(engine):
    """(the engine's events from its start until every job was added, a status reply)."""
    async def collect():
        client = await EngineClient.connect(engine.socket, client="test")
        try:
            events, added = [], set()
            async for event in client.events(replay=True):
                events.append(event)
                if event.get("type") == "job_added":
                    added.add(event["job"])
                if added == set(VARIANTS):
                    break
        finally:
            await client.close()
        # The status reply catches up with the events once the engine has set up.
        client = await EngineClient.connect(engine.socket, client="test")
        try:
            while len((status := await client.status())["jobs"]) < len(VARIANTS):
                await asyncio.sleep(0.2)
            return events, status
        finally:
            await client.close()
    return asyncio.run(asyncio.wait_for(collect(), 120))


def test_the_label_of_each_parsed_adapter(config):
    adapters = load_config(config).adapters
    assert {a.name: variant_label(a) for a in adapters} == LABELS
    # A job summary's ``adapter`` dict gives the same label as the AdapterConfig.
    assert {a.name: variant_label(asdict(a)) for a in adapters} == LABELS


def test_validate_shows_the_label(config):
    result = CliRunner().invoke(app, ["validate", str(config)])
    assert result.exit_code == 0, result.output
    shown = {}
    for line in result.stdout.splitlines():
        words = line.split()
        if words and words[0] in VARIANTS:     # name  r=2 alpha=8 LABEL  lr=... epochs=...
            shown[words[0]] = words[3]
    assert shown == LABELS


def test_jobs_list_shows_the_engine_label(engine, seen):
    result = CliRunner().invoke(app, ["jobs", "list", "-e", engine.name])
    assert result.exit_code == 0, result.output
    shown = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()}
    assert shown == LABELS
    result = CliRunner().invoke(app, ["jobs", "list", "--json", "-e", engine.name])
    assert result.exit_code == 0, result.output
    assert {job["name"]: job["variant"] for job in map(json.loads,
                                                       result.stdout.splitlines())} == LABELS


def test_run_progress_shows_the_label(seen):
    events, _ = seen
    console = Console(file=io.StringIO(), record=True, width=200)
    with RunProgress(console) as progress:
        for event in events:
            progress.handle(event)
    added = re.compile(r"^(\S+): added \(.*, (\S+) r=2\)$")
    shown = dict(m.groups() for m in map(added.match, console.export_text().splitlines())
                 if m)
    assert shown == LABELS


@pytest.mark.parametrize("status_first", [True, False], ids=["status-first", "events-first"])
def test_the_tui_job_view_shows_the_label(seen, status_first):
    """The TUI asks for status and then gets the replayed events (or the other way round
    after a reconnect): the label may not change between the two."""
    events, status = seen
    state = EngineState()
    feeds = [lambda: state.apply_status(status),
             lambda: [state.apply_event(event) for event in events]]
    for feed in feeds if status_first else reversed(feeds):
        feed()
        assert {name: job.variant for name, job in state.jobs.items()} == LABELS
    assert {name: row_cells(job)["variant"] for name, job in state.jobs.items()} == LABELS
