"""The memory estimator's parts against hand counts, and its estimate against a real step.

The benchmarks compare whole estimates with measured peaks (BENCHMARKS.md); here each part
is checked against an independent count: the parameters of a real Hugging Face model built
from the same config, LoRA sizes counted from the layers' shapes, and the direction each
setting must move the estimate.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.core.memory import JobLoad, ModelShape, estimate_breakdown, estimate_peak_bytes

CONFIG = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=500,
              tie_word_embeddings=False, max_position_embeddings=256)


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG))


def test_weights_count_every_parameter_of_the_real_model():
    model = _model()
    shape = ModelShape.from_config(model.config)
    assert shape.num_params() == sum(p.numel() for p in model.parameters())
    parts = estimate_breakdown(model.config, [JobLoad(rows=1, seq_len=8)], dtype="bf16")
    assert parts["weights"] == 2 * shape.num_params()
    fp32 = estimate_breakdown(model.config, [JobLoad(rows=1, seq_len=8)], dtype="fp32")
    assert fp32["weights"] == 4 * shape.num_params()


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("o_proj", "down_proj", "up_proj")])
def test_lora_sizes_match_the_layers_shapes(targets):
    model = _model()
    shape = ModelShape.from_config(model.config)
    expected = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            expected += 4 * (module.in_features + module.out_features)
    assert shape.lora_params(4, targets) == expected
    # AdamW: weights 4, moments 8, gradients 4 bytes per LoRA parameter.
    parts = estimate_breakdown(model.config, [JobLoad(rows=1, seq_len=8, r=4,
                                                      target_modules=targets)])
    assert parts["adapters"] == 16 * expected


def test_the_estimate_moves_the_way_each_setting_should():
    config = _model().config
    one = [JobLoad(rows=2, seq_len=64)]
    two = one + [JobLoad(rows=2, seq_len=64, r=16)]
    assert estimate_peak_bytes(config, two) > estimate_peak_bytes(config, one)
    longer = [JobLoad(rows=2, seq_len=128)]
    assert estimate_peak_bytes(config, longer) > estimate_peak_bytes(config, one)
    assert (estimate_peak_bytes(config, two, gradient_checkpointing=True)
            < estimate_peak_bytes(config, two))
    # PEFT keeps logits for every position; the engine a chunk of its target positions.
    engine = estimate_breakdown(config, longer, implementation="engine")
    peft = estimate_breakdown(config, longer, implementation="peft")
    assert engine["head"] < peft["head"]
    # PEFT trains one adapter at a time: its activations do not grow with more adapters.
    assert (estimate_breakdown(config, two, implementation="peft")["activations"]
            == estimate_breakdown(config, one, implementation="peft")["activations"])
    with pytest.raises(ValueError, match="dtype"):
        estimate_peak_bytes(config, one, dtype="int3")
