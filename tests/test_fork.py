"""Forking a running job (engine/train/fork.py).

A fork with no changes trains to the original's adapter bit for bit (dropout on, forked
mid-epoch and mid-accumulation); a fork with a new lr or schedule has, at each later step,
the learning rate a job configured that way from the start has there; a forked job resumes
from a checkpoint exactly; changes a fork cannot carry are refused with the reason.
"""

from __future__ import annotations

import json

import pytest
import torch

from engine.core.config import AdapterConfig, ModelConfig, RunConfig, TrainConfig
from engine.core.errors import UserError
from engine.train.adapters import adapter_state_dict
from engine.train.engine import Engine
from engine.train.schedules import make_scheduler
from tiny_models import tiny_model_dir

# 12 rows, batch_size 4, micro_batch_size 2: 3 optimizer steps an epoch, 2 engine steps each.


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fork") / "d.jsonl"
    rows = [{"instruction": "Copy.", "input": "cat dog " * (1 + i % 4),
             "output": "CAT DOG " * (1 + i % 3)} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir("llama", tmp_path_factory)


def _adapter(name, data_file, **kw):
    base = dict(data=data_file, prompt="none", r=4, lora_alpha=8, lora_dropout=0.1,
                batch_size=4, micro_batch_size=2, num_epochs=2, lr=1e-2, seed=5,
                scheduler_type="cosine", warmup_steps=2, max_grad_norm=1.0,
                target_modules=["q_proj", "v_proj"])
    return AdapterConfig(name=name, **{**base, **kw})


def _engine(model_dir, out, adapters, resume=False, packing="auto"):
    return Engine(RunConfig(model=ModelConfig(base_model=str(model_dir)),
                            train=TrainConfig(output_dir=str(out), cutoff_len=64,
                                              packing=packing),
                            adapters=adapters), resume=resume)


def _forking(engine, at_call, name, new, changes=None):
    """A poll that forks ``name`` as ``new`` before engine step ``at_call``."""
    calls = {"n": 0}

    def poll(wait):
        calls["n"] += 1
        if calls["n"] == at_call:
            engine.fork(name, new, changes)
    return poll


def _equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _events(engine):
    events = []
    engine.on_event = events.append
    return events


@pytest.mark.parametrize("at_call, packing", [
    (4, "auto"),    # after 3 engine steps: mid-epoch and half-way through an optimizer batch
    (5, "auto"),    # after 4: at an optimizer-step boundary, mid-epoch
    (4, "off"),     # padded rows rather than packed ones
])
def test_fork_without_changes_trains_bit_for_bit(model_dir, data_file, tmp_path, at_call,
                                                 packing):
    engine = _engine(model_dir, tmp_path, [_adapter("a", data_file)], packing=packing)
    engine.run(poll=_forking(engine, at_call, "a", "b"))
    a, b = engine.jobs["a"], engine.jobs["b"]
    assert a.state == b.state == "done" and b.step == a.step == a.total_steps == 6
    assert b.from_config is False and b.cfg.seed == a.seed
    _equal(adapter_state_dict(engine.model, "b"), adapter_state_dict(engine.model, "a"))
    assert [h["loss"] for h in b.history] == [h["loss"] for h in a.history]


def test_mid_accumulation_fork_copies_the_pending_batch(model_dir, data_file, tmp_path):
    engine = _engine(model_dir, tmp_path, [_adapter("a", data_file)])
    engine.run(max_steps=3)          # 1 optimizer step and half of the next batch
    a = engine.jobs["a"]
    assert a.step == 1 and not a.accumulation_complete
    b = engine.fork("a", "b")
    assert b.step == 1 and b.micro_batches_drawn == a.micro_batches_drawn == 3
    assert b.dropout_seed() == a.dropout_seed()
    assert all(torch.equal(x.grad, y.grad) and x.grad is not y.grad
               for x, y in zip(a.parameters, b.parameters))
    assert all(x is not y for x, y in zip(a.parameters, b.parameters))
    assert b.state == "queued" and "forked from a at step 1" in b.reason


def _fresh_lrs(cfg, total_steps):
    """Each step's learning rate (both LoRA+ groups) for a job set up with ``cfg`` from the
    start, from a scheduler of its own."""
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": cfg.lr},
                             {"params": [q], "lr": cfg.lr * cfg.loraplus_lr_ratio}], lr=cfg.lr)
    sched = make_scheduler(opt, cfg, total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(sched.get_last_lr())
        opt.step()
        sched.step()
    return lrs


def test_fork_with_new_lr_follows_the_changed_schedule(model_dir, data_file, tmp_path):
    engine = _engine(model_dir, tmp_path, [_adapter("a", data_file)])
    events = _events(engine)
    changes = {"lr": 3e-2, "num_epochs": 3, "loraplus_lr_ratio": 2.0, "warmup_steps": 3,
               "max_grad_norm": None}
    engine.run(poll=_forking(engine, 6, "a", "b", changes))   # at optimizer step 2 of 6
    a, b = engine.jobs["a"], engine.jobs["b"]
    assert b.state == "done" and b.total_steps == 9 and b.cfg.max_grad_norm is None
    fresh = _fresh_lrs(b.cfg, b.total_steps)
    steps = [e for e in events if e["type"] == "step" and e["job"] == "b"]
    assert [e["step"] for e in steps] == list(range(3, 10))
    for e in steps:
        assert e["lr"] == fresh[e["step"] - 1][0], e["step"]
    assert [g["lr"] for g in b.optimizer.param_groups] == [
        lr for lr in b.scheduler.get_last_lr()]
    assert b.scheduler.base_lrs == [3e-2, 6e-2]
    # The original goes on along its own schedule.
    a_fresh = _fresh_lrs(a.cfg, a.total_steps)
    assert [e["lr"] for e in events if e["type"] == "step" and e["job"] == "a"] == \
        [lrs[0] for lrs in a_fresh]
    sa, sb = adapter_state_dict(engine.model, "a"), adapter_state_dict(engine.model, "b")
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)


