"""LoRA dropout: the engine's masks against PEFT's (torch.nn.Dropout), and the per-job seed.

The engine draws its own masks (seeded per job, micro-batch and layer, so that a job trains
alone as batched), so they cannot equal PEFT's draw for draw. What must agree is their
distribution: each input element zeroed with probability p and the rest scaled by
1 / (1 - p), independently, so that over many masks the layer's output averages to the
output without dropout, with the spread PEFT's dropout gives.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from engine.core.config import AdapterConfig
from engine.train.adapters import adapter_state_dict, attach_adapter, load_adapter_state
from engine.train.engine import Engine
from engine.train.lora import BatchLayout, Segment
# The same tiny model and PEFT-initialised adapter as the exactness tests.
from test_engine_exactness import (_run_config, _weights, peft_initial_adapter,  # noqa: F401
                                   tiny_llama)

peft = pytest.importorskip("peft")

P = 0.3
SHAPE = (4, 8)          # rows, positions


class _Projection(nn.Module):
    def __init__(self, features_in: int, features_out: int):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(features_in, features_out)
        self.requires_grad_(False)

    def forward(self, x):
        return self.proj(x)


def _pair(features_in: int, features_out: int, r: int, alpha: float, use_dora: bool = False,
          state: dict | None = None):
    """(the engine's layer, its layout, PEFT's layer in training mode) with the same weights:
    ``state``, or the engine's init with a random B."""
    ours, layout = _Projection(features_in, features_out), BatchLayout()
    attach_adapter(ours, layout, "a", ["proj"], r=r, alpha=alpha, dropout=P, use_rslora=False,
                   use_dora=use_dora, init_seed=1, device=torch.device("cpu"))
    if state is None:
        g = torch.Generator().manual_seed(2)
        state = {k: v + 0.2 * torch.randn(v.shape, generator=g)
                 for k, v in adapter_state_dict(ours, "a").items()}
    load_adapter_state(ours, "a", state, source="test")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=P, target_modules=["proj"],
                             use_dora=use_dora)
    theirs = peft.get_peft_model(_Projection(features_in, features_out), config)
    assert not peft.set_peft_model_state_dict(theirs, state).unexpected_keys
    return ours, layout, theirs.train()


