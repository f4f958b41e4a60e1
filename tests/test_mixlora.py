"""MixLoRA (engine/train/variants/mixlora/): a mixture of LoRA experts on the feed-forward
blocks.

References are independent of the code under test: a float64 loop over tokens and experts
written from the definitions in docs/mixlora.md, each adapter trained alone, and the engine's
own logits before saving.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from engine.train.adapters import adapter_modules, adapter_state_dict, attach_adapter
from engine.core.config import AdapterConfig, ModelConfig, RunConfig, TrainConfig, parse_config
from engine.core.errors import ConfigError
from engine.train.lora import BatchLayout, Segment
from engine.train.models import find_target_linears
from engine.train.variants import variant_for
from engine.train.variants.mixlora.experts import MixLoraExperts
from engine.train.engine import Engine
from tiny_models import build_tiny_model, tiny_model_dir

FFN = {"llama": ["gate_proj", "up_proj", "down_proj"], "phi3": ["gate_up_proj", "down_proj"],
       "phi": ["fc1", "fc2"]}
KIND = {"llama": "gated", "phi3": "fused", "phi": "plain"}
WORDS = "alpha beta gamma delta red green blue cat dog fox one two three four five".split()


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.choices(WORDS, k=rng.randint(1, 9))
        row = {"instruction": rng.choice(["Repeat.", "Copy it.", "Say it loud."]),
               "output": " ".join(w.upper() for w in words)}
        if i % 3:
            row["input"] = " ".join(words)
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("mixdata")
    files = {}
    for i, name in enumerate(("a", "b", "c", "d")):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _rows(9 + 2 * i, seed=i)))
        files[name] = str(path)
    return files


def _load(family: str, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family, tmp_path_factory),
                                                 dtype=torch.float32)
    return model.requires_grad_(False).eval()


# -- 1. the batched layer against a float64 loop over tokens and experts ---------------------


def _ffn(kind: str, weights: dict, act, x: torch.Tensor) -> torch.Tensor:
    """A feed-forward block of ``weights`` ({projection: (W, b)}) on one token, as written."""
    def lin(name, v):
        w, b = weights[name]
        return w @ v + (b if b is not None else 0)
    if kind == "gated":
        return lin("down_proj", act(lin("gate_proj", x)) * lin("up_proj", x))
    if kind == "fused":
        gate, up = lin("gate_up_proj", x).chunk(2)
        return lin("down_proj", up * act(gate))
    return lin("fc2", act(lin("fc1", x)))


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().clone().requires_grad_(True)


def _adapted(base: tuple, lora: dict | None, r: int, alpha: float, rslora: bool) -> tuple:
    """(W', b) of one projection with a LoRA (and DoRA magnitude) applied, as PEFT defines it."""
    weight, bias = base
    if lora is None:
        return base
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    adapted = weight + scaling * lora["B"] @ lora["A"]
    if "m" in lora:    # DoRA: the row norms are constants (PEFT detaches them)
        adapted = (lora["m"] / adapted.norm(dim=1).detach())[:, None] * adapted
    return adapted, bias


def _reference(kind, base, act, expert_act, x, real, mix, experts, router, capacity):
    """Output, router loss of a MixLoRA block on rows ``x`` (rows, width, hidden), float64.

    ``real[r][t]``: whether token t of row r is a real token; ``experts[e][proj]``: that
    expert's LoRA leaves; ``mix``: the adapter's settings.
    """
    n_experts = router.shape[0]
    lora = mix["expert_lora"]
    expert_weights = [{p: _adapted(base[p], experts[e].get(p), lora["r"], lora["lora_alpha"],
                                   lora["use_rslora"]) for p in base}
                      for e in range(n_experts)]
    rows = []
    probs_all, scores_all, choices = [], [], []
    for r in range(x.shape[0]):
        used = [0] * n_experts
        outs = []
        for t in range(x.shape[1]):
            xt = x[r, t]
            plain = _ffn(kind, base, act, xt)
            if not real[r][t]:
                outs.append(plain)
                continue
            scores = router @ xt
            if mix.get("temperature"):
                scores = scores / mix["temperature"]
            p = torch.softmax(scores, dim=0)
            ranked = sorted(range(n_experts), key=lambda e: -float(p[e].detach()))
            strategy = mix["routing_strategy"]
            if strategy == "mixlora":
                chosen = ranked[:mix["top_k"]]
                picked = chosen
            elif strategy == "mixlora-dynamic":
                chosen, mass = [], 0.0
                for e in ranked:
                    chosen.append(e)
                    mass += float(p[e].detach())
                    if mass >= mix["top_p"]:
                        break
                picked = chosen
            else:
                chosen = [ranked[0]]
                picked = []
                if capacity is None or used[ranked[0]] < capacity:
                    used[ranked[0]] += 1
                    picked = chosen
            choices += chosen
            probs_all.append(p)
            scores_all.append(scores)
            if strategy == "mixlora-switch":
                y = plain
                for e in picked:
                    y = y + p[e] * (_ffn(kind, expert_weights[e], expert_act, xt) - plain)
            else:
                total = sum(p[e] for e in picked)
                y = sum(p[e] / total * _ffn(kind, expert_weights[e], expert_act, xt)
                        for e in picked)
            outs.append(y)
        rows.append(torch.stack(outs))
    probs = torch.stack(probs_all)
    share = torch.tensor([choices.count(e) / len(choices) for e in range(n_experts)],
                         dtype=torch.float64)
    aux = n_experts * (share * probs.mean(dim=0)).sum()
    z = (torch.logsumexp(torch.stack(scores_all), dim=1) ** 2).mean()
    loss = mix["router_aux_loss_coef"] * aux + mix["router_z_loss_coef"] * z
    return torch.stack(rows), loss


LAYER_CASES = [
    ("llama", dict(routing_strategy="mixlora", top_k=2)),
    ("llama", dict(routing_strategy="mixlora-dynamic", top_p=0.7, temperature=1.7)),
    ("llama", dict(routing_strategy="mixlora-switch", expert_capacity=2)),
    ("phi3", dict(routing_strategy="mixlora", top_k=3, act_fn="gelu_new",
                  expert_lora={"r": 3, "lora_alpha": 5, "use_rslora": True, "use_dora": True})),
    ("phi", dict(routing_strategy="mixlora-switch", expert_capacity=3)),
]


@pytest.mark.parametrize("family, fields", LAYER_CASES,
                         ids=[f"{f}-{c['routing_strategy']}" for f, c in LAYER_CASES])
def test_batched_layer_equals_a_float64_loop_over_tokens_and_experts(family, fields,
                                                                     tmp_path_factory):
    from transformers.activations import ACT2FN

    from engine.core.config import resolve_mixlora

    torch.manual_seed(0)
    model = _load(family, tmp_path_factory)
    layout = BatchLayout()
    cfg = AdapterConfig(name="mix", data="unused", r=4, lora_alpha=8, lora_dropout=0.0,
                        num_experts=4, router_init_range=0.3, router_aux_loss_coef=0.05,
                        router_z_loss_coef=0.02, jitter_noise=0.0, target_modules=FFN[family],
                        **fields)
    names = list(find_target_linears(model, FFN[family]))
    mix_variant = variant_for("mix", cfg)
    mix_variant.attach(model, layout, names, init_seed=3, device=torch.device("cpu"))
    # Every targeted linear went to the experts: no plain LoRA of its own.
    assert all(isinstance(m, MixLoraExperts) for m in adapter_modules(model, "mix").values())
    # Another adapter's plain LoRA on the same linears, for the rows of its own segment.
    attach_adapter(model, layout, "plain", names, r=2, alpha=4, dropout=0.0, use_rslora=False,
                   use_dora=False, init_seed=5, device=torch.device("cpu"))
    mlp = model.model.layers[0].mlp
    experts = mlp.mixlora.adapters["mix"]
    with torch.no_grad():   # B != 0 so that every term of the math is live
        for p in model.parameters():
            if p.requires_grad and p.dim() == 2 and p.shape[1] <= 4:
                p.normal_(0, 0.2)

    # Rows 0-1: the MixLoRA job, own length 5 of the batch's 6, row 1 with 3 real tokens;
    # rows 2-3: the plain job.
    hidden = model.config.hidden_size
    x = torch.randn(4, 6, hidden)
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1] * 6, [1] * 6])
    segments = [Segment("mix", 0, 2, 5, dropout_seed=11), Segment("plain", 2, 4, 6, 12)]
    layout.set_segments(segments)
    mix_variant.begin_pass(segments[0], attention)
    segments[0].tokens_to(torch.device("cpu"))
    out = mlp(x)
    loss = mix_variant.extra_loss()
    cotangent = torch.randn_like(out)
    ((out * cotangent).sum() + loss).backward()

    # The reference, from the model's weights and the adapters' tensors as float64 leaves.
    kind = KIND[family]
    base = {p: (getattr(mlp, p).base.weight.double(),
                None if getattr(mlp, p).base.bias is None else getattr(mlp, p).base.bias.double())
            for p in FFN[family]}
    act = getattr(mlp, "act_fn", None) or mlp.activation_fn
    mix = resolve_mixlora({**vars(cfg)})
    expert_act = ACT2FN[mix["act_fn"]] if mix["act_fn"] else act
    leaves = [{p: {"A": _leaf(a.lora_A), "B": _leaf(a.lora_B),
                   **({"m": _leaf(a.magnitude)} if hasattr(a, "magnitude") else {})}
               for p, a in expert.items()} for expert in experts.experts]
    router = _leaf(experts.router)
    real = [[t < 5 and bool(attention[r, t]) for t in range(6)] for r in range(2)]
    ref_mix, ref_loss = _reference(kind, base, act, expert_act, x[:2].double(), real, mix,
                                   leaves, router, mix["expert_capacity"])
    plain_leaves = {p: {"A": _leaf(getattr(mlp, p).adapters["plain"].lora_A),
                        "B": _leaf(getattr(mlp, p).adapters["plain"].lora_B)} for p in base}
    plain_weights = {p: _adapted(base[p], plain_leaves[p], 2, 4, False) for p in base}
    ref_plain = torch.stack([torch.stack([_ffn(kind, plain_weights, act, x[r, t].double())
                                          for t in range(6)]) for r in (2, 3)])
    ref_out = torch.cat([ref_mix, ref_plain])
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)

    ((ref_out * cotangent.double()).sum() + ref_loss).backward()
    pairs = [(experts.router, router)]
    for expert, ref in zip(experts.experts, leaves):
        for p, adapter in expert.items():
            pairs += [(adapter.lora_A, ref[p]["A"]), (adapter.lora_B, ref[p]["B"])]
            if hasattr(adapter, "magnitude"):
                pairs.append((adapter.magnitude, ref[p]["m"]))
    for p in base:
        pairs += [(getattr(mlp, p).adapters["plain"].lora_A, plain_leaves[p]["A"]),
                  (getattr(mlp, p).adapters["plain"].lora_B, plain_leaves[p]["B"])]
    live = 0
    for param, ref in pairs:
        got = param.grad.double() if param.grad is not None else torch.zeros_like(ref)
        expected = ref.grad if ref.grad is not None else torch.zeros_like(ref)
        if expected.norm() == 0:   # an expert no token went to
            assert got.norm() == 0
            continue
        live += 1
        error = (got - expected).norm() / expected.norm()
        assert error < 1e-5, f"{tuple(param.shape)}: relative gradient error {error:.2e}"
    assert live >= 0.75 * len(pairs) and experts.router.grad.norm() > 0

    # Generation and evaluation: one adapter on every row, every token routed, no capacity.
    layout.set_single("mix")
    with torch.no_grad():
        single = mlp(x[:2])
    every = [[True] * 6, [True] * 6]
    ref_single, _ = _reference(kind, base, act, expert_act, x[:2].double(), every, mix,
                               leaves, router, None)
    torch.testing.assert_close(single.double(), ref_single.detach(), rtol=1e-5, atol=1e-5)


