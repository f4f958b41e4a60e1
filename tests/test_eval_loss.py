"""The evaluation loss at the end of a job against transformers' own loss.

The engine documents ``eval_loss`` as the mean loss per target token over the job's
validation rows (docs/architecture.md, the ``eval`` event). The reference loads the saved
adapter folder in PEFT and asks transformers for each validation row's loss alone (no
padding, no dropout), weighting each by its number of target tokens.
"""

from __future__ import annotations

import pytest
import torch

from engine.core.config import AdapterConfig
from engine.train.engine import Engine
# The same tiny model and data files as the exactness tests.
from test_engine_exactness import _run_config, data_files, tiny_llama  # noqa: F401

peft = pytest.importorskip("peft")


def _transformers_eval_loss(model_dir, folder, rows) -> float:
    """Target-token-weighted mean of transformers' loss of each row, through PEFT."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                attn_implementation="sdpa")
    model = peft.PeftModel.from_pretrained(base, folder).eval()
    total, targets = 0.0, 0
    with torch.no_grad():
        for row in rows:
            labels = torch.tensor([row.labels])
            n = int((labels[:, 1:] != -100).sum())     # HF predicts position t + 1 from t
            loss = model(input_ids=torch.tensor([row.input_ids]), labels=labels).loss
            total += float(loss) * n
            targets += n
    return total / targets


@pytest.mark.parametrize("packing", ["on", "off"])
def test_eval_loss_is_transformers_loss_over_the_validation_rows(packing, tiny_llama,
                                                                 data_files, tmp_path):
    # 5 validation rows of different lengths in micro-batches of 2, 2 and 1: padded
    # evaluation pads, and the batches hold different numbers of target tokens.
    common = dict(prompt="alpaca_short", data=data_files["c"], r=4, lora_alpha=8,
                  lora_dropout=0.2, batch_size=4, micro_batch_size=2, num_epochs=1, lr=1e-2,
                  val_set_size=5)
    adapters = [AdapterConfig(name="lora", target_modules=["q_proj", "v_proj"], **common),
                AdapterConfig(name="dora", use_dora=True, seed=4,
                              target_modules=["k_proj", "up_proj", "down_proj"], **common)]
    events = []
    engine = Engine(_run_config(tiny_llama, tmp_path / "out", adapters, packing),
                    on_event=events.append)
    engine.run()
    evals = {e["job"]: e for e in events if e["type"] == "eval"}
    assert set(evals) == {"lora", "dora"}
    for name, job in engine.jobs.items():
        rows = job.data.val
        assert len(rows) == 5 and len({len(r.input_ids) for r in rows}) > 1
        assert any(t == -100 for r in rows for t in r.labels[1:])    # prompts are not targets
        expected = _transformers_eval_loss(tiny_llama, tmp_path / "out" / name, rows)
        assert evals[name]["step"] == job.step
        assert evals[name]["eval_loss"] == pytest.approx(expected, rel=1e-5), name
        assert job.summary()["eval_loss"] == evals[name]["eval_loss"]
