"""The engine on a CUDA GPU: batched = isolated, engine = PEFT, eager = sdpa, a short run.

Skipped without CUDA; ``bench/gpu.sh`` runs this file on a GPU machine
(``PYTHONPATH=. python -m pytest tests/test_cuda.py``). ``MLORA_TEST_CUDA_DEVICE=cpu`` runs
the same checks on the CPU, to try them on a machine without a GPU.

On a GPU the kernels differ from the CPU's (cuBLAS, SDPA's fused kernels), so a job trained
in a batch can differ from the job trained alone where a kernel's choice depends on the
batch's shape: fp32 is held to 1e-4 (TF32 off, the engine's default), bf16 to a fraction
of what bf16 itself changes against fp32. The references (each adapter alone, PEFT with a
plain loop) and helpers come from ``test_engine_exactness``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

DEVICE = os.environ.get("MLORA_TEST_CUDA_DEVICE", "cuda")

pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="needs a CUDA GPU (bench/gpu.sh runs these on one)")

from engine.core.config import AdapterConfig  # noqa: E402
from engine.train.engine import Engine  # noqa: E402
# Fixtures (tiny_llama, data_files) are imported so pytest finds them in this module too.
from test_engine_exactness import (  # noqa: E402,F401
    _assert_same, _peft_reference_training, _run_config, _three_adapters, _weights,
    data_files, peft_initial_adapter, tiny_llama)


@pytest.fixture(autouse=True)
def _on_device(monkeypatch):
    """Every Engine of these tests trains on DEVICE (select_device honours the variable)."""
    monkeypatch.setenv("MLORA_BACKEND_TYPE", DEVICE)


def _config(model_dir, out, adapters, dtype="fp32", attn_impl="sdpa"):
    config = _run_config(model_dir, out, adapters)
    config.model.dtype = dtype
    config.model.attn_impl = attn_impl
    return config


def _run(config) -> tuple[Engine, list[dict]]:
    events: list[dict] = []
    engine = Engine(config, on_event=events.append, write_metrics=False)
    engine.run()
    assert engine.device.type == DEVICE
    assert {j.state for j in engine.jobs.values()} == {"done"}
    return engine, events


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _max_rel(actual: dict, expected: dict) -> float:
    assert actual.keys() == expected.keys()
    return max(_rel(actual[k], expected[k]) for k in expected)


def _first_losses(events: list[dict]) -> dict[str, float]:
    first: dict[str, float] = {}
    for e in events:
        if e["type"] == "step":
            first.setdefault(e["job"], e["loss"])
    return first


def _first_steps(events: list[dict]) -> dict[str, dict]:
    first: dict[str, dict] = {}
    for e in events:
        if e["type"] == "step":
            first.setdefault(e["job"], e)
    return first


def _short(adapters: list[AdapterConfig]) -> list[AdapterConfig]:
    for cfg in adapters:
        cfg.num_epochs = 1
    return adapters


def test_batched_equals_isolated_fp32(tiny_llama, data_files, tmp_path):
    adapters = _short(_three_adapters(data_files))
    together, events = _run(_config(tiny_llama, tmp_path / "together", adapters))
    first = _first_losses(events)
    for cfg in adapters:
        alone, alone_events = _run(_config(tiny_llama, tmp_path / f"alone-{cfg.name}", [cfg]))
        _assert_same(_weights(together, cfg.name), _weights(alone, cfg.name), rtol=1e-4)
        assert first[cfg.name] == pytest.approx(_first_losses(alone_events)[cfg.name], rel=1e-5)


def test_batched_equals_isolated_bf16(tiny_llama, data_files, tmp_path):
    """In bf16 a job's rows padded to another width round differently (about 1e-3 per
    step, which training then amplifies, on the CPU too): the first step's loss and
    gradient norm agree within bf16 tolerance, the trained adapters stay close."""
    adapters = _short(_three_adapters(data_files))
    together, events = _run(_config(tiny_llama, tmp_path / "together", adapters, "bf16"))
    first = _first_steps(events)
    for cfg in adapters:
        alone, alone_events = _run(_config(tiny_llama, tmp_path / f"a-{cfg.name}", [cfg], "bf16"))
        mine = _first_steps(alone_events)[cfg.name]
        assert first[cfg.name]["loss"] == pytest.approx(mine["loss"], rel=1e-2)
        assert first[cfg.name]["grad_norm"] == pytest.approx(mine["grad_norm"], rel=2e-2)
        # A sanity bound: 0.04 at most on the CPU.
        assert _max_rel(_weights(together, cfg.name), _weights(alone, cfg.name)) < 0.25
        assert all(v.dtype == torch.float32 for v in _weights(together, cfg.name).values())


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_engine_on_gpu_equals_peft_on_cpu(variant, tiny_llama, data_files, tmp_path):
    """fp32 on the GPU against the PEFT reference trained by a plain loop on the CPU."""
    targets = ["q_proj", "v_proj", "down_proj"]
    init_dir = peft_initial_adapter(tiny_llama, tmp_path / "init", use_dora=variant == "dora")

    cfg = AdapterConfig(prompt="alpaca_short", name="job", data=data_files["a"], r=4,
                        lora_alpha=8, lora_dropout=0.0, use_dora=variant == "dora",
                        target_modules=targets, batch_size=4, micro_batch_size=2,
                        num_epochs=1, lr=3e-3, init_from=str(init_dir))
    engine, _ = _run(_config(tiny_llama, tmp_path / "out", [cfg]))
    steps = engine.jobs["job"].step
    assert steps >= 2
    reference = _peft_reference_training(tiny_llama, init_dir, engine, "job", steps)
    _assert_same(_weights(engine, "job"), reference, rtol=1e-4)


def test_eager_and_sdpa_agree(tiny_llama, data_files, tmp_path):
    adapters = _short(_three_adapters(data_files))[:2]
    runs = {}
    for attn in ("eager", "sdpa"):
        engine, events = _run(_config(tiny_llama, tmp_path / attn, adapters, attn_impl=attn))
        assert engine.model_info["attn_impl"] == attn
        runs[attn] = (engine, _first_losses(events))
    for cfg in adapters:
        _assert_same(_weights(runs["eager"][0], cfg.name), _weights(runs["sdpa"][0], cfg.name),
                     rtol=1e-4)
        assert runs["eager"][1][cfg.name] == pytest.approx(runs["sdpa"][1][cfg.name], rel=1e-5)


def test_eager_and_sdpa_agree_bf16(tiny_llama, data_files, tmp_path):
    adapters = _short(_three_adapters(data_files))[:1]
    losses = {}
    for attn in ("eager", "sdpa"):
        _engine, events = _run(_config(tiny_llama, tmp_path / attn, adapters, "bf16", attn))
        losses[attn] = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses["eager"]) == len(losses["sdpa"]) > 0
    for a, b in zip(losses["eager"], losses["sdpa"]):
        assert a == pytest.approx(b, rel=2e-2)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_short_run_on_gpu(checkpointing, tiny_llama, data_files, tmp_path):
    """A bf16 run of two jobs: everything on the device, finite losses, phases timed,
    adapters saved; gradient checkpointing gives the same adapters."""
    adapters = _short(_three_adapters(data_files))[:2]
    config = _config(tiny_llama, tmp_path / "run", adapters, "bf16")
    config.train.gradient_checkpointing = checkpointing
    engine, events = _run(config)
    assert next(engine.model.parameters()).device.type == DEVICE
    for job in engine.jobs.values():
        assert all(p.device.type == DEVICE and p.dtype == torch.float32
                   for p in job.parameters)
    steps = [e for e in events if e["type"] == "step"]
    assert steps and all(math.isfinite(e["loss"]) for e in steps)
    batches = [e for e in events if e["type"] == "batch"]
    assert batches and all(e["seconds"].get("forward", 0) > 0 for e in batches)
    for cfg in adapters:
        assert (tmp_path / "run" / cfg.name / "adapter_model.safetensors").is_file()
    if checkpointing:
        plain, _ = _run(_config(tiny_llama, tmp_path / "plain", adapters, "bf16"))
        for cfg in adapters:
            assert _max_rel(_weights(engine, cfg.name), _weights(plain, cfg.name)) < 1e-3
    if DEVICE == "cuda":
        assert torch.cuda.max_memory_allocated() > 0


@pytest.mark.parametrize("dtype,tolerance", [("fp32", 1e-4), ("bf16", 0.25)])
def test_packed_equals_padded_on_the_device(dtype, tolerance, tiny_llama, data_files,
                                            tmp_path):
    """[train] packing = "on" (packed rows, attention per example) against padded rows, on
    the device: the same first-step losses and, in fp32, the same adapters."""
    adapters = _short(_three_adapters(data_files))
    for cfg in adapters:
        cfg.lora_dropout = 0.0      # packed and padded rows draw different dropout masks
    runs = {}
    for packing in ("on", "off"):
        config = _config(tiny_llama, tmp_path / packing, adapters, dtype)
        config.train.packing = packing
        runs[packing] = _run(config)
    (packed, packed_events), (padded, padded_events) = runs["on"], runs["off"]
    assert packed.packing and not padded.packing
    assert all(e["packed"] == e["passes"] for e in packed_events if e["type"] == "batch")
    first, reference = _first_losses(packed_events), _first_losses(padded_events)
    for cfg in adapters:
        assert first[cfg.name] == pytest.approx(reference[cfg.name],
                                                rel=1e-5 if dtype == "fp32" else 1e-2)
        assert _max_rel(_weights(packed, cfg.name), _weights(padded, cfg.name)) < tolerance