# -- 2, 3, 6. trained together = trained alone; saved = reloaded; router events ---------------


def _run_config(model_dir: Path, out: Path, adapters: list[AdapterConfig]) -> RunConfig:
    return RunConfig(model=ModelConfig(base_model=str(model_dir), attn_impl="sdpa"),
                     train=TrainConfig(output_dir=str(out), seed=7, cutoff_len=64,
                                       save_step=1000, train_lora_simultaneously_num=8),
                     adapters=adapters)


def _adapters(family: str, files: dict[str, str]) -> list[AdapterConfig]:
    common = dict(prompt="alpaca_short", num_epochs=1, lr=1e-2)
    if family == "llama":
        return [
            AdapterConfig(name="mixA", data=files["a"], r=4, lora_alpha=8, lora_dropout=0.1,
                          routing_strategy="mixlora", num_experts=4, top_k=2,
                          jitter_noise=0.1, ffn_dropout=0.1, router_init_range=0.2,
                          router_aux_loss_coef=0.05, router_z_loss_coef=0.01,
                          expert_lora={"r": 2, "lora_alpha": 4, "use_rslora": True},
                          batch_size=4, micro_batch_size=2, max_grad_norm=1.0, **common),
            AdapterConfig(name="mixB", data=files["b"], r=2, lora_alpha=4, lora_dropout=0.1,
                          routing_strategy="mixlora-dynamic", num_experts=3, top_p=0.6,
                          temperature=1.5, sparse_step=2, expert_lora={"use_dora": True},
                          target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"],
                          batch_size=3, micro_batch_size=3, seed=5, val_set_size=3,
                          **common),
            AdapterConfig(name="plain", data=files["c"], r=4, lora_alpha=8, lora_dropout=0.1,
                          target_modules=["q_proj", "v_proj", "gate_proj"], batch_size=2,
                          micro_batch_size=2, **common),
            AdapterConfig(name="dora", data=files["d"], r=2, lora_alpha=4, lora_dropout=0.1,
                          use_dora=True, target_modules=["k_proj", "up_proj", "down_proj"],
                          batch_size=4, micro_batch_size=2, **common),
        ]
    return [
        AdapterConfig(name="mixS", data=files["a"], r=4, lora_alpha=8, lora_dropout=0.1,
                      routing_strategy="mixlora-switch", num_experts=3, expert_capacity=4,
                      jitter_noise=0.05, router_init_range=0.5, router_aux_loss_coef=0.05,
                      target_modules=["qkv_proj", "gate_up_proj", "down_proj"],
                      batch_size=4, micro_batch_size=2,
                      # SGD: Adam's per-element normalisation (tested on llama) would turn
                      # float rounding in near-zero gradients into 1e-5-sized differences.
                      optim="sgd", momentum=0.9, **{**common, "lr": 0.3}),
        AdapterConfig(name="plain", data=files["c"], r=4, lora_alpha=8, lora_dropout=0.1,
                      target_modules=["gate_up_proj", "o_proj"], batch_size=2,
                      micro_batch_size=2, **common),
        AdapterConfig(name="dora", data=files["d"], r=2, lora_alpha=4, lora_dropout=0.1,
                      use_dora=True, target_modules=["qkv_proj", "down_proj"], batch_size=4,
                      micro_batch_size=2, **common),
    ]


