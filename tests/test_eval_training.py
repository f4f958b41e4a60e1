"""Evaluation during training: [[eval]] tables, eval_tasks/eval_steps, the evaluate request.

Evaluating never changes training: jobs evaluated after every step end with exactly the
weights of the same run without evaluation. The scores in the eval events are the scores
``mlora evaluate`` gives the saved adapters.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from engine.core.config import ModelConfig, RunConfig, TrainConfig, load_config
from engine.core.config_eval import EvalConfig
from engine.core.errors import ConfigError, UserError
from engine.core.eval_plan import config_evaluation
from engine.train.adapters import adapter_state_dict
from engine.train.engine import Engine
from engine.train.evaluate import evaluate
from test_config import ADAPTER, load_error, workdir, write  # noqa: F401 (fixture)
from test_engine_control import _adapter, data_file, model_dir  # noqa: F401 (fixtures)

MC_ROWS = [{"question": f"Which word means {w}?", "choices": ["cat dog", w.upper(), "x"],
            "answer": 1} for w in ("cat", "dog", "red", "blue", "one")]


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    return str(path)


def _config(model_dir, out, adapters, evals) -> RunConfig:
    """test_engine_control's engine config, with ``evals`` ([[eval]] tables)."""
    return RunConfig(model=ModelConfig(base_model=str(model_dir)),
                     train=TrainConfig(output_dir=str(out), cutoff_len=64),
                     adapters=adapters, evals=evals)


def _run(model_dir, out, adapters, evals) -> Engine:
    engine = Engine(_config(model_dir, out, adapters, evals))
    engine.run()
    return engine


def _events(out, type_="eval"):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["type"] == type_]


def test_evaluating_every_step_leaves_training_bit_identical_and_scores_match_mlora_evaluate(
        model_dir, data_file, mc_file, tmp_path):
    task = EvalConfig(name="words", format="mc", data=mc_file)
    plain = [_adapter("a", data_file), _adapter("b", data_file, r=2, seed=9, val_set_size=2)]
    evaluated = [replace(plain[0], eval_tasks=["words"], eval_steps=1),
                 replace(plain[1], eval_tasks=["words"], eval_steps=2)]
    reference = _run(model_dir, tmp_path / "ref", plain, [])
    engine = _run(model_dir, tmp_path / "eval", evaluated, [task])
    for name in ("a", "b"):
        ref, got = (adapter_state_dict(e.model, name) for e in (reference, engine))
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), name

    events = _events(tmp_path / "eval")
    total = {n: engine.jobs[n].total_steps for n in ("a", "b")}
    by_job = {n: [e for e in events if e["job"] == n] for n in ("a", "b")}
    # "a" every step; "b" every second step and its last, with its validation loss each time.
    assert [e["step"] for e in by_job["a"]] == list(range(1, total["a"] + 1))
    assert [e["step"] for e in by_job["b"]] == sorted({*range(2, total["b"] + 1, 2), total["b"]})
    assert all("eval_loss" not in e for e in by_job["a"])
    assert all(isinstance(e["eval_loss"], float) for e in by_job["b"])
    assert all(set(e["scores"]) == {"words"} and e["scores"]["words"]["n"] == len(MC_ROWS)
               for e in events)
    # The reference run evaluates b's validation loss at its end only, and scores nothing.
    assert [(e["job"], e["step"], set(e) - {"time", "type"})
            for e in _events(tmp_path / "ref")] == [("b", total["b"], {"job", "step",
                                                                         "eval_loss"})]
    assert by_job["b"][-1]["eval_loss"] == _events(tmp_path / "ref")[0]["eval_loss"]

    # The last scores are mlora evaluate's on the saved adapters; snapshots carry them.
    saved = evaluate([tmp_path / "eval" / "a", tmp_path / "eval" / "b"], [task.spec()],
                     write_folders=False)["results"]
    for name in ("a", "b"):
        last = by_job[name][-1]["scores"]["words"]
        assert last["acc"] == saved[name]["words"]["acc"]
        assert last["acc_norm"] == saved[name]["words"]["acc_norm"]
        summary = next(j for j in engine.status()["jobs"] if j["name"] == name)
        assert summary["scores"] == {"words": last}


