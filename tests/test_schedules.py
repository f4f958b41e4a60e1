"""Learning-rate schedules are transformers' own, and a checkpoint from before is refused.

The reference is transformers' ``get_scheduler`` by name on an optimizer of its own,
stepped as many times as the job has optimizer steps; the learning rates compared are the
ones the engine reports in its ``step`` events (the rate each step was taken with).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import get_scheduler

from engine.core import checkpoints as ckpt
from engine.core.config import AdapterConfig, ModelConfig, RunConfig, TrainConfig
from engine.core.errors import UserError
from engine.train.engine import Engine
from tiny_models import tiny_model_dir

# (name, scheduler_type, warm-up settings)
SCHEDULES = [
    ("constant", "constant", {}),
    ("constant-warm", "constant", {"warmup_steps": 2}),
    ("linear", "linear", {}),
    ("linear-warm", "linear", {"warmup_steps": 3}),
    ("cosine", "cosine", {}),
    ("cosine-warm", "cosine", {"warmup_ratio": 0.25}),   # ceil(0.25 x 7 steps) = 2
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sched") / "d.jsonl"
    rows = [{"text": "cat dog " * (1 + i % 3)} for i in range(7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(model_dir, out, data_file, names=None) -> RunConfig:
    adapters = [AdapterConfig(name=name, data=data_file, prompt="none", r=2, lora_alpha=4,
                              target_modules=["q_proj"], batch_size=1, micro_batch_size=1,
                              num_epochs=1, lr=0.01, scheduler_type=kind, **warmup)
                for name, kind, warmup in SCHEDULES if names is None or name in names]
    return RunConfig(model=ModelConfig(base_model=str(model_dir)),
                     train=TrainConfig(output_dir=str(out), cutoff_len=32,
                                       train_lora_simultaneously_num=len(adapters)),
                     adapters=adapters)


def _transformers_rates(cfg: AdapterConfig, total_steps: int) -> list[float]:
    warmup = (cfg.warmup_steps if cfg.warmup_steps is not None
              else math.ceil(cfg.warmup_ratio * total_steps))
    # transformers' "constant" has no warm-up: with one, it is "constant_with_warmup".
    name = "constant_with_warmup" if cfg.scheduler_type == "constant" and warmup else \
        cfg.scheduler_type
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_each_schedule_gives_transformers_rates(model_dir, data_file, tmp_path):
    events: list[dict] = []
    engine = Engine(_config(model_dir, tmp_path / "run", data_file), on_event=events.append,
                    write_metrics=False)
    engine.run()
    for cfg in engine.config.adapters:
        job = engine.jobs[cfg.name]
        assert job.state == "done" and job.total_steps == 7
        rates = [e["lr"] for e in events if e["type"] == "step" and e["job"] == cfg.name]
        assert rates == pytest.approx(_transformers_rates(cfg, job.total_steps), rel=1e-12,
                                      abs=0), cfg.name
    multipliers = {cfg.name: [e["lr"] / cfg.lr for e in events
                              if e["type"] == "step" and e["job"] == cfg.name]
                   for cfg in engine.config.adapters}
    # Warm-up starts at 0 (the hand-written schedules before gave 1/3, 2/3, 1).
    assert multipliers["constant-warm"][:3] == pytest.approx([0.0, 0.5, 1.0])
    assert multipliers["constant"] == pytest.approx([1.0] * 7)
    assert multipliers["cosine-warm"][:3] == pytest.approx([0.0, 0.5, 1.0])
    assert multipliers["linear"][-1] == pytest.approx(1 / 7)


def test_resume_refuses_a_checkpoint_without_the_schedule_marker(model_dir, data_file,
                                                                 tmp_path):
    """A checkpoint written before schedules came from transformers has no "schedule" in
    its engine.json: its warm-up rates differ, so resuming it is refused, saying why."""
    out = tmp_path / "run"
    names = ["constant-warm", "linear"]
    Engine(_config(model_dir, out, data_file, names), write_metrics=False).run(max_steps=2)
    path = ckpt.latest_checkpoint(out)
    manifest_path = path / ckpt.ENGINE_FILE
    manifest = json.loads(manifest_path.read_text())
    assert manifest["schedule"] == "transformers"
    resumed = Engine(_config(model_dir, out, data_file, names), write_metrics=False,
                     resume=True)
    assert resumed.engine_step == 2
    del manifest["schedule"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserError) as caught:
        Engine(_config(model_dir, out, data_file, names), write_metrics=False, resume=True)
    message = str(caught.value)
    assert str(path) in message
    assert "schedules" in message and "transformers'" in message
    assert "without --resume" in message
