"""Jobs paused, resumed, cancelled and added while the engine runs.

Control never changes what a job learns: a job paused and resumed, or trained beside a job
that is cancelled or added midway, ends with exactly the adapter of an uninterrupted run.
"""

from __future__ import annotations

import json

import pytest

from engine.train.adapters import adapter_state_dict
from engine.core.config import AdapterConfig, ModelConfig, RunConfig, TrainConfig
from engine.core.errors import UserError
from engine.train.engine import Engine
from tiny_models import tiny_model_dir


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ctl") / "d.jsonl"
    rows = [{"instruction": "Copy.", "input": "cat dog " * (1 + i % 4),
             "output": "CAT DOG " * (1 + i % 3)} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _adapter(name, data_file, **kw):
    base = dict(data=data_file, prompt="none", r=4, lora_alpha=8, lora_dropout=0.1,
                batch_size=4, micro_batch_size=2, num_epochs=2, lr=1e-2,
                target_modules=["q_proj", "v_proj"])
    return AdapterConfig(name=name, **{**base, **kw})


def _engine(model_dir, out, adapters):
    return Engine(RunConfig(model=ModelConfig(base_model=str(model_dir)),
                            train=TrainConfig(output_dir=str(out), cutoff_len=64),
                            adapters=adapters))


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        diff = (a[key] - b[key]).norm() / b[key].norm().clamp_min(1e-12)
        assert diff <= 1e-5, f"{key}: {diff:.3g}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def reference(model_dir, data_file, tmp_path_factory):
    """Both adapters trained without interruption."""
    engine = _engine(model_dir, tmp_path_factory.mktemp("ref"),
                     [_adapter("a", data_file), _adapter("b", data_file, r=2, seed=9)])
    engine.run()
    return {n: adapter_state_dict(engine.model, n) for n in ("a", "b")}


def test_pause_mid_accumulation_then_resume_changes_nothing(model_dir, data_file, tmp_path,
                                                            reference):
    engine = _engine(model_dir, tmp_path, [_adapter("a", data_file),
                                           _adapter("b", data_file, r=2, seed=9)])
    calls = {"n": 0}

    def poll(wait):
        calls["n"] += 1
        if calls["n"] == 2:          # after one micro-batch: "a" is halfway through a batch
            engine.pause("a")
        if calls["n"] == 6:
            engine.resume("a")
    engine.run(poll=poll)
    assert engine.jobs["a"].state == engine.jobs["b"].state == "done"
    _same(adapter_state_dict(engine.model, "a"), reference["a"])
    _same(adapter_state_dict(engine.model, "b"), reference["b"])


def test_cancel_one_job_leaves_the_other_unchanged(model_dir, data_file, tmp_path, reference):
    engine = _engine(model_dir, tmp_path, [_adapter("a", data_file),
                                           _adapter("b", data_file, r=2, seed=9)])
    calls = {"n": 0}

    def poll(wait):
        calls["n"] += 1
        if calls["n"] == 3:
            engine.cancel("a")
    engine.run(poll=poll)
    assert engine.jobs["a"].state == "cancelled"
    assert adapter_state_dict(engine.model, "a") == {}
    _same(adapter_state_dict(engine.model, "b"), reference["b"])
    with pytest.raises(UserError, match="already cancelled"):
        engine.cancel("a")


def test_job_added_midway_trains_like_it_would_alone(model_dir, data_file, tmp_path, reference):
    engine = _engine(model_dir, tmp_path, [_adapter("a", data_file)])
    calls = {"n": 0}

    def poll(wait):
        calls["n"] += 1
        if calls["n"] == 4:
            engine.add_job(_adapter("b", data_file, r=2, seed=9))
    engine.run(poll=poll)
    assert engine.jobs["b"].state == "done"
    _same(adapter_state_dict(engine.model, "a"), reference["a"])
    _same(adapter_state_dict(engine.model, "b"), reference["b"])


def test_paused_jobs_keep_a_polling_engine_waiting_and_bad_commands_are_user_errors(
        model_dir, data_file, tmp_path):
    engine = _engine(model_dir, tmp_path, [_adapter("a", data_file, num_epochs=1)])
    waits = []

    def poll(wait):
        if wait:
            waits.append(True)
            engine.resume("a")
        elif not waits and engine.jobs["a"].state != "paused":
            engine.pause("a")
    engine.run(poll=poll)
    assert waits == [True] and engine.jobs["a"].state == "done"
    with pytest.raises(UserError, match="no job named 'zzz'"):
        engine.pause("zzz")
    with pytest.raises(UserError, match="only paused jobs resume"):
        engine.resume("a")