def test_the_evaluate_request_runs_at_the_next_step_boundary(model_dir, data_file, mc_file,
                                                            tmp_path):
    engine = Engine(_config(model_dir, tmp_path,
                            [_adapter("a", data_file, num_epochs=1),
                             _adapter("b", data_file, num_epochs=1, val_set_size=2)],
                            [EvalConfig(name="words", format="mc", data=mc_file)]))
    replies = []

    def poll(wait):
        if engine.jobs["a"].step == 1 and not replies:
            replies.append(engine.request_evaluation("a"))
            replies.append(engine.request_evaluation("b"))
            with pytest.raises(UserError, match="no job named 'zzz'"):
                engine.request_evaluation("zzz")
    engine.run(poll=poll)
    assert replies == [{"job": "a", "tasks": ["words"], "eval_loss": False},
                       {"job": "b", "tasks": ["words"], "eval_loss": True}]
    events = [e for e in _events(tmp_path) if e["step"] == 1]
    assert [(e["job"], sorted(set(e) & {"scores", "eval_loss"})) for e in events] == [
        ("a", ["scores"]), ("b", ["eval_loss", "scores"])]
    engine.jobs["a"].state = "cancelled"
    with pytest.raises(UserError, match="cancelled"):
        engine.request_evaluation("a")


def test_a_bad_task_file_stops_the_engine_before_training(model_dir, data_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["only one"], "answer": 0}) + "\n")
    config = _config(model_dir, tmp_path / "out", [_adapter("a", data_file, eval_tasks=["t"])],
                     [EvalConfig(name="t", format="mc", data=str(bad))])
    with pytest.raises(ConfigError) as info:
        Engine(config)
    assert info.value.table == 'eval "t"' and "bad.jsonl" in str(info.value)


# -- the config -----------------------------------------------------------------------------

EVAL = '[[eval]]\nname = "t"\nformat = "mc"\ndata = "data.jsonl"\n'
BAD = [
    ("unknown_task", EVAL + ADAPTER + 'eval_tasks = ["u"]\n', 'adapter "a"', "eval_tasks",
     'unknown task "u": the [[eval]] tables are "t"'),
    ("no_eval_tables", ADAPTER + 'eval_tasks = ["t"]\n', 'adapter "a"', "eval_tasks",
     "the config has no [[eval]] table"),
    ("eval_steps_alone", ADAPTER + "eval_steps = 5\n", 'adapter "a"', "eval_steps",
     "nothing to evaluate: set eval_tasks"),
    ("eval_steps_zero", EVAL + ADAPTER + 'eval_tasks = ["t"]\neval_steps = 0\n', 'adapter "a"',
     "eval_steps", "expected an integer >= 1"),
    ("eval_tasks_not_list", EVAL + ADAPTER + 'eval_tasks = "t"\n', 'adapter "a"',
     "eval_tasks", "expected a list of [[eval]] names"),
    ("eval_unknown_key", EVAL + "formt = 1\n" + ADAPTER, 'eval "t"', "formt",
     'unknown key; did you mean "format"?'),
    ("eval_bad_format", EVAL.replace('"mc"', '"arc"') + ADAPTER, 'eval "t"', "format",
     'got "arc"'),
    ("eval_missing_data", '[[eval]]\nname = "t"\nformat = "mc"\n' + ADAPTER, 'eval "t"',
     "data", "missing"),
    ("eval_data_not_found", EVAL.replace("data.jsonl", "nope.jsonl") + ADAPTER, 'eval "t"',
     "data", "file not found: nope.jsonl"),
    ("eval_limit", EVAL + "limit = 0\n" + ADAPTER, 'eval "t"', "limit", "expected an integer >= 1"),
    ("eval_method", EVAL + 'method = "letters"\n' + ADAPTER, 'eval "t"', "method",
     'did you mean "letter"?'),
    ("eval_letter_mc", EVAL + 'method = "letter"\n' + ADAPTER, 'eval "t"', "method",
     "no prompt for the mc format"),
    ("eval_duplicate", EVAL + EVAL + ADAPTER, "eval[2]", "name", "both named"),
    ("eval_single_table", '[eval]\nname = "t"\n' + ADAPTER, "eval", None, "[[eval]] tables"),
]


@pytest.mark.parametrize("text, table, field, fragment", [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])
def test_bad_eval_config(workdir, text, table, field, fragment):  # noqa: F811
    path = write(workdir, text)
    error = load_error(path)
    assert fragment in str(error)
    assert (error.table, error.field) == (table, field)


