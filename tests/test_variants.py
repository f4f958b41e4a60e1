"""The variant interface (engine/train/variants): a new kind of adapter is one new module.

``ScaledLora`` below is such a module, written against the interface alone: LoRA whose
delta a learned gain per linear multiplies (g, starting at 1), with ``PENALTY * (g - 1)^2``
summed over its linears as its extra loss and a ``gain`` event after each optimizer step.
Registered, it trains in the engine beside a plain LoRA job. The reference is a plain
torch loop over the same batches: the base model from transformers with a forward hook on
each targeted linear, no engine code.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.core.config import AdapterConfig, ModelConfig, RunConfig, TrainConfig
from engine.core.jobs import variant_label
from engine.train.adapters import adapter_modules, adapter_state_dict, load_adapter_state
from engine.train.engine import Engine
from engine.train.lora import LoraAdapter
from engine.train.variants import base, register, variant_for
from engine.train.variants.lora import LoraVariant, lora_scaling
from test_engine_exactness import reference_batches
from tiny_models import tiny_model_dir

TARGETS = ["q_proj", "v_proj", "down_proj"]
PENALTY = 0.5

# -- the new variant: everything it needs is here ---------------------------------------------


class ScaledAdapter(LoraAdapter):
    batched = False   # its delta is not plain LoRA's

    def __init__(self, *args):
        super().__init__(*args)
        self.gain = nn.Parameter(torch.ones(1))

    def delta(self, x, base_out, base_layer, generator, length=None):
        return self.gain * super().delta(x, base_out, base_layer, generator, length)

    def tensors(self):
        return {**super().tensors(), "lora_gain": self.gain}

    def param_groups(self):
        groups = super().param_groups()
        return {**groups, "A": groups["A"] + [self.gain]}


class ScaledLora(LoraVariant):
    adapter_class = ScaledAdapter

    @classmethod
    def claims(cls, fields):
        return str(fields.get("name", "")).startswith("scaled")

    def attach(self, model, layout, linears, *, init_seed, device):
        super().attach(model, layout, linears, init_seed=init_seed, device=device)
        self.gains = [piece.gain for piece in adapter_modules(model, self.name).values()]

    def extra_loss(self):
        return PENALTY * sum((g - 1).square().sum() for g in self.gains)

    def step_events(self):
        return [("gain", {"mean": float(torch.cat([g.detach() for g in self.gains]).mean())})]


# ---------------------------------------------------------------------------------------------


@pytest.fixture
def scaled_registered(monkeypatch):
    """ScaledLora registered for this test only."""
    monkeypatch.setattr(base, "REGISTRY", list(base.REGISTRY))
    register(ScaledLora)


def _data(path: Path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    words = "alpha beta gamma delta red green blue cat dog fox one two three".split()
    rows = [{"instruction": "Repeat.", "input": " ".join(rng.choices(words, k=rng.randint(1, 8))),
             "output": " ".join(rng.choices(words, k=rng.randint(1, 6)))} for _ in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _config(model_dir: Path, out: Path, adapters: list[AdapterConfig]) -> RunConfig:
    return RunConfig(model=ModelConfig(base_model=str(model_dir), attn_impl="sdpa"),
                     train=TrainConfig(output_dir=str(out), seed=7, cutoff_len=64,
                                       save_step=1000, train_lora_simultaneously_num=8),
                     adapters=adapters)


def test_the_registry_picks_each_kind():
    fields = dict(name="a", data="d", r=4)
    assert [type(variant_for("a", {**fields, **extra})).__name__ for extra in
            ({}, {"use_rslora": True}, {"use_dora": True},
             {"use_dora": True, "routing_strategy": "mixlora-switch"})] == [
        "LoraVariant", "LoraVariant", "DoraVariant", "MixLoraVariant"]
    cfg = AdapterConfig(name="a", data="d", use_dora=True, use_rslora=True,
                        loraplus_lr_ratio=4.0)
    assert variant_for("a", cfg).label() == variant_label(cfg) == "dora+rslora+loraplus"


def _reference(model_dir: Path, engine: Engine, name: str, initial: dict,
               steps: int) -> dict[str, torch.Tensor]:
    """ScaledLora trained by a plain loop from ``initial``: a hook adds
    ``g * s * (x A^T) B^T`` to each targeted linear's output; same batches as the job."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.requires_grad_(False)
    cfg = engine.jobs[name].cfg
    scaling = lora_scaling(cfg.r, cfg.lora_alpha, cfg.use_rslora)
    leaves = {key: value.clone().requires_grad_(True) for key, value in initial.items()}
    gains = []
    for module_name, module in model.named_modules():
        key = f"base_model.model.{module_name}"
        if f"{key}.lora_gain" not in leaves:
            continue
        a, b, g = (leaves[f"{key}.{k}"] for k in ("lora_A.weight", "lora_B.weight", "lora_gain"))
        gains.append(g)
        module.register_forward_hook(
            lambda _m, args, out, a=a, b=b, g=g: out + g * scaling * (args[0] @ a.t()) @ b.t())
    optimizer = torch.optim.AdamW(list(leaves.values()), lr=cfg.lr, weight_decay=0.0)
    batches = reference_batches(engine.jobs[name].data, cfg.micro_batch_size,
                                engine.tokenizer.pad_token_id)
    for batch_targets, micro_batches in itertools.islice(batches, steps):
        for ids, mask, labels, targets in micro_batches:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            penalty = PENALTY * sum((g - 1).square().sum() for g in gains)
            ((loss + penalty) * targets / batch_targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {key: value.detach() for key, value in leaves.items()}


def _assert_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        diff = (actual[key] - expected[key]).norm() / expected[key].norm().clamp_min(1e-12)
        assert diff <= 2e-5, f"{key}: relative difference {diff:.3g}"


def test_a_new_variant_trains_beside_plain_lora_as_a_plain_loop_does(scaled_registered,
                                                                     tmp_path,
                                                                     tmp_path_factory):
    model_dir = tiny_model_dir("llama", tmp_path_factory)
    scaled = AdapterConfig(name="scaled", data=_data(tmp_path / "s.jsonl", 12, 1),
                           prompt="alpaca_short", r=4, lora_alpha=8, lora_dropout=0.0,
                           target_modules=TARGETS, batch_size=4, micro_batch_size=2,
                           num_epochs=1, lr=1e-2)
    plain = replace(scaled, name="plain", data=_data(tmp_path / "p.jsonl", 10, 2), r=2, seed=3)
    events: list[dict] = []
    engine = Engine(_config(model_dir, tmp_path / "out", [scaled, plain]),
                    on_event=events.append)
    assert isinstance(engine.jobs["scaled"].adapter, ScaledLora)
    # Every term live from the start: B != 0, gains away from 1.
    g = torch.Generator().manual_seed(0)
    initial = {key: value + (0.1 if "gain" in key else 0.05) * torch.randn(value.shape, generator=g)
               for key, value in adapter_state_dict(engine.model, "scaled").items()}
    assert sum("lora_gain" in key for key in initial) == 2 * len(TARGETS)   # 2 layers
    load_adapter_state(engine.model, "scaled", initial, source="test")
    engine.run()
    steps = engine.jobs["scaled"].step
    assert steps == 3

    trained = adapter_state_dict(engine.model, "scaled")
    assert all(not torch.equal(trained[k], initial[k]) for k in initial if "gain" in k)
    _assert_close(trained, _reference(model_dir, engine, "scaled", initial, steps))

    # Its events, after each of its optimizer steps, and none for the plain job.
    gains = [e for e in events if e["type"] == "gain"]
    assert [(e["job"], e["step"]) for e in gains] == [("scaled", s) for s in (1, 2, 3)]
    final = torch.stack([v for k, v in trained.items() if "gain" in k]).mean()
    assert gains[-1]["mean"] == pytest.approx(float(final), rel=1e-6)

    # The plain job beside it trained as it does alone.
    alone = Engine(_config(model_dir, tmp_path / "alone", [plain]))
    alone.run()
    _assert_close(adapter_state_dict(engine.model, "plain"),
                  adapter_state_dict(alone.model, "plain"))

    # Saved with its gains, and loaded back by a new job of the kind (init_from).
    again = replace(scaled, name="scaled-again", init_from=str(tmp_path / "out" / "scaled"))
    loaded = Engine(_config(model_dir, tmp_path / "again", [again]))
    reloaded = adapter_state_dict(loaded.model, "scaled-again")
    assert reloaded.keys() == trained.keys()
    assert all(torch.equal(reloaded[k], trained[k]) for k in trained)
