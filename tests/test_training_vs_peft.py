"""The engine's optimizer settings against PEFT and a plain torch loop: schedules with warm-up,
gradient clipping that bites, AdamW with weight decay, SGD with momentum.

The reference is independent of the engine: a PEFT model trained on the same batches with
torch's AdamW/SGD, transformers' schedule functions and torch's clip_grad_norm_
(``test_engine_exactness._peft_reference_training``).
"""

from __future__ import annotations

import pytest
import torch

from engine.core.config import AdapterConfig
from engine.train.engine import Engine
# The same tiny model, data files and PEFT reference as the exactness tests.
from test_engine_exactness import (_assert_same, _peft_reference_training,  # noqa: F401
                                   _run_config, _weights, data_files, peft_initial_adapter,
                                   tiny_llama)

# Each max_grad_norm lies within its run's range of gradient norms: it clips some steps.
CASES = {
    "adamw, weight decay, cosine with warm-up, clipped": dict(
        optim="adamw", lr=1e-2, weight_decay=0.1, scheduler_type="cosine", warmup_steps=2,
        max_grad_norm=0.3),
    "sgd, momentum, weight decay, linear with warm-up ratio, clipped, dora, padded": dict(
        optim="sgd", lr=0.5, momentum=0.9, weight_decay=0.01, scheduler_type="linear",
        warmup_ratio=0.3, use_dora=True, max_grad_norm=0.25),
    "adamw, constant with warm-up, clipped, rslora": dict(
        optim="adamw", lr=5e-3, weight_decay=0.05, scheduler_type="constant", warmup_steps=3,
        use_rslora=True, max_grad_norm=0.55),
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_optimizer_schedule_and_clipping_equal_a_peft_loop(case, tiny_llama, data_files,
                                                                  tmp_path):
    fields = CASES[case]
    init_dir = peft_initial_adapter(tiny_llama, tmp_path / "init",
                                    use_rslora=fields.get("use_rslora", False),
                                    use_dora=fields.get("use_dora", False))
    # 10 rows in batches of 4: 3 optimizer steps an epoch (the last of 2 rows), 2 epochs.
    cfg = AdapterConfig(prompt="alpaca_short", name="job", data=data_files["a"], r=4,
                        lora_alpha=8, lora_dropout=0.0,
                        target_modules=["q_proj", "v_proj", "down_proj"], batch_size=4,
                        micro_batch_size=2, num_epochs=2,
                        init_from=str(init_dir), **fields)
    events = []
    packing = "off" if "padded" in case else "on"
    engine = Engine(_run_config(tiny_llama, tmp_path / "out", [cfg], packing),
                    on_event=events.append)
    engine.run()
    steps = [e for e in events if e["type"] == "step"]
    assert len(steps) == engine.jobs["job"].total_steps == 6

    log: list[dict] = []
    reference = _peft_reference_training(tiny_llama, init_dir, engine, "job", 6, log)
    _assert_same(_weights(engine, "job"), reference, rtol=1e-5)
    norms = [step["grad_norm"] for step in log]
    assert max(norms) > cfg.max_grad_norm > min(norms), norms   # clipping bites, but not always
    # transformers' warm-up starts at 0: the first step changes nothing but the moments.
    assert log[0]["lr"] == 0.0 and max(step["lr"] for step in log) == pytest.approx(cfg.lr)
    assert [e["lr"] for e in steps] == pytest.approx([step["lr"] for step in log],
                                                     rel=1e-9, abs=1e-12)
    assert [e["grad_norm"] for e in steps] == pytest.approx(norms, rel=1e-5)