def _draws(ours, layout, theirs, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n outputs of each layer on ``x``, a fresh mask each: the engine's from n micro-batch
    seeds, PEFT's from n torch seeds."""
    mine, peft_outputs = [], []
    with torch.no_grad():
        for i in range(n):
            layout.set_segments([Segment("a", 0, x.shape[0], None, dropout_seed=i)])
            mine.append(ours(x))
            torch.manual_seed(i)
            peft_outputs.append(theirs(x))
    return torch.stack(mine), torch.stack(peft_outputs)


def test_masks_zero_p_of_the_inputs_and_scale_the_rest_by_1_over_1_minus_p():
    """With A = B = I and scaling 1 the delta is the dropped-out input itself: its mask."""
    width = 32
    identity = torch.eye(width)
    ours, layout, theirs = _pair(width, width, r=width, alpha=width, state={
        "base_model.model.proj.lora_A.weight": identity,
        "base_model.model.proj.lora_B.weight": identity})
    x = torch.rand(*SHAPE, width) + 0.5
    base = ours.proj(x)
    mine, reference = _draws(ours, layout, theirs, x, n=20)
    for name, outputs in (("engine", mine), ("peft", reference)):
        scaled = (outputs - base) / x                 # 0 where dropped, 1 / (1 - p) where kept
        dropped = scaled.abs() < 1e-4
        torch.testing.assert_close(scaled[~dropped], torch.full_like(scaled[~dropped],
                                                                     1 / (1 - P)))
        n = dropped.numel()
        rate = dropped.float().mean().item()
        assert abs(rate - P) < 4 * (P * (1 - P) / n) ** 0.5, (name, rate)
        # Independent elements: neighbours (one 64-bit draw's two halves in the engine)
        # are both dropped p^2 of the time, and every mask is new.
        both = (dropped[..., 0::2] & dropped[..., 1::2]).float().mean().item()
        assert abs(both - P * P) < 4 * (P * P * (1 - P * P) / (n / 2)) ** 0.5, (name, both)
        assert len({tuple(d.flatten().tolist()) for d in dropped}) == len(dropped)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_dropout_output_has_the_mean_and_spread_of_peft(use_dora):
    ours, layout, theirs = _pair(24, 16, r=4, alpha=8, use_dora=use_dora)
    x = torch.randn(*SHAPE, 24, generator=torch.Generator().manual_seed(3))
    layout.set_single("a")                          # no dropout: the expectation
    with torch.no_grad():
        expected = ours(x)
        torch.testing.assert_close(theirs.eval()(x), expected, rtol=1e-5, atol=1e-6)
    theirs.train()
    n = 1500
    mine, reference = _draws(ours, layout, theirs, x, n)
    spread = {"engine": mine.var(dim=0), "peft": reference.var(dim=0)}
    for name, outputs in (("engine", mine), ("peft", reference)):
        assert spread[name].min() > 0, name         # dropout is on for every output
        z = (outputs.mean(dim=0) - expected) / (spread[name] / n).sqrt()
        # Standard errors from the mean: about 1 on average if the mean is the expectation.
        assert z.square().mean() < 1.5 and z.abs().max() < 5.5, (name, z.square().mean())
    ratio = spread["engine"].sum() / spread["peft"].sum()
    assert 0.9 < ratio < 1.1, ratio
    if not use_dora:
        # LoRA's delta s/(1-p) B A (m * x) has variance s^2 p/(1-p) sum_i (BA)_ji^2 x_i^2.
        weights = adapter_state_dict(ours, "a")
        product = (weights["base_model.model.proj.lora_B.weight"]
                   @ weights["base_model.model.proj.lora_A.weight"]) * 2.0     # s = 8 / 4
        exact = P / (1 - P) * x.square() @ product.square().t()
        assert 0.9 < spread["engine"].sum() / exact.sum() < 1.1


def _one_row_file(tmp_path) -> str:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"instruction": "Copy.", "input": "red green blue cat",
                                "output": "RED GREEN BLUE CAT"}) + "\n")
    return str(path)


@pytest.mark.parametrize("packing", ["on", "off"])
def test_the_job_seed_chooses_the_dropout_masks(packing, tiny_llama, tmp_path):
    """Jobs that differ only in seed: one example (so no data order to differ), the same
    initial weights. With dropout they end apart; with the same seed, or no dropout, equal."""
    init_dir = peft_initial_adapter(tiny_llama, tmp_path / "init")
    data = _one_row_file(tmp_path)
    jobs = {"drop-3": (3, P), "drop-3-again": (3, P), "drop-4": (4, P), "none-3": (3, 0.0),
            "none-4": (4, 0.0)}
    adapters = [AdapterConfig(prompt="alpaca_short", name=name, data=data, r=4, lora_alpha=8,
                              lora_dropout=dropout, target_modules=["q_proj", "v_proj",
                                                                    "down_proj"],
                              batch_size=1, micro_batch_size=1, num_epochs=2, lr=1e-2,
                              init_from=str(init_dir), seed=seed)
                for name, (seed, dropout) in jobs.items()]
    engine = Engine(_run_config(tiny_llama, tmp_path / "out", adapters, packing))
    engine.run()
    weights = {name: _weights(engine, name) for name in jobs}

    def same(a: str, b: str) -> bool:
        return all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a])

    assert same("drop-3", "drop-3-again") and same("none-3", "none-4")
    assert not same("drop-3", "none-3")                      # dropout was on
    for key, value in weights["drop-3"].items():
        apart = float((value - weights["drop-4"][key]).norm() / value.norm())
        assert apart > 1e-3, f"{key}: seed 4 drew seed 3's masks ({apart:.2g} apart)"
