"""Sequence packing: a packed pass trains exactly as padded rows do, in every family.

The reference for the packed path is the padded one (itself checked against PEFT and
Hugging Face's loss in test_engine_exactness.py): the same jobs, without dropout, give
the same losses and the same trained weights either way. The families' sliding windows
are set short so that examples are longer than a window, and Gemma 2's attention
soft-capping is on (its default), so the packed attention's windowed and soft-capped
paths are compared with transformers' own.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from engine.train import packing
from engine.core.config import AdapterConfig, ModelConfig, RunConfig, TrainConfig
from engine.core.data import IGNORE_INDEX, Encoded
from engine.core.errors import ConfigError
from engine.train.engine import Engine
from tiny_models import FAMILIES, build_tiny_model

WORDS = "red green blue cat dog fox jumps over the lazy quick brown one two three".split()


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": " ".join(rng.choices(WORDS, k=rng.randint(1, 6))),
             "input": " ".join(rng.choices(WORDS, k=rng.randint(0, 8))),
             "output": " ".join(rng.choices(WORDS, k=rng.randint(1, 10)))}
            for _ in range(n)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("packing-data") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(24, seed=5)))
    return str(path)


def _config(model_dir: Path, out: Path, data: str, packing_mode: str,
            dropout: float = 0.0, **train) -> RunConfig:
    adapters = [
        AdapterConfig(name="a", data=data, prompt="alpaca_short", r=4, lora_alpha=8,
                      lora_dropout=dropout, batch_size=3, micro_batch_size=3, num_epochs=1,
                      lr=1e-2, target_modules=None, train_on_inputs=True),
        AdapterConfig(name="b", data=data, prompt="alpaca_short", r=2, lora_alpha=4,
                      lora_dropout=dropout, use_dora=True, batch_size=4, micro_batch_size=2,
                      num_epochs=1, lr=1e-2, seed=9),
    ]
    return RunConfig(model=ModelConfig(base_model=str(model_dir)),
                     train=TrainConfig(output_dir=str(out), seed=3, cutoff_len=64,
                                       save_step=1000, packing=packing_mode, **train),
                     adapters=adapters)


def _train(config: RunConfig, steps: int) -> tuple[Engine, list[dict]]:
    events: list[dict] = []
    engine = Engine(config, on_event=events.append, write_metrics=False)
    engine.run(max_steps=steps)
    return engine, events


def _weights(engine: Engine, name: str) -> dict[str, torch.Tensor]:
    from engine.train.adapters import adapter_state_dict
    return adapter_state_dict(engine.model, name)


def _assert_close(mine: dict, reference: dict, rtol: float, what: str) -> None:
    """Every tensor of ``reference`` within ``rtol`` (relative norm) in ``mine``."""
    for key in reference:
        diff = (mine[key] - reference[key]).norm() / reference[key].norm().clamp_min(1e-12)
        assert diff < rtol, f"{what} {key}: {diff:.3g}"


def _losses(events: list[dict]) -> list[tuple[str, int, float]]:
    return [(e["job"], e["step"], e["loss"]) for e in events if e["type"] == "step"]


def test_pack_puts_examples_back_to_back_with_restarting_positions():
    examples = [Encoded(input_ids=[5, 6, 7], labels=[-100, 6, 7], truncated=False),
                Encoded(input_ids=[8, 9], labels=[8, 9], truncated=False)]
    row = packing.pack(examples)
    assert row.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert row.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # The second example's first label is dropped: it would be predicted by the first
    # example's last token. Its own later labels stay.
    assert row.labels.tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert row.bounds == [(0, 3), (3, 5)]
    assert row.tokens == 5


# Families whose attention has a sliding window: shorter than the examples here.
_WINDOWED = {"mistral", "phi3", "gemma2", "gemma3_text"}
# Gemma 2's default soft cap (50) barely bends a tiny model's small attention logits.
_SOFTCAPPED = {"gemma2": {"attn_logit_softcapping": 0.5}}


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_training_equals_padded_training(family, data_file, tmp_path):
    overrides = {"sliding_window": 6} if family in _WINDOWED else {}
    overrides.update(_SOFTCAPPED.get(family, {}))
    model_dir = build_tiny_model(family, tmp_path / "model", **overrides)
    packed, packed_events = _train(_config(model_dir, tmp_path / "on", data_file, "on"), 3)
    padded, padded_events = _train(_config(model_dir, tmp_path / "off", data_file, "off"), 3)
    assert packed.packing and not padded.packing
    batches = [e for e in packed_events if e["type"] == "batch"]
    assert batches and all(b["packed"] == b["passes"] == 1 and b["padding"] == 0
                           for b in batches)
    assert any(b["padding"] > 0 for b in padded_events if b["type"] == "batch")
    ours, theirs = _losses(packed_events), _losses(padded_events)
    assert [x[:2] for x in ours] == [x[:2] for x in theirs] and len(ours) >= 4
    for (_job, _step, a), (_j, _s, b) in zip(ours, theirs):
        assert a == pytest.approx(b, rel=1e-5)
    for name in ("a", "b"):
        mine, reference = _weights(packed, name), _weights(padded, name)
        assert mine.keys() == reference.keys()
        _assert_close(mine, reference, 1e-4, f"{family} {name}")
        # Training moved the adapter (B starts at zero).
        assert any(v.abs().max() > 0 for k, v in mine.items() if "lora_B" in k)


def test_packed_jobs_with_dropout_train_together_as_alone(data_file, tmp_path):
    """A packed job's dropout masks depend on its own tokens only, not on its companions."""
    model_dir = build_tiny_model("llama", tmp_path / "model")
    together, _ = _train(_config(model_dir, tmp_path / "both", data_file, "on", 0.2), 4)
    without, _ = _train(_config(model_dir, tmp_path / "none", data_file, "on", 0.0), 4)
    # Dropout is on in packed passes: it changes what the adapters learn.
    assert any(not torch.allclose(value, _weights(without, "a")[key], rtol=1e-3)
               for key, value in _weights(together, "a").items() if "lora_B" in key)
    for name in ("a", "b"):
        config = _config(model_dir, tmp_path / name, data_file, "on", 0.2)
        config.adapters = [a for a in config.adapters if a.name == name]
        alone, _ = _train(config, 4)
        mine, reference = _weights(together, name), _weights(alone, name)
        _assert_close(mine, reference, 1e-5, name)