_ALONE = {"llama": ("mixA", "mixB", "dora"), "phi3": ("mixS",)}


def _assert_same(actual: dict, expected: dict, rtol: float) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        diff = (actual[key] - expected[key]).norm() / expected[key].norm().clamp_min(1e-12)
        assert diff <= rtol, f"{key}: relative difference {diff:.3g} > {rtol}"


@pytest.fixture(scope="module", params=["llama", "phi3"])
def trained(request, data_files, tmp_path_factory):
    """(family, model folder, engine, events) of a run with every adapter of the family together
    (llama: with gradient checkpointing, which must replay routing and router losses)."""
    family = request.param
    model_dir = tiny_model_dir(family, tmp_path_factory)
    config = _run_config(model_dir, tmp_path_factory.mktemp(f"{family}-together"),
                         _adapters(family, data_files))
    config.train.gradient_checkpointing = family == "llama"
    events = []
    engine = Engine(config, on_event=events.append)
    engine.run()
    assert {j.state for j in engine.jobs.values()} == {"done"}
    if family == "llama":   # evaluation routes the validation rows through the experts
        assert [e["job"] for e in events if e["type"] == "eval"] == ["mixB"]
    return family, model_dir, engine, events


def test_mixlora_trained_together_equals_trained_alone(trained, data_files, tmp_path):
    family, model_dir, together, events = trained
    for cfg in _adapters(family, data_files):
        if cfg.name not in _ALONE[family]:
            continue
        alone = Engine(_run_config(model_dir, tmp_path / cfg.name, [cfg]))
        alone.run()
        expected = adapter_state_dict(alone.model, cfg.name)
        actual = adapter_state_dict(together.model, cfg.name)
        if cfg.routing_strategy:
            # Routers and experts were saved, and trained: B moved away from its zero init
            # (in most experts; the router may have sent an expert no token yet).
            assert any(".router.weight" in k for k in actual)
            b_keys = [k for k in actual if ".experts." in k and "lora_B" in k]
            moved = [k for k in b_keys if actual[k].abs().max() > 0]
            assert b_keys and len(moved) >= len(b_keys) / 2, (len(moved), len(b_keys))
        _assert_same(actual, expected, rtol=1e-5)