def test_eval_config_and_the_evaluate_plan(workdir):  # noqa: F811
    path = write(workdir, f'[train]\noutput_dir = "{workdir / "out"}"\n' + EVAL + "limit = 3\n"
                 + ADAPTER + 'eval_tasks = ["t"]\neval_steps = 4\n'
                 + ADAPTER.replace('"a"', '"b"'))
    config = load_config(path)
    assert config.evals == [EvalConfig("t", "mc", str(workdir / "data.jsonl"), limit=3)]
    assert (config.adapters[0].eval_tasks, config.adapters[0].eval_steps) == (["t"], 4)
    assert (config.adapters[1].eval_tasks, config.adapters[1].eval_steps) == ([], None)
    with pytest.raises(UserError, match="no adapter of this run is saved yet"):
        config_evaluation(path)
    (workdir / "out" / "b").mkdir(parents=True)
    (workdir / "out" / "b" / "adapter_config.json").write_text("{}")
    plan = config_evaluation(path, limit=2)
    assert plan.adapters == [workdir / "out" / "b"] and plan.missing == ["a"]
    assert [(t.key, t.format, t.limit) for t in plan.tasks] == [("t", "mc", 2)]
    assert plan.base_model == "smollm2-135m"


# -- over the socket --------------------------------------------------------------------------

def test_evaluate_over_the_socket_and_the_cli(tmp_path, model_dir, mc_file,  # noqa: F811
                                              monkeypatch):
    import asyncio
    import tempfile

    from typer.testing import CliRunner

    from mlora_tui.cli import app

    from mlora_tui.client import EngineClient, RequestFailed
    from test_protocol import start_engine, stop_engine
    from test_server import write_config

    config = write_config(tmp_path, model_dir, names=("a", "b"))
    config.write_text(config.read_text() + f'\n[[eval]]\nname = "words"\nformat = "mc"\n'
                      f'data = "{mc_file}"\n')
    with tempfile.TemporaryDirectory(prefix="mle-", dir="/tmp") as runtime:
        proc, record = start_engine(config, runtime)
        try:
            async def main():
                client = await EngineClient.connect(record["socket"], client="test")
                stream = await client.subscribe(replay=False)
                reply = await client.evaluate_job("b")
                assert reply == {"job": "b", "tasks": ["words"], "eval_loss": False}
                async for event in stream:
                    if event["type"] == "eval":
                        break
                assert event["job"] == "b" and "eval_loss" not in event
                assert event["scores"]["words"]["n"] == len(MC_ROWS)
                jobs = {j["name"]: j for j in (await client.status())["jobs"]}
                assert jobs["b"]["scores"] == event["scores"] and jobs["a"]["scores"] == {}
                with pytest.raises(RequestFailed, match="no job named 'zzz'"):
                    await client.evaluate_job("zzz")
                await client.close()
            asyncio.run(asyncio.wait_for(main(), 120))
            monkeypatch.setenv("MLORA_RUNTIME_DIR", runtime)
            result = CliRunner().invoke(app, ["jobs", "evaluate", "a"])
            assert result.exit_code == 0 and "a: evaluating (words)" in result.output
            result = CliRunner().invoke(app, ["jobs", "evaluate", "zzz"])
            assert result.exit_code != 0 and "no job named 'zzz'" in result.output
        finally:
            stop_engine(proc, record)


def test_resume_restores_the_scores_and_reads_checkpoints_without_them(
        model_dir, data_file, mc_file, tmp_path):  # noqa: F811
    from engine.core import checkpoints as ckpt

    adapters = [_adapter("a", data_file, eval_tasks=["words"], eval_steps=1)]
    evals = [EvalConfig(name="words", format="mc", data=mc_file)]
    first = Engine(_config(model_dir, tmp_path, adapters, evals))
    first.run(max_steps=4)
    scores, step = first.jobs["a"].scores, first.jobs["a"].step
    assert scores["words"]["n"] == len(MC_ROWS)
    resumed = Engine(_config(model_dir, tmp_path, adapters, evals), resume=True)
    assert resumed.jobs["a"].scores == scores and resumed.jobs["a"].step == step > 0
    # A checkpoint written before evaluation tasks existed: no "scores" in the position.
    path = ckpt.latest_checkpoint(tmp_path)
    manifest = json.loads((path / ckpt.ENGINE_FILE).read_text())
    for job in manifest["jobs"]:
        del job["position"]["scores"]
    (path / ckpt.ENGINE_FILE).write_text(json.dumps(manifest))
    plain = [replace(adapters[0], eval_tasks=[], eval_steps=None)]   # eval fields may change
    again = Engine(_config(model_dir, tmp_path, plain, []), resume=True)
    assert again.jobs["a"].scores == {} and again.jobs["a"].step == step