def test_evaluation_packed_equals_padded(data_file, tmp_path):
    model_dir = build_tiny_model("llama", tmp_path / "model")
    losses = {}
    for mode in ("on", "off"):
        config = _config(model_dir, tmp_path / mode, data_file, mode)
        for adapter in config.adapters:
            adapter.val_set_size = 5
        engine, _events = _train(config, 2)     # B is no longer zero
        losses[mode] = {name: engine.evaluate(job) for name, job in engine.jobs.items()}
    assert all(value is not None and value > 0 for value in losses["on"].values())
    for name, value in losses["off"].items():
        assert losses["on"][name] == pytest.approx(value, rel=1e-5)


def test_token_budget_splits_packed_passes_without_changing_results(data_file, tmp_path):
    model_dir = build_tiny_model("llama", tmp_path / "model")
    one, one_events = _train(_config(model_dir, tmp_path / "one", data_file, "on"), 3)
    split, split_events = _train(_config(model_dir, tmp_path / "split", data_file, "on",
                                         max_tokens_per_step=40), 3)
    assert all(b["passes"] == 1 for b in one_events if b["type"] == "batch")
    assert all(b["passes"] == b["packed"] == 2 for b in split_events if b["type"] == "batch")
    for name in ("a", "b"):
        mine, reference = _weights(split, name), _weights(one, name)
        _assert_close(mine, reference, 1e-5, name)