def test_lr_change_at_a_step_boundary_is_that_steps_lr(model_dir, data_file, tmp_path):
    engine = _engine(model_dir, tmp_path, [_adapter("a", data_file, scheduler_type="linear")])
    engine.run(max_steps=4)
    b = engine.fork("a", "b", {"lr": 1e-3, "scheduler_type": "constant", "warmup_ratio": 0.5})
    fresh = _fresh_lrs(b.cfg, b.total_steps)
    assert b.cfg.warmup_steps is None
    assert b.scheduler.get_last_lr() == fresh[2]
    assert [g["lr"] for g in b.optimizer.param_groups] == fresh[2]


def test_a_pruned_trial_forks_and_trains_on(model_dir, data_file, tmp_path):
    engine = _engine(model_dir, tmp_path, [_adapter("a", data_file)])
    engine.run(max_steps=4)                      # 2 optimizer steps, as a trial pruned there
    engine._set_state(engine.jobs["a"], "pruned", "pruned by asha at step 2")
    engine.fork("a", "a-on", {"lr": 5e-3})
    engine.run()
    assert engine.jobs["a"].state == "pruned" and engine.jobs["a"].step == 2
    assert engine.jobs["a-on"].state == "done" and engine.jobs["a-on"].step == 6


@pytest.fixture(scope="module")
def uninterrupted(model_dir, data_file, tmp_path_factory):
    engine = _engine(model_dir, tmp_path_factory.mktemp("ref"), [_adapter("a", data_file)])
    engine.run(poll=_forking(engine, 4, "a", "b", {"lr": 2e-2, "lora_dropout": 0.2}))
    return {n: adapter_state_dict(engine.model, n) for n in ("a", "b")}


