"""The multi-adapter linear layer against PEFT and against each adapter applied alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.train.adapters import adapter_state_dict, attach_adapter, load_adapter_state
from engine.train.lora import BatchLayout, MultiLoraLinear, Segment, dense_weight, mix_seed
from engine.train.variants import variant_for

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
                       device=torch.device("cpu"), **VARIANTS[name])
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


# -- the grouped layer against the layer's math one segment at a time -------------------------


def _reference_forward(layer, x):
    """What a MultiLoraLinear computes, one segment at a time with ``LoraAdapter.delta``
    (the layer's previous code): the grouped path must give the same, up to rounding."""
    base_out = layer.base(x)
    layout = layer.layout
    if layout.single is not None:
        if layout.single not in layer.adapters:
            return base_out
        delta = layer.adapters[layout.single].delta(x, base_out, layer.base, None)
        return base_out + delta.to(base_out.dtype)
    pieces, at = [], 0
    for seg in layout.segments:
        assert seg.start == at, "the reference needs segments that cover the rows in order"
        rows = base_out[seg.start:seg.end]
        adapter = layer.adapters[seg.adapter] if seg.adapter in layer.adapters else None
        if adapter is not None:
            generator = None
            if seg.dropout_seed is not None and adapter.dropout_p > 0:
                generator = torch.Generator().manual_seed(
                    mix_seed(seg.dropout_seed, layer.name_key))
            delta = adapter.delta(x[seg.start:seg.end], rows, layer.base, generator, seg.length)
            rows = rows + delta.to(rows.dtype)
        pieces.append(rows)
        at = seg.end
    assert at == x.shape[0]
    return torch.cat(pieces)


class _LinearSubclass(nn.Linear):
    """A base that is not exactly nn.Linear (as bitsandbytes' layers): added out of place."""


# name: (r, alpha, dropout, rslora, dora)
_ADAPTERS = {"a": (4, 8.0, 0.2, False, False), "b": (6, 8.0, 0.0, True, False),
             "c": (2, 4.0, 0.3, False, True), "d": (4, 4.0, 0.1, False, False),
             "e": (3, 6.0, 0.0, False, True)}

# Each layout: (segments as (adapter, rows, length, seed)), or ("single", adapter).
_LAYOUTS = {
    "all plain, same rank": [("a", 2, 7, 1), ("d", 3, 5, 2)],
    "mixed ranks, dropout on some": [("a", 2, 7, 1), ("b", 1, 4, 2), ("d", 2, 7, None)],
    "dora and none between": [("a", 2, 7, 1), (None, 1, 7, None), ("c", 2, 3, 3),
                              ("b", 1, 6, 4), ("e", 1, 7, None)],
    "same adapter twice": [("a", 1, 7, 1), ("b", 2, 6, None), ("a", 2, 5, 9)],
    "no adapter at the ends": [(None, 1, 7, None), ("a", 2, 6, 1), ("d", 1, 7, 2),
                               ("c", 1, 7, 5), (None, 2, 3, None)],
    "dora only": [("c", 2, 7, 1), ("e", 2, 6, None)],
    "adapter not on this layer": [("a", 2, 7, 1), ("zz", 2, 7, 2)],
    # Back-to-back segments of equal rows and rank run as one batched matmul pair.
    "stacked, dropout on some": [("a", 2, 7, 1), ("d", 2, 5, 2), ("a", 2, 6, None),
                                 ("b", 2, 7, 3)],
    "stacked, no dropout": [("d", 2, 7, None), ("a", 2, 7, None), (None, 1, 7, None),
                            ("d", 2, 4, None), ("a", 2, 7, None)],
    "one adapter, no dropout": [("b", 3, 7, 1)],
    "one adapter, dropout": [("a", 3, 5, 1)],
    "single plain": ("single", "b"),
    "single dora": ("single", "c"),
    "single absent": ("single", "zz"),
}


def _layer(base_cls=nn.Linear, dtype=torch.float32, bias=True, in_features=12):
    torch.manual_seed(0)
    base = base_cls(in_features, 10, bias=bias).to(dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    layout = BatchLayout()
    layer = MultiLoraLinear(base, layout, "model.layers.3.mlp.up_proj")
    g = torch.Generator().manual_seed(4)
    for name, (r, alpha, dropout, rslora, dora) in _ADAPTERS.items():
        fields = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora,
                      use_dora=dora)
        adapter = variant_for(name, fields).linear_adapter(in_features, 10)
        adapter.reset(g, dense_weight(base))
        with torch.no_grad():
            adapter.lora_B.normal_(0, 0.3, generator=g)
            if dora:
                adapter.magnitude.mul_(1.0 + 0.1 * torch.randn(10, generator=g))
        layer.adapters[name] = adapter
    return layer


def _set_layout(layout, spec):
    if spec[0] == "single":
        layout.set_single(spec[1])
        return 4
    segments, start = [], 0
    for adapter, rows, length, seed in spec:
        segments.append(Segment(adapter, start, start + rows, length, seed))
        start += rows
    layout.set_segments(segments)
    return start


def _outputs_and_grads(layer, forward, x, weights):
    x = x.detach().clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    out = forward(x)
    (out.float() * weights).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base_cls", [nn.Linear, _LinearSubclass])
@pytest.mark.parametrize("layout_name", list(_LAYOUTS))
def test_grouped_layer_equals_segment_by_segment_math(layout_name, base_cls, dtype):
    """Outputs and gradients (input and every adapter tensor) of the grouped layer equal the
    per-segment math: mixed ranks, DoRA, dropout, rows of no adapter, single mode."""
    layer = _layer(base_cls, dtype)
    rows = _set_layout(layer.layout, _LAYOUTS[layout_name])
    g = torch.Generator().manual_seed(8)
    x = torch.randn(rows, 7, 12, generator=g).to(dtype)
    weights = torch.randn(rows, 7, 10, generator=g)
    out, x_grad, grads = _outputs_and_grads(layer, layer, x, weights)
    ref_out, ref_x_grad, ref_grads = _outputs_and_grads(
        layer, lambda t: _reference_forward(layer, t), x, weights)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(x_grad, ref_x_grad, **tol)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    # Drawn again (as gradient checkpointing recomputes): the same masks, the same output.
    with torch.no_grad():
        torch.testing.assert_close(layer(x), out, rtol=0, atol=0)


def test_grouped_layer_on_2d_rows():
    """Rows without a sequence dimension (as MixLoRA's token rows): the same math."""
    layer = _layer()
    rows = _set_layout(layer.layout, [("a", 5, None, 1), ("c", 3, None, 2), ("b", 4, None, 3)])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 12, generator=g)
    weights = torch.randn(rows, 10, generator=g)
    out, x_grad, grads = _outputs_and_grads(layer, layer, x, weights)
    ref = _outputs_and_grads(layer, lambda t: _reference_forward(layer, t), x, weights)
    torch.testing.assert_close(out, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad, ref[1], rtol=1e-5, atol=1e-5)
    for name, grad in ref[2].items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_input_without_grad_and_no_grad_mode():
    """The first layer's input needs no gradient (frozen embeddings); evaluation runs without
    autograd: adapters still get gradients, and no-grad outputs equal the graph's."""
    layer = _layer()
    rows = _set_layout(layer.layout, [("a", 2, 7, 1), ("b", 2, 7, None), ("d", 1, 4, 2)])
    x = torch.randn(rows, 7, 12, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    assert out.requires_grad
    out.square().sum().backward()
    for name in ("a", "b", "d"):
        assert layer.adapters[name].lora_A.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(layer(x), out.detach(), rtol=0, atol=0)
    layer.layout.set_single("a")
    with torch.inference_mode():
        single = layer(x)
    torch.testing.assert_close(single, _reference_forward(layer, x).detach(), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_through_the_layer(use_reentrant):
    from torch.utils.checkpoint import checkpoint

    layer = _layer()
    rows = _set_layout(layer.layout, [("a", 2, 7, 1), ("c", 2, 5, 2), ("b", 2, 7, None)])
    x = torch.randn(rows, 7, 12, generator=torch.Generator().manual_seed(2), requires_grad=True)
    weights = torch.randn(rows, 7, 10, generator=torch.Generator().manual_seed(3))

    def run(fn):
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        out = fn(x)
        (out * weights).sum().backward()
        return out.detach(), x.grad.clone(), [p.grad.clone() for p in layer.parameters()
                                              if p.grad is not None]

    plain = run(layer)
    checkpointed = run(lambda t: checkpoint(layer, t, use_reentrant=use_reentrant))
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(checkpointed[1], plain[1], rtol=1e-6, atol=1e-7)
    for a, b in zip(checkpointed[2], plain[2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_dropout_mask_draws_its_own_region_only():
    """Masks are 0/1 with the keep probability, 1 past the job's length, and a function of
    the generator and the drawn region alone."""
    from engine.train.lora import _dropout_mask

    keep = 0.8
    x = torch.zeros(3, 9, 500)
    mask = _dropout_mask(x, keep, torch.Generator().manual_seed(5), length=6)
    assert mask.shape == x.shape and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert bool((mask[:, 6:] == 1).all())
    drawn = mask[:, :6]
    std = (keep * (1 - keep) / drawn.numel()) ** 0.5
    assert abs(float(drawn.mean()) - keep) < 5 * std
    alone = _dropout_mask(torch.zeros(3, 6, 500), keep, torch.Generator().manual_seed(5), None)
    torch.testing.assert_close(alone, drawn, rtol=0, atol=0)
    other = _dropout_mask(x, keep, torch.Generator().manual_seed(6), length=6)
    assert not torch.equal(other, mask)
    # An odd width; a tiny keep probability keeps (almost) nothing.
    odd = _dropout_mask(torch.zeros(2, 3, 7), keep, torch.Generator().manual_seed(5), None)
    assert odd.shape == (2, 3, 7)
    none = _dropout_mask(torch.zeros(2, 3, 700), 1e-9, torch.Generator().manual_seed(5), None)
    assert float(none.sum()) <= 1


@pytest.mark.parametrize("width", [11, 12])
def test_grouped_masks_equal_each_segments_own(width):
    """The grouped layer draws every segment's mask inside one buffer: the same masks as
    each segment drawn alone (odd and even widths, trimmed lengths, rows between)."""
    layer = _layer(in_features=width)
    rows = _set_layout(layer.layout, [("a", 2, 5, 1), (None, 1, 7, None), ("d", 3, 7, 2),
                                      ("b", 1, 7, 3), ("a", 1, 2, 4)])
    x = torch.randn(rows, 7, width, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), _reference_forward(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout_name", ["stacked, dropout on some", "stacked, no dropout",
                                         "mixed ranks, dropout on some"])
def test_a_nan_adapter_leaves_the_other_rows_untouched(layout_name):
    """One adapter's weights are NaN: its rows are NaN, every other row is exactly what it
    is without that adapter's rows in the batch (a fault stays in its job)."""
    spec = _LAYOUTS[layout_name]
    layer = _layer()
    rows = _set_layout(layer.layout, spec)
    x = torch.randn(rows, 7, 12, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        clean = layer(x)
        layer.adapters["a"].lora_A.fill_(float("nan"))
        dirty = layer(x)
    for seg in layer.layout.segments:
        part = dirty[seg.start:seg.end]
        if seg.adapter == "a":
            assert torch.isnan(part).all()
        else:
            torch.testing.assert_close(part, clean[seg.start:seg.end], rtol=0, atol=0)
