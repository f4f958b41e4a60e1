"""QLoRA: adapters on a bitsandbytes 4-bit or 8-bit base (runs on CPU too).

Training lowers the loss, the saved adapters load in PEFT, every adapted layer computes
what PEFT's layer computes on the dequantized weight, and DoRA sees that weight.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from engine.core.config import AdapterConfig, ModelConfig, RunConfig, TrainConfig
from engine.train.lora import MultiLoraLinear, dense_weight
from engine.train.engine import Engine
from tiny_models import build_tiny_model, tiny_model_dir

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "d.jsonl"
    rows = [{"instruction": "Copy.", "input": "cat dog fox", "output": "CAT DOG FOX"}] * 8
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def learnable_llama(tmp_path_factory):
    """A tiny llama with larger random weights: with the usual 0.02 init, logits are too
    flat for a small adapter to move the loss much in a few steps."""
    return build_tiny_model("llama", tmp_path_factory.mktemp("q") / "m", initializer_range=0.2)


@pytest.mark.parametrize("quantize,packing", [("4bit", "on"), ("8bit", "on"), ("4bit", "off")])
def test_qlora_trains_and_reloads_in_peft(quantize, packing, data_file, tmp_path,
                                          learnable_llama):
    model_dir = learnable_llama
    adapters = [AdapterConfig(name=name, data=data_file, prompt="none", r=4, lora_alpha=8,
                              lora_dropout=0.0, use_dora=name == "dora", batch_size=4,
                              micro_batch_size=2, num_epochs=6, lr=1e-2,
                              target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
                for name in ("lora", "dora")]
    config = RunConfig(model=ModelConfig(base_model=str(model_dir), quantize=quantize),
                       train=TrainConfig(output_dir=str(tmp_path), cutoff_len=64,
                                         packing=packing),
                       adapters=adapters)
    events = []
    engine = Engine(config, on_event=events.append)
    assert type(engine.model.model.layers[0].mlp.down_proj.base).__name__ == (
        "Linear4bit" if quantize == "4bit" else "Linear8bitLt")
    engine.run()
    for name in ("lora", "dora"):
        losses = [e["loss"] for e in events if e["type"] == "step" and e["job"] == name]
        assert len(losses) == 12 and losses[-1] < 0.25 * losses[0], losses

    # The saved adapters load in PEFT, and each adapted layer of the quantized engine model
    # computes what PEFT's layer computes on the dequantized weight. (Layer by layer: the
    # reduced-precision CPU kernels of bitsandbytes put small errors in every layer that a
    # random model amplifies, so whole-model logits would compare the kernels, not the
    # adapters. And PEFT's own DoRA on a 4-bit base on CPU reads the weight in the layout
    # that bitsandbytes repacks it into for its CPU kernels, so it is not a reference there.)
    dense = _dequantized_copy(engine.model, model_dir)
    generator = torch.Generator().manual_seed(0)
    for name in ("lora", "dora"):
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(dense), tmp_path / name).eval()
        engine.layout.set_single(name)
        layers = {n: m for n, m in engine.model.named_modules() if isinstance(m, MultiLoraLinear)}
        assert len(layers) == 8
        for layer_name, layer in layers.items():
            x = torch.randn(2, 5, layer.in_features, generator=generator)
            with torch.no_grad():
                ours = layer(x).float()
                theirs = loaded.base_model.model.get_submodule(layer_name)(x)
                base = dense.get_submodule(layer_name)(x)
            error = (ours - theirs).norm() / theirs.norm()
            assert error < 0.02, f"{name} {layer_name}: relative error {error:.4f}"
            # The check means something only where the adapter changed the layer.
            assert (theirs - base).norm() / base.norm() > 0.05


def _dequantized_copy(quantized_model, model_dir):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in quantized_model.named_modules():
            if isinstance(module, MultiLoraLinear):
                dense.get_submodule(name).weight.copy_(dense_weight(module.base))
    return dense


def test_dora_sees_the_dequantized_weight(tmp_path_factory):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model_dir = tiny_model_dir("llama", tmp_path_factory)
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = full.model.layers[0].self_attn.q_proj.weight
    for config in (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32),
                   BitsAndBytesConfig(load_in_8bit=True)):
        quantized = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, device_map={"": "cpu"}, quantization_config=config)
        linear = quantized.model.layers[0].self_attn.q_proj
        x = torch.randn(3, reference.shape[1])
        # Before and after forward passes: on first use bitsandbytes moves 8-bit row scales
        # and repacks 4-bit weights for its CPU kernels.
        for _ in range(3):
            weight = dense_weight(linear)
            assert weight.shape == reference.shape
            error = (weight - reference).norm() / reference.norm()
            assert error < 0.15, f"dequantized weight off by {error:.3f}"
            out = linear(x)
            # The weight DoRA sees is the one the layer computes with.
            torch.testing.assert_close(x @ weight.t(), out.float(), rtol=0.02, atol=0.02)


def test_quantize_without_bitsandbytes_names_the_extra(monkeypatch, tmp_path_factory):
    import importlib.util

    from engine.train import models
    from engine.core.errors import UserError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        None if name == "bitsandbytes" else real_find_spec(name, *a)))
    config = ModelConfig(base_model=str(tiny_model_dir("llama", tmp_path_factory)),
                         quantize="4bit")
    with pytest.raises(UserError, match=r"mlora-tui\[bitsandbytes\]"):
        models.load_base_model(config, torch.device("cpu"))


def test_4bit_base_passes_gradients_after_a_forward_without_them(tmp_path, learnable_llama,
                                                                 data_file):
    """Evaluation or generation before training must not break the backward through the
    4-bit base: bitsandbytes would repack its weights on a CPU for a forward-only kernel."""
    config = RunConfig(model=ModelConfig(base_model=str(learnable_llama), quantize="4bit"),
                       train=TrainConfig(output_dir=str(tmp_path), cutoff_len=64),
                       adapters=[])
    engine = Engine(config, write_metrics=False)
    layer = engine.model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "Linear4bit"
    # What the fix does, whatever this CPU has (the behaviour below needs AVX512-BF16).
    assert all(not m.support_avx512bf16_for_cpu for m in engine.model.modules()
               if type(m).__name__ == "Linear4bit")
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        engine.decoder(input_ids=ids, use_cache=False)         # the no-gradient forward
    x = torch.randn(3, layer.in_features, requires_grad=True)
    weight = dense_weight(layer)
    layer(x).float().mul(torch.arange(layer.out_features)).sum().backward()
    expected = torch.arange(layer.out_features, dtype=torch.float32) @ weight
    assert x.grad is not None
    assert torch.allclose(x.grad, expected.expand_as(x.grad), rtol=2e-2, atol=1e-3)