def test_router_statistics_are_reported_after_each_optimizer_step(trained):
    family, _model_dir, engine, events = trained
    routers = [e for e in events if e["type"] == "router"]
    steps = [e for e in events if e["type"] == "step"]
    for job in engine.jobs.values():
        mine = [e for e in routers if e["job"] == job.name]
        if not job.cfg.routing_strategy:
            assert not mine
            continue
        assert [e["step"] for e in mine] == [e["step"] for e in steps if e["job"] == job.name]
        # Only the job's own real tokens are routed: count them in its first optimizer batch.
        batch = job.data.epoch_batches(0)[0]
        tokens = sum(len(job.data.train[i].input_ids) for i in batch)
        layers = mine[0]["layers"]
        expected_layers = 1 if job.cfg.sparse_step == 2 else 2
        assert len(layers) == expected_layers
        for stats in layers.values():
            assert len(stats["tokens"]) == job.cfg.num_experts
            if job.cfg.routing_strategy == "mixlora":
                assert sum(stats["tokens"]) == job.cfg.top_k * tokens
            elif job.cfg.routing_strategy == "mixlora-dynamic":
                assert tokens <= sum(stats["tokens"]) <= job.cfg.num_experts * tokens
            else:
                assert sum(stats["tokens"]) + stats["dropped"] == tokens
        assert mine[0]["aux_loss"] > 0 and mine[0]["z_loss"] > 0
    if family == "phi3":   # capacity 4 per sequence: some tokens went to the base alone
        assert any(s["dropped"] > 0 for e in routers for s in e["layers"].values())