def test_probe_refuses_attention_that_crosses_examples(tmp_path, monkeypatch):
    """If the packed attention let an example see the one before it, the probe says so."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from engine.train.models import hidden_states_and_head
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model("llama", tmp_path / "m"))
    decoder = hidden_states_and_head(model)[0]
    assert packing.packing_problem(model, decoder, torch.device("cpu")) is None

    def whole_row(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True,
                                      **kwargs)

    monkeypatch.setattr(packing, "packed_attention", whole_row)
    problem = packing.packing_problem(model, decoder, torch.device("cpu"))
    assert problem is not None and "attended to the first" in problem


def test_models_outside_transformers_do_not_pack(tmp_path):
    from transformers import LlamaForCausalLM

    class CustomLlama(LlamaForCausalLM):   # stands for trust_remote_code model code
        pass

    model = CustomLlama.from_pretrained(build_tiny_model("llama", tmp_path / "m"))
    problem = packing.packing_problem(model, model.model, torch.device("cpu"))
    assert problem is not None and "not one of transformers' own models" in problem


def test_packing_on_is_an_error_and_auto_a_warning_where_the_model_cannot_pack(
        data_file, tmp_path, monkeypatch):
    import engine.train.engine as trainer

    model_dir = build_tiny_model("llama", tmp_path / "model")
    monkeypatch.setattr(trainer, "packing_problem", lambda *args: "it is a test")
    with pytest.raises(ConfigError) as error:
        Engine(_config(model_dir, tmp_path / "on", data_file, "on"), write_metrics=False)
    assert "[train]" in str(error.value) and "packing" in str(error.value)
    assert "it is a test" in str(error.value)
    events: list[dict] = []
    engine = Engine(_config(model_dir, tmp_path / "auto", data_file, "auto"),
                    on_event=events.append, write_metrics=False)
    assert not engine.packing
    assert any(e["type"] == "log" and "packing is off: it is a test" in e["message"]
               for e in events)
    start = next(e for e in events if e["type"] == "run_start")
    assert start["packing"] is False


def test_packing_setting_is_checked_in_the_config(tmp_path):
    from engine.core.config import load_config
    path = tmp_path / "run.toml"
    path.write_text('[train]\npacking = "yes"\n[[adapter]]\nname = "a"\ndata = "d.jsonl"\n')
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "packing" in str(error.value) and '"auto"' in str(error.value)


# MixLoRA routes a job's real tokens in row order, and its jitter, expert dropout and
# feed-forward dropout draw per routed token: the same in a packed pass as on padded rows.
# (Its attention LoRA keeps lora_dropout = 0: there packed and padded masks differ.)
_MIXLORA = {
    "mixlora": dict(num_experts=4, top_k=2),
    "mixlora-switch": dict(num_experts=3, expert_capacity=3),
    "mixlora-dynamic": dict(num_experts=3, top_p=0.6, temperature=1.5),
}


@pytest.mark.parametrize("strategy", sorted(_MIXLORA))
def test_packed_mixlora_equals_padded(strategy, data_file, tmp_path):
    model_dir = build_tiny_model("llama", tmp_path / "model")
    runs = {}
    for mode in ("on", "off"):
        config = _config(model_dir, tmp_path / mode, data_file, mode)
        config.adapters[0] = AdapterConfig(
            name="mix", data=data_file, prompt="alpaca_short", r=4, lora_alpha=8,
            lora_dropout=0.0, routing_strategy=strategy, jitter_noise=0.1, ffn_dropout=0.1,
            router_init_range=0.3, router_aux_loss_coef=0.05, router_z_loss_coef=0.01,
            expert_lora={"r": 2, "lora_alpha": 4, "lora_dropout": 0.1},
            target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"],
            batch_size=3, micro_batch_size=3, num_epochs=1, lr=1e-2, **_MIXLORA[strategy])
        runs[mode] = _train(config, 3)
    (packed, packed_events), (padded, padded_events) = runs["on"], runs["off"]
    assert all(b["packed"] == b["passes"] == 1 for b in packed_events if b["type"] == "batch")
    ours, theirs = _losses(packed_events), _losses(padded_events)
    assert [x[:2] for x in ours] == [x[:2] for x in theirs] and len(ours) >= 4
    for (_job, _step, a), (_j, _s, b) in zip(ours, theirs):
        assert a == pytest.approx(b, rel=1e-5)
    routers = {mode: [(e["step"], e["layers"]) for e in events if e["type"] == "router"]
               for mode, events in (("on", packed_events), ("off", padded_events))}
    assert routers["on"] and routers["on"] == routers["off"]
    if strategy == "mixlora-switch":   # capacity 3 per example: some tokens went unrouted
        assert any(s["dropped"] > 0 for _step, layers in routers["on"] for s in layers.values())
    for name in ("mix", "b"):
        mine, reference = _weights(packed, name), _weights(padded, name)
        assert mine.keys() == reference.keys()
        _assert_close(mine, reference, 1e-4, f"{strategy} {name}")
