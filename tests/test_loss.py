"""The chunked LM-head loss equals autograd's and a float64 reference; passes cut padding."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from engine.train.loss import chunked_head_loss
from engine.train.planning import plan_passes


def _head(vocab: int, dim: int, bias: bool, dtype: torch.dtype) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(dim, vocab, bias=bias).to(dtype)
    head.requires_grad_(False)
    return head


def _reference(hidden, head, targets, softcap):
    """Autograd through the plain computation, all tokens at once, in float64."""
    h = hidden.detach().double().requires_grad_(True)
    logits = F.linear(h, head.weight.double(), None if head.bias is None else head.bias.double())
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    loss = F.cross_entropy(logits, targets, reduction="sum")
    loss.backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("softcap,bias,chunk", [(None, False, 7), (30.0, False, 5),
                                                (None, True, 1000), (5.0, True, 1)])
def test_chunked_loss_and_gradient_equal_a_float64_reference(softcap, bias, chunk):
    head = _head(vocab=97, dim=16, bias=bias, dtype=torch.float32)
    hidden = (torch.randn(23, 16, generator=torch.Generator().manual_seed(1)) * 3
              ).requires_grad_(True)
    targets = torch.randint(0, 97, (23,), generator=torch.Generator().manual_seed(2))
    loss = chunked_head_loss(hidden, head, targets, softcap, chunk=chunk)
    (loss * 0.5).backward()
    ref_loss, ref_grad = _reference(hidden, head, targets, softcap)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), ref_grad * 0.5, rtol=1e-5, atol=1e-7)


def test_chunked_loss_in_bf16_matches_autograd_through_the_same_casts():
    head = _head(vocab=64, dim=32, bias=False, dtype=torch.bfloat16)
    base = torch.randn(40, 32, generator=torch.Generator().manual_seed(3)).bfloat16()
    targets = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(4))
    a = base.clone().requires_grad_(True)
    chunked_head_loss(a, head, targets, chunk=9).backward()
    b = base.clone().requires_grad_(True)
    F.cross_entropy(head(b).float(), targets, reduction="sum").backward()
    assert a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=1.6e-2, atol=1e-3)


def test_chunked_loss_without_gradients_and_a_trainable_head_is_refused():
    head = _head(vocab=10, dim=4, bias=False, dtype=torch.float32)
    hidden = torch.randn(3, 4)
    targets = torch.tensor([1, 2, 3])
    with torch.no_grad():
        value = chunked_head_loss(hidden, head, targets, chunk=2)
    torch.testing.assert_close(value, F.cross_entropy(head(hidden), targets, reduction="sum"))
    head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        chunked_head_loss(hidden, head, targets)


def _cost(widths, groups, overhead):
    return sum(sum(widths[i][0] for i in g) * max(widths[i][1] for i in g) + overhead
               for g in groups)


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for k in range(len(part)):
            yield part[:k] + [[first] + part[k]] + part[k + 1:]
        yield [[first]] + part


def test_plan_passes_finds_the_cheapest_grouping():
    rng = random.Random(5)
    for _ in range(60):
        n = rng.randint(1, 6)
        widths = [(rng.randint(1, 4), rng.randint(5, 300)) for _ in range(n)]
        overhead = rng.choice([0, 50, 256, 10**6])
        plan = plan_passes(widths, overhead=overhead)
        assert sorted(itertools.chain(*plan)) == list(range(n))
        best = min(_cost(widths, p, overhead) for p in _partitions(list(range(n))))
        assert _cost(widths, plan, overhead) == best


def test_plan_passes_keeps_to_the_token_budget_and_to_one_pass_when_even():
    widths = [(2, 100), (2, 100), (2, 100), (2, 400)]
    assert plan_passes(widths, overhead=256) == [[0, 1, 2], [3]]
    assert plan_passes([(2, 100)] * 4, overhead=256) == [[0, 1, 2, 3]]
    budget = plan_passes([(2, 100)] * 4, max_tokens=400, overhead=10**6)
    assert budget == [[0, 1], [2, 3]]
    # A micro-batch larger than the budget still runs, alone.
    assert plan_passes([(4, 200), (1, 10)], max_tokens=100, overhead=0) == [[0], [1]]