def test_saved_mixlora_adapter_reloads_with_identical_logits(trained, tmp_path):
    from safetensors.torch import load_file

    from engine.train.adapters import read_adapter_folder
    from engine.train.generate import attach_saved_adapter
    from engine.train.models import load_base_model

    family, model_dir, engine, _events = trained
    device = engine.device
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 11, 8]], device=device)
    for job in engine.jobs.values():
        if not job.cfg.routing_strategy:
            continue
        folder = Path(engine.config.train.output_dir) / job.name
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "MIXLORA"
        assert config["routing_strategy"] == job.cfg.routing_strategy
        assert config["num_experts"] == job.cfg.num_experts
        keys = load_file(folder / "adapter_model.safetensors").keys()
        assert any(k.endswith("mlp.router.weight") for k in keys)
        assert any(".mlp.experts.0." in k and k.endswith("lora_A.weight") for k in keys)
        engine.layout.set_single(job.name)
        with torch.no_grad():
            ours = engine.model(input_ids=ids).logits

        # Generation's loader (mlora generate) on a freshly loaded base model.
        model, _tok, _info = load_base_model(ModelConfig(base_model=str(model_dir)), device)
        peft_cfg, state, _meta = read_adapter_folder(folder)
        attach_saved_adapter(model, peft_cfg, state, folder, device)
        with torch.no_grad():
            loaded = model(input_ids=ids).logits
        torch.testing.assert_close(loaded, ours, rtol=1e-6, atol=1e-6)
        # The adapter changed the model, or the comparison would mean little.
        base = load_base_model(ModelConfig(base_model=str(model_dir)), device)[0]
        with torch.no_grad():
            assert (base(input_ids=ids).logits - ours).abs().max() > 1e-3

        # init_from: a new job starts from the saved weights.
        again = AdapterConfig(**{**vars(job.cfg), "name": "again", "init_from": str(folder)})
        other = Engine(_run_config(model_dir, tmp_path / job.name, [again]),
                       write_metrics=False)
        other.layout.set_single("again")
        with torch.no_grad():
            resumed = other.model(input_ids=ids).logits
        torch.testing.assert_close(resumed, ours, rtol=1e-6, atol=1e-6)


