"""Every supported model family trains with its default targets, batched exactly.

For each tiny model, in packed and in padded passes: two adapters (LoRA and DoRA, dropout
on) trained together with the family's default target modules; the loss is finite and the
adapter moved; each adapter equals the same adapter trained alone.
"""

from __future__ import annotations

import json

import pytest

from engine.train.adapters import adapter_state_dict
from engine.core.config import AdapterConfig, ModelConfig, RunConfig, TrainConfig
from engine.train.models import DEFAULT_TARGETS
from engine.train.engine import Engine
from tiny_models import FAMILIES, tiny_model_dir


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fam") / "d.jsonl"
    rows = [{"instruction": "Copy.", "input": "cat dog " * (1 + i % 4),
             "output": "CAT DOG " * (1 + i % 3)} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _adapters(data_file):
    common = dict(data=data_file, prompt="none", batch_size=2, micro_batch_size=2, num_epochs=1,
                  lr=1e-2, lora_dropout=0.1)
    return [AdapterConfig(name="plain", r=4, lora_alpha=8, **common),
            AdapterConfig(name="dora", r=2, lora_alpha=4, use_dora=True, seed=5, **common)]


def _engine(model_dir, out, adapters, packing):
    return Engine(RunConfig(model=ModelConfig(base_model=str(model_dir)),
                            train=TrainConfig(output_dir=str(out), cutoff_len=64,
                                              packing=packing),
                            adapters=adapters))


# Both layouts of a pass: packed (the CPU's default) and padded rows (the GPU's).
@pytest.mark.parametrize("packing", ["on", "off"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_with_default_targets(family, packing, data_file, tmp_path,
                                            tmp_path_factory):
    model_dir = tiny_model_dir(family, tmp_path_factory)
    events = []
    together = _engine(model_dir, tmp_path / "together", _adapters(data_file), packing)
    together.on_event = events.append
    together.run()
    steps = [e for e in events if e["type"] == "step"]
    assert len(steps) == 6 and all(e["loss"] == e["loss"] and e["loss"] > 0 for e in steps)
    model_type = together.model_info["model_type"]
    assert together.jobs["plain"].targets == sorted(DEFAULT_TARGETS[model_type])

    for cfg in _adapters(data_file):
        trained = adapter_state_dict(together.model, cfg.name)
        assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)
        alone = _engine(model_dir, tmp_path / cfg.name, [cfg], packing)
        alone.run()
        expected = adapter_state_dict(alone.model, cfg.name)
        for key, value in expected.items():
            diff = (trained[key] - value).norm() / value.norm().clamp_min(1e-12)
            assert diff <= 1e-5, f"{family} {key}: {diff:.3g}"
