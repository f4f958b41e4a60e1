"""The multi-adapter linear layer against PEFT and against each adapter applied alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.adapters import adapter_state_dict, attach_adapter, load_adapter_state
from engine.lora import BatchLayout, Segment

peft = pytest.importorskip("peft")

VARIANTS = {
    "lora": dict(r=4, alpha=8.0, use_rslora=False, use_dora=False),
    "rslora": dict(r=6, alpha=8.0, use_rslora=True, use_dora=False),
    "dora": dict(r=3, alpha=6.0, use_rslora=False, use_dora=True),
}


class Block(nn.Module):
    """A stand-in for a decoder block: two projections, one with a bias."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20, bias=True)
        self.down = nn.Linear(20, 12, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _block(seed=0):
    torch.manual_seed(seed)
    block = Block()
    for p in block.parameters():
        p.requires_grad_(False)
    return block


def _randomize(model, name, seed):
    """Give B (and the magnitude) non-zero values so every term of the math is exercised."""
    g = torch.Generator().manual_seed(seed)
    state = adapter_state_dict(model, name)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    load_adapter_state(model, name, state, source="test")
    return state


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_and_grads_match_peft(variant):
    spec = VARIANTS[variant]
    ours = _block()
    layout = BatchLayout()
    attach_adapter(ours, layout, "a", ["up", "down"], r=spec["r"], alpha=spec["alpha"],
                   dropout=0.0, use_rslora=spec["use_rslora"], use_dora=spec["use_dora"],
                   init_seed=1, device=torch.device("cpu"))
    state = _randomize(ours, "a", 2)

    config = peft.LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                             target_modules=["up", "down"], use_rslora=spec["use_rslora"],
                             use_dora=spec["use_dora"])
    reference = peft.get_peft_model(_block(), config)
    result = peft.set_peft_model_state_dict(reference, state)
    assert not result.unexpected_keys

    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(3))
    layout.set_segments([Segment("a", 0, 3, dropout_seed=1)])
    out_ours = ours(x)
    out_ref = reference(x)
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-5, atol=1e-6)

    out_ours.square().sum().backward()
    out_ref.square().sum().backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    ours_grads = {}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            module = n.split(".")[0]
            kind = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
                    "magnitude": "lora_magnitude_vector.default.weight"}[n.split(".")[-1]]
            ours_grads[f"base_model.model.{module}.{kind}"] = p.grad
    assert set(ours_grads) == set(ref_grads)
    for key, grad in ref_grads.items():
        torch.testing.assert_close(ours_grads[key], grad, rtol=1e-5, atol=1e-6, msg=key)


def test_each_adapter_touches_only_its_own_rows():
    """Three adapters (LoRA, rsLoRA, DoRA; dropout on) batched = each alone on its rows."""
    shared = _block()
    layout = BatchLayout()
    specs = {"lora": ("up",), "rslora": ("up", "down"), "dora": ("down",)}
    for i, (name, targets) in enumerate(specs.items()):
        attach_adapter(shared, layout, name, list(targets), dropout=0.3, init_seed=10 + i,
                       device=torch.device("cpu"), **{k: v for k, v in VARIANTS[name].items()})
        _randomize(shared, name, 20 + i)
    alone_models = {name: copy.deepcopy(shared) for name in specs}

    g = torch.Generator().manual_seed(5)
    rows = {"lora": 2, "rslora": 3, "dora": 1}
    lengths = {"lora": 4, "rslora": 7, "dora": 2}
    width = max(lengths.values())
    inputs = {n: torch.randn(rows[n], width, 12, generator=g) for n in specs}
    seeds = {"lora": 1, "rslora": 2, "dora": 3}

    # Together, padded to the widest job.
    segments, start = [], 0
    for name in specs:
        segments.append(Segment(name, start, start + rows[name], lengths[name], seeds[name]))
        start += rows[name]
    layout.set_segments(segments)
    together = shared(torch.cat([inputs[n] for n in specs]))
    loss = sum(together[s.start:s.end, :lengths[s.adapter]].square().sum() for s in segments)
    loss.backward()

    for seg in segments:
        name = seg.adapter
        model = alone_models[name]
        alone_layout = next(m.layout for m in model.modules() if hasattr(m, "layout"))
        alone_layout.set_segments([Segment(name, 0, rows[name], lengths[name], seeds[name])])
        x = inputs[name][:, :lengths[name]]
        out = model(x)
        torch.testing.assert_close(together[seg.start:seg.end, :lengths[name]], out,
                                   rtol=1e-5, atol=1e-6)
        out.square().sum().backward()
        for (n, p_alone), (_, p_shared) in zip(model.named_parameters(), shared.named_parameters()):
            if n.split(".")[2] == name:
                torch.testing.assert_close(p_shared.grad, p_alone.grad, rtol=1e-5, atol=1e-6,
                                           msg=n)


def test_rows_of_an_adapter_without_this_target_pass_unchanged():
    model = _block()
    reference = copy.deepcopy(model)
    layout = BatchLayout()
    attach_adapter(model, layout, "only_up", ["up"], r=2, alpha=4.0, dropout=0.0,
                   use_rslora=False, use_dora=False, init_seed=0, device=torch.device("cpu"))
    _randomize(model, "only_up", 1)
    x = torch.randn(4, 3, 12)
    layout.set_segments([Segment(None, 0, 2), Segment("only_up", 2, 4)])
    out = model(x)
    torch.testing.assert_close(out[:2], reference(x[:2]))
    assert not torch.allclose(out[2:], reference(x[2:]))