def test_a_stopped_mixlora_run_resumes_bit_identically(data_files, tmp_path, tmp_path_factory):
    model_dir = tiny_model_dir("llama", tmp_path_factory)
    adapters = [a for a in _adapters("llama", data_files) if a.name in ("mixA", "plain")]
    whole = Engine(_run_config(model_dir, tmp_path / "whole", adapters))
    whole.run()
    out = tmp_path / "stopped"
    Engine(_run_config(model_dir, out, adapters)).run(max_steps=3)   # mid-accumulation
    again = Engine(_run_config(model_dir, out, adapters), resume=True)
    again.run()
    for name in ("mixA", "plain"):
        expected = adapter_state_dict(whole.model, name)
        actual = adapter_state_dict(again.model, name)
        assert actual.keys() == expected.keys()
        assert all(torch.equal(actual[k], expected[k]) for k in expected), name


# -- 4. a quantized base -------------------------------------------------------------------


def test_mixlora_on_a_4bit_base_lowers_the_loss(tmp_path):
    pytest.importorskip("bitsandbytes")
    model_dir = build_tiny_model("llama", tmp_path / "model", initializer_range=0.2)
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": "Copy.", "input": "cat dog fox", "output": "CAT DOG FOX"}] * 8
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = AdapterConfig(name="mix", data=str(data), prompt="none", r=4, lora_alpha=8,
                        lora_dropout=0.0, routing_strategy="mixlora", num_experts=4, top_k=2,
                        batch_size=4, micro_batch_size=2, num_epochs=6, lr=1e-2)
    config = RunConfig(model=ModelConfig(base_model=str(model_dir), quantize="4bit"),
                       train=TrainConfig(output_dir=str(tmp_path / "out"), cutoff_len=64),
                       adapters=[cfg])
    events = []
    engine = Engine(config, on_event=events.append)
    mlp = engine.model.model.layers[0].mlp
    assert type(mlp.down_proj).__name__ == "Linear4bit" and "mix" in mlp.mixlora.adapters
    engine.run()
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0], losses
    assert any(e["type"] == "router" for e in events)


# -- 5. configuration errors ----------------------------------------------------------------