def test_forked_job_resumes_exactly(model_dir, data_file, tmp_path, uninterrupted):
    engine = _engine(model_dir, tmp_path, [_adapter("a", data_file)])
    engine.run(max_steps=5, poll=_forking(engine, 4, "a", "b",
                                          {"lr": 2e-2, "lora_dropout": 0.2}))
    assert engine.jobs["b"].step == 2 and not engine.jobs["b"].accumulation_complete
    resumed = _engine(model_dir, tmp_path, [_adapter("a", data_file)], resume=True)
    b = resumed.jobs["b"]
    assert b.from_config is False and b.cfg.lr == 2e-2 and b.cfg.lora_dropout == 0.2
    resumed.run()
    assert resumed.jobs["a"].state == resumed.jobs["b"].state == "done"
    for name in ("a", "b"):
        _equal(adapter_state_dict(resumed.model, name), uninterrupted[name])


def test_fork_refusals(model_dir, data_file, tmp_path):
    engine = _engine(model_dir, tmp_path, [_adapter("a", data_file),
                                           _adapter("c", data_file)])
    engine.run(max_steps=2)
    for changes, words in [({"r": 8}, "new r: the adapter's shape"),
                           ({"target_modules": ["q_proj"]}, "new target_modules"),
                           ({"use_dora": True}, "new use_dora"),
                           ({"routing_strategy": "mixlora"}, "MixLoRA routing"),
                           ({"data": data_file}, "new data"),
                           ({"optim": "sgd"}, "new optim"),
                           ({"colour": 1}, "'colour' is not an adapter setting"),
                           ({"lr": "fast"}, "lr"),
                           ({"num_epochs": 0}, "num_epochs"),
                           ({"momentum": 0.9}, "momentum"),
                           ({"eval_steps": 2}, "nothing to evaluate"),
                           ({"lr": None}, "cannot fork 'a' with no lr")]:
        with pytest.raises(UserError) as info:
            engine.fork("a", "b", changes)
        assert words in str(info.value), (changes, str(info.value))
    with pytest.raises(UserError, match="already in this engine"):
        engine.fork("a", "C")
    with pytest.raises(UserError, match="name"):
        engine.fork("a", "bad name")
    with pytest.raises(UserError, match="no job named"):
        engine.fork("zz", "b")
    engine.cancel("c")
    with pytest.raises(UserError, match="only running, queued, paused or pruned"):
        engine.fork("c", "b")
    assert set(engine.jobs) == {"a", "c"}     # nothing was added by a refused fork
    engine.fork("a", "b", {"max_grad_norm": 0.5})  # and the name is still free
    assert engine.jobs["b"].cfg.max_grad_norm == 0.5


# -- over the socket and from the command line ------------------------------------------------

def test_parse_settings_reads_toml_values():
    from typer import Exit

    from mlora_tui.commands.engines import parse_settings

    assert parse_settings(["lr=1e-4", "num_epochs = 3", "scheduler_type=cosine",
                           'eval_tasks=["arc"]', "max_grad_norm=1"]) == {
        "lr": 1e-4, "num_epochs": 3, "scheduler_type": "cosine", "eval_tasks": ["arc"],
        "max_grad_norm": 1}
    for bad in ["lr", "=1", "lr=", "lr=1e-4 x", "lr=[1"]:
        with pytest.raises(Exit) as info:
            parse_settings([bad])
        assert info.value.exit_code == 2, bad


