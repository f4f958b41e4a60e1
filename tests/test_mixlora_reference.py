"""MixLoRA's random parts in training (router jitter, expert LoRA dropout, ffn_dropout) against
an independent plain-torch feed-forward block written from docs/mixlora.md and the paper.

The engine draws its noise from generators seeded per job, micro-batch and layer (so a job
trains alone as batched); the reference draws from torch's own generator. Draws cannot be
matched one for one, so the two are compared as distributions: over many draws, the mean
and the spread of every output element. Without any random part, the two blocks are equal
draw for draw, which shows the reference computes what the engine's block does.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from engine.core.config import AdapterConfig
from engine.train.adapters import adapter_state_dict, load_adapter_state
from engine.train.engine import Engine
from engine.train.lora import Segment
from test_engine_exactness import _run_config
from tiny_models import tiny_model_dir

ROWS, WIDTH, EXPERTS, R, ALPHA = 2, 6, 4, 4, 8
DRAWS = 1000
BLOCK = "base_model.model.model.layers.0.mlp"


def _engine_block(model_dir, folder, strategy: str, knobs: dict):
    """(the engine, its layer-0 feed-forward block, the adapter's state) for a MixLoRA adapter
    with random expert B (so experts differ) on a tiny llama."""
    data = folder / "one.jsonl"
    data.write_text(json.dumps({"instruction": "Copy.", "output": "COPY"}) + "\n")
    routing = {"top_k": 2} if strategy == "mixlora" else {"expert_capacity": WIDTH}
    cfg = AdapterConfig(name="mix", data=str(data), prompt="alpaca_short", r=R,
                        lora_alpha=ALPHA, routing_strategy=strategy, num_experts=EXPERTS,
                        router_init_range=0.1, jitter_noise=knobs.get("jitter", 0.0),
                        ffn_dropout=knobs.get("ffn_dropout", 0.0),
                        expert_lora={"r": R, "lora_alpha": ALPHA,
                                     "lora_dropout": knobs.get("expert_dropout", 0.0)},
                        target_modules=["gate_proj", "up_proj", "down_proj"], **routing)
    engine = Engine(_run_config(model_dir, folder / "out", [cfg]))
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.2 * torch.randn(v.shape, generator=g) if "lora_B" in k else v
             for k, v in adapter_state_dict(engine.model, "mix").items()}
    load_adapter_state(engine.model, "mix", state, source="test")
    return engine, engine.model.model.layers[0].mlp, state


def _lora(state: dict, expert: int, proj: str, x: torch.Tensor, p: float,
          generator: torch.Generator) -> torch.Tensor:
    """An expert's LoRA delta on ``x``, its input dropped out (p) as PEFT's nn.Dropout does."""
    key = f"{BLOCK}.experts.{expert}.{proj}"
    if p > 0:
        keep = torch.rand(x.shape, generator=generator, dtype=x.dtype) >= p
        x = x * keep / (1 - p)
    return (ALPHA / R) * (x @ state[f"{key}.lora_A.weight"].double().t()
                          @ state[f"{key}.lora_B.weight"].double().t())


def _reference_block(x, base: dict, state: dict, strategy: str, knobs: dict,
                     generator: torch.Generator) -> torch.Tensor:
    """One training draw of the block on tokens ``x`` (tokens, hidden), float64.

    Routing (docs/mixlora.md, MixLoRA paper sec. 3): the router scores the input times
    uniform(1 - j, 1 + j) noise (jitter, the router's input only); "mixlora" mixes its top-k
    experts with renormalised probabilities, "mixlora-switch" gives the top expert its
    probability p of the base's share: base + sum_e w_e (E_e(x) - base). Expert e is the
    base block with a LoRA on each projection. ffn_dropout drops elements of the experts'
    contribution (the sum), scaled by 1 / (1 - p).
    """
    def block(v, expert=None):
        def proj(name, inp):
            out = inp @ base[name].t()
            if expert is not None:
                out = out + _lora(state, expert, name, inp, knobs.get("expert_dropout", 0.0),
                                  generator)
            return out
        return proj("down_proj", F.silu(proj("gate_proj", v)) * proj("up_proj", v))

    jitter = knobs.get("jitter", 0.0)
    noise = 1 - jitter + 2 * jitter * torch.rand(x.shape, generator=generator, dtype=x.dtype)
    probs = ((x * noise) @ state[f"{BLOCK}.router.weight"].double().t()).softmax(dim=-1)
    if strategy == "mixlora":
        top, chosen = probs.topk(2, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)
    else:
        top, chosen = probs.max(dim=-1, keepdim=True)
    plain = block(x)
    delta = torch.zeros_like(plain)
    for e in range(EXPERTS):
        weight = (top * (chosen == e)).sum(dim=-1, keepdim=True)
        delta = delta + weight * (block(x, e) - plain)
    p = knobs.get("ffn_dropout", 0.0)
    if p > 0:
        delta = delta * (torch.rand(delta.shape, generator=generator, dtype=x.dtype) >= p) / (1 - p)
    return plain + delta


def _engine_draws(engine, mlp, x: torch.Tensor, seeds) -> torch.Tensor:
    """The block's training output on ``x`` for each micro-batch seed (one row of outputs a
    draw, float64)."""
    outputs = []
    with torch.no_grad():
        for seed in seeds:
            engine.layout.set_segments([Segment("mix", 0, ROWS, WIDTH, dropout_seed=seed)])
            outputs.append(mlp(x).reshape(ROWS * WIDTH, -1).double())
    return torch.stack(outputs)


CASES = {   # (strategy, knobs)
    "jitter": ("mixlora", {"jitter": 0.3}),
    "expert dropout": ("mixlora", {"expert_dropout": 0.3}),
    "ffn dropout": ("mixlora", {"ffn_dropout": 0.3}),
    "switch, all three": ("mixlora-switch", {"jitter": 0.3, "expert_dropout": 0.2,
                                             "ffn_dropout": 0.2}),
}


@pytest.fixture
def one_thread():
    """Many tiny draws: one thread is some 40x faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", list(CASES))
def test_jitter_and_dropouts_have_the_reference_distribution(case, one_thread, tmp_path,
                                                             tmp_path_factory):
    from transformers import AutoModelForCausalLM

    strategy, knobs = CASES[case]
    model_dir = tiny_model_dir("llama", tmp_path_factory)
    engine, mlp, state = _engine_block(model_dir, tmp_path, strategy, knobs)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base = {name: getattr(hf.model.layers[0].mlp, name).weight.detach().double()
            for name in ("gate_proj", "up_proj", "down_proj")}
    x = torch.randn(ROWS, WIDTH, base["up_proj"].shape[1],
                    generator=torch.Generator().manual_seed(2))
    tokens = x.reshape(ROWS * WIDTH, -1).double()
    generator = torch.Generator().manual_seed(3)

    # Without the random parts (evaluation), the blocks agree exactly.
    engine.layout.set_single("mix")
    with torch.no_grad():
        quiet = mlp(x).reshape(ROWS * WIDTH, -1).double()
    torch.testing.assert_close(quiet, _reference_block(tokens, base, state, strategy, {},
                                                       generator), rtol=1e-5, atol=1e-6)

    mine = _engine_draws(engine, mlp, x, range(DRAWS))
    # The reference's tokens are independent of each other: all draws in one call.
    reference = _reference_block(tokens.repeat(DRAWS, 1), base, state, strategy, knobs,
                                 generator).view(DRAWS, *tokens.shape)
    spread = {"engine": mine.var(dim=0), "reference": reference.var(dim=0)}
    assert spread["engine"].min() > 0, "a knob that is on changed nothing"
    z = (mine.mean(dim=0) - reference.mean(dim=0)) / (
        (spread["engine"] + spread["reference"]) / DRAWS).sqrt()
    # Standard errors between the means: about 1 on average when the expectations agree.
    assert z.square().mean() < 1.6 and z.abs().max() < 6, (z.square().mean(), z.abs().max())
    ratio = float(spread["engine"].sum() / spread["reference"].sum())
    assert 0.85 < ratio < 1.15, f"total variance, engine / reference: {ratio:.3f}"
    # The spread falls on the same elements (jitter on the router's input only, say).
    shape = torch.corrcoef(torch.stack([spread["engine"].flatten(),
                                        spread["reference"].flatten()]))[0, 1]
    assert shape > 0.9, f"variance per element, correlation {shape:.3f}"
    if set(knobs) == {"ffn_dropout"}:
        # Dropout of the experts' sum keeps the expectation: the quiet output.
        z = (mine.mean(dim=0) - quiet) / (spread["engine"] / DRAWS).sqrt()
        assert z.square().mean() < 1.6, z.square().mean()