BAD = [
    ({"routing_strategy": "mixtral"}, "routing_strategy", 'did you mean "mixlora"?'),
    ({"routing_strategy": "mixlora", "num_experts": 4, "top_k": 5}, "top_k",
     "expected an integer <= num_experts (4), got 5"),
    ({"num_experts": 4}, "num_experts", "used only with routing_strategy"),
    ({"expert_lora": {"r": 2}}, "expert_lora", "used only with routing_strategy"),
    ({"routing_strategy": "mixlora", "top_p": 0.5}, "top_p",
     'only used with routing_strategy = "mixlora-dynamic"'),
    ({"routing_strategy": "mixlora-dynamic", "expert_capacity": 8}, "expert_capacity",
     'only used with routing_strategy = "mixlora-switch"'),
    ({"routing_strategy": "mixlora-switch", "top_k": 1}, "top_k",
     'only used with routing_strategy = "mixlora" (this adapter uses "mixlora-switch")'),
    ({"routing_strategy": "mixlora-dynamic", "top_p": 0}, "top_p",
     "expected a number > 0 and <= 1, got 0"),
    ({"routing_strategy": "mixlora", "num_experts": 0}, "num_experts",
     "expected an integer from 1 to 256, got 0"),
    ({"routing_strategy": "mixlora", "jitter_noise": 1.0}, "jitter_noise", "< 1"),
    ({"routing_strategy": "mixlora", "router_aux_loss_coef": -0.1}, "router_aux_loss_coef",
     "expected a number >= 0"),
    ({"routing_strategy": "mixlora-switch", "expert_capacity": 0}, "expert_capacity",
     "expected an integer >= 1"),
    ({"routing_strategy": "mixlora", "act_fn": "swiglu"}, "act_fn", 'one of "silu"'),
    ({"routing_strategy": "mixlora", "expert_lora": {"rank": 4}}, "expert_lora.rank",
     'unknown key; expert_lora sets r, lora_alpha, lora_dropout, use_rslora, use_dora; '
     'did you mean "r"?'),
    ({"routing_strategy": "mixlora", "expert_lora": {"r": 0}}, "expert_lora.r",
     "expected an integer from 1 to 1024, got 0"),
    ({"routing_strategy": "mixlora", "expert_lora": {"use_dora": "yes"}},
     "expert_lora.use_dora", "expected true or false"),
    ({"routing_strategy": "mixlora", "expert_lora": 4}, "expert_lora", "expected a table"),
    ({"routing_strategy": "mixlora", "sparse_step": 0}, "sparse_step", ">= 1"),
]