def test_fork_over_the_socket_and_the_cli(tmp_path, model_dir):
    import asyncio
    import os

    from typer.testing import CliRunner

    from mlora_tui.cli import app
    from mlora_tui.client import EngineClient, RequestFailed
    from test_protocol import start_engine, stop_engine
    from test_server import write_config

    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    config = write_config(tmp_path / "served", model_dir, names=("a",))
    proc, record = start_engine(config, str(runtime))
    old = os.environ.get("MLORA_RUNTIME_DIR")
    os.environ["MLORA_RUNTIME_DIR"] = str(runtime)
    try:
        async def main():
            client = await EngineClient.connect(record["socket"], client="test")
            try:
                reply = await client.fork_job("a", "a-lr", {"lr": 1e-3})
                assert reply["job"] == "a-lr" and reply["from"] == "a" and reply["step"] >= 0
                with pytest.raises(RequestFailed) as info:
                    await client.fork_job("a", "a-r", {"r": 4})
                assert info.value.code == "user_error" and "new r" in info.value.message
                jobs = {j["name"]: j for j in (await client.status())["jobs"]}
                assert jobs["a-lr"]["adapter"]["lr"] == 1e-3
            finally:
                await client.close()
        asyncio.run(asyncio.wait_for(main(), 120))

        runner = CliRunner()
        result = runner.invoke(app, ["jobs", "fork", "a", "--as", "a-cos", "--set", "lr=2e-3",
                                     "--set", "scheduler_type=cosine", "-e", record["name"]])
        assert result.exit_code == 0, result.output
        assert "a-cos: forked from a at step" in result.output
        result = runner.invoke(app, ["jobs", "fork", "a", "--as", "a-x", "--set", "colour=1"])
        assert result.exit_code == 2 and "'colour' is not an adapter setting" in result.output
        result = runner.invoke(app, ["jobs", "fork", "a", "--as", "a-x", "--set", "lr=x y"])
        assert result.exit_code == 2 and "not a TOML value" in result.output
        result = runner.invoke(app, ["jobs", "fork", "a", "--as", "A-LR"])
        assert result.exit_code == 2 and "already in this engine" in result.output
    finally:
        if old is None:
            os.environ.pop("MLORA_RUNTIME_DIR", None)
        else:
            os.environ["MLORA_RUNTIME_DIR"] = old
        stop_engine(proc, record)


# -- the TUI's fork form (key f) ----------------------------------------------------------------

def test_fork_form_values():
    from mlora_tui.widgets.fork_form import changed_settings, parse_value, toml_value

    assert [toml_value(v) for v in (3e-4, None, "cosine", ["arc", "hs"], 2)] == \
        ["0.0003", "", '"cosine"', '["arc", "hs"]', "2"]
    initial = {"lr": "0.0003", "scheduler_type": '"constant"', "max_grad_norm": "1.0"}
    assert changed_settings(initial, {"lr": "1e-4", "scheduler_type": "cosine",
                                      "max_grad_norm": ""}) == \
        {"lr": 1e-4, "scheduler_type": "cosine", "max_grad_norm": None}
    assert changed_settings(initial, dict(initial)) == {}
    for field, text in [("lr", ""), ("lr", "1e-4 x")]:
        with pytest.raises(ValueError, match=field):
            parse_value(field, text)


def test_f_opens_the_fork_form_and_sends_the_changed_settings():
    import asyncio

    from textual.widgets import Input

    from mlora_tui.app import MloraApp
    from mlora_tui.gpu import NO_GPU
    from mlora_tui.widgets.fork_form import ForkScreen
    from tui_recorded import FixedGpus, recorded_state

    class Client:
        def __init__(self):
            self.requests = []

        async def fork_job(self, name, new, changes=None):
            from mlora_tui.client import RequestFailed
            if new == "taken":
                raise RequestFailed("user_error", "an adapter named 'taken' is already here")
            self.requests.append((name, new, changes))
            return {"job": new, "from": name, "step": 3}

    async def scenario():
        app = MloraApp(state=recorded_state(), gpu_sampler=FixedGpus(NO_GPU))
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            app.client = client = Client()
            screen = app.screen
            job = screen.selected_job
            assert job is not None and job.state in ("running", "paused", "queued")
            assert screen.active_bindings["f"].enabled
            await pilot.press("f")
            await pilot.pause()
            form = app.screen
            assert isinstance(form, ForkScreen) and form.job_name == job.name
            lr = form.query_one("#set-lr", Input)
            assert lr.value == repr(job.adapter["lr"])
            lr.value = "1e-4"
            name = form.query_one("#new-name", Input)
            name.value = "taken"
            form.send()
            await pilot.pause(0.2)
            assert "already here" in str(form.query_one("#error").render())
            name.value = "copy"
            form.send()
            for _ in range(50):
                await pilot.pause(0.02)
                if not isinstance(app.screen, ForkScreen):
                    break
            assert client.requests == [(job.name, "copy", {"lr": 1e-4})]
            assert not isinstance(app.screen, ForkScreen)
    asyncio.run(scenario())