@pytest.mark.parametrize("fields, field, fragment", BAD, ids=[b[1] for b in BAD])
def test_bad_mixlora_fields_name_file_table_and_field(fields, field, fragment, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    document = {"adapter": [{"name": "a", "data": "d.jsonl", **fields}]}
    with pytest.raises(ConfigError) as info:
        parse_config(document, "run.toml", tmp_path)
    error = info.value
    assert (error.file, error.table, error.field) == ("run.toml", 'adapter "a"', field)
    assert str(error).startswith(f'run.toml [adapter "a"] {field}: ')
    assert fragment in str(error)


def test_valid_mixlora_fields_get_their_strategys_defaults(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    tables = [{"name": n, "data": "d.jsonl", "routing_strategy": s}
              for n, s in (("k", "mixlora"), ("s", "mixlora-switch"), ("p", "mixlora-dynamic"))]
    tables.append({"name": "plain", "data": "d.jsonl"})
    k, s, p, plain = parse_config({"adapter": tables}, "run.toml", tmp_path).adapters
    assert (k.num_experts, k.top_k, k.top_p, k.expert_capacity) == (8, 2, None, None)
    assert (s.expert_capacity, s.jitter_noise, s.router_z_loss_coef) == (32, 0.01, 0.001)
    assert (p.top_p, p.temperature, p.top_k) == (0.8, 0.0, None)
    assert plain.routing_strategy is None and plain.num_experts is None


def test_experts_need_a_feed_forward_target(tmp_path_factory):
    model = _load("llama", tmp_path_factory)
    cfg = AdapterConfig(name="m", data="unused", routing_strategy="mixlora",
                        target_modules=["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match=r'\[adapter "m"\] target_modules: MixLoRA puts its '
                                          r"experts on feed-forward projections \(this "
                                          r"model's: gate_proj, up_proj, down_proj\)"):
        variant_for("m", cfg).attach(model, BatchLayout(),
                                     list(find_target_linears(model, ["q_proj"])),
                                     init_seed=0, device=torch.device("cpu"))


def test_convert_carries_mixlora_fields_over(tmp_path):
    import sys

    from engine.tools.convert import convert_mlora_json

    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    (tmp_path / "d.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    mlora = {"lora": [
        {"name": "sw", "data": "d.jsonl", "r": 8, "routing_strategy": "switch",
         "num_experts": 4, "expert_capacity": 16, "jitter_noise": 0.1, "ffn_dropout": 0.1,
         "act_fn": "gelu_new", "top_k": 2, "router_loss": False,
         "expert_lora": {"r": 4, "alpha": 8, "dropout": 0.1, "lora_init": "gaussian"},
         "target_modules": {"q_proj": True, "w1_proj": True, "w2_proj": True, "w3_proj": True}},
        {"name": "dyn", "data": "d.jsonl", "routing_strategy": "mixlora-dynamic",
         "top_p": 0.9, "temperature": 0.5, "router_dyn_loss_coef": 0.01},
        {"name": "plain", "data": "d.jsonl", "num_experts": 8},
    ]}
    (tmp_path / "m.json").write_text(json.dumps(mlora))
    text = convert_mlora_json(tmp_path / "m.json")
    sw, dyn, plain = parse_config(tomllib.loads(text), "converted", tmp_path).adapters
    assert (sw.routing_strategy, sw.num_experts, sw.expert_capacity, sw.jitter_noise,
            sw.ffn_dropout, sw.act_fn) == ("mixlora-switch", 4, 16, 0.1, 0.1, "gelu_new")
    assert (sw.router_aux_loss_coef, sw.router_z_loss_coef) == (0.0, 0.0)   # router_loss off
    assert sw.expert_lora == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}
    assert sw.top_k is None and sw.target_modules == ["q_proj", "gate_proj", "down_proj",
                                                      "up_proj"]
    assert (dyn.routing_strategy, dyn.top_p, dyn.temperature) == ("mixlora-dynamic", 0.9, 0.5)
    assert plain.routing_strategy is None and plain.num_experts is None
    for fragment in ("# top_k = 2  # not used by routing_strategy 'mixlora-switch'",
                     "m-LoRA's 'switch' is 'mixlora-switch' here", '"expert_lora.lora_init"',
                     "# router_dyn_loss_coef = 0.01  # no equivalent",
                     "# num_experts = 8  # MixLoRA field without routing_strategy"):
        assert fragment in text, fragment


def test_a_pass_retried_after_out_of_memory_counts_its_router_tokens_once(data_files,
                                                                          tmp_path_factory):
    """Out of memory in the last layer, after the first layer's router recorded its tokens:
    the step is retried one job per pass, and the router statistics equal a run without
    the fault."""
    model_dir = tiny_model_dir("llama", tmp_path_factory)
    adapters = [cfg for cfg in _adapters("llama", data_files) if cfg.name in ("mixA", "plain")]
    runs = {}
    for fault in (False, True):
        config = _run_config(model_dir, tmp_path_factory.mktemp(f"oom-{fault}"), adapters)
        config.train.packing = "off"            # both jobs in one pass, until it fails
        events: list[dict] = []
        engine = Engine(config, on_event=events.append, write_metrics=False)
        engine.pass_overhead = 10**9
        if fault:
            def fail(_module, _args, _kwargs, engine=engine):
                if len(engine.layout.segments) > 1:
                    raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            engine.decoder.layers[-1].register_forward_pre_hook(fail, with_kwargs=True)
        engine.run(max_steps=3)
        runs[fault] = events
    routers = {fault: [(e["step"], e["layers"]) for e in events if e["type"] == "router"]
               for fault, events in runs.items()}
    assert any("out of memory" in e.get("message", "") for e in runs[True] if e["type"] == "log")
    assert routers[False] and routers[True] == routers[False]
