"""Batched multi-adapter decoding (engine/train/decode.py): each row's greedy tokens equal
PEFT's ``generate`` for that adapter alone, rows of different prompt lengths share a batch
(left-padded, per-row positions), finished rows leave the batch, and sampling is seeded per
row."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from engine.train.adapter_set import load_adapter_set
from engine.train.decode import BatchedDecoder, DecodeRow, SamplingSettings
from engine.train.generate import generate_many, stop_ids
from test_engine_exactness import peft_initial_adapter
from test_evaluate import _mixlora_folder
from tiny_models import tiny_model_dir

PROMPTS = [[1, 45, 77, 12, 9], [1, 100, 3, 55, 200, 17, 8, 90, 33, 12, 5], [1, 250], [1, 60, 61]]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_model_dir("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen_adapters")
    return {name: peft_initial_adapter(tiny_llama, root / name, **fields)
            for name, fields in [("lora", {}), ("rslora", {"use_rslora": True}),
                                 ("dora", {"use_dora": True})]}


def _peft_greedy(model_dir: Path, folder: Path | None, prompt: list[int], n: int,
                 stops: list[int]) -> list[int]:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = (base if folder is None else peft.PeftModel.from_pretrained(base, folder)).eval()
    ids = torch.tensor([prompt])
    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=stops,
                              pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=config)
    tokens = out[0, len(prompt):].tolist()
    return [t for t in tokens if t not in stops][: n]


def _rows(aset, prompts) -> list[DecodeRow]:
    """Every (adapter row, prompt) pair: rows of one adapter with prompts of every length."""
    return [DecodeRow(row.adapter, prompt, key=f"{row.name}-{k}")
            for row in aset.rows for k, prompt in enumerate(prompts)]


def test_greedy_rows_equal_peft_generate_alone(tiny_llama, adapters):
    aset = load_adapter_set(list(adapters.values()), include_base=True)
    stops = stop_ids(aset.model, aset.tokenizer)
    rows = _rows(aset, PROMPTS)
    BatchedDecoder(aset, rows, SamplingSettings(max_new_tokens=12), stops).run()
    by_row = {row.name: row.folder for row in aset.rows}
    names = [row.name for row in aset.rows for _ in PROMPTS]
    differ = False
    for name, done, prompt in zip(names, rows, PROMPTS * len(aset.rows)):
        expected = _peft_greedy(tiny_llama, by_row[name], prompt, 12, stops)
        assert done.tokens == expected, (name, prompt)
        base_tokens = rows[PROMPTS.index(prompt)].tokens
        differ |= name != "base" and done.tokens != base_tokens
    assert differ      # the adapters change what is generated


def test_finished_rows_leave_the_batch(tiny_llama, adapters):
    aset = load_adapter_set([adapters["lora"], adapters["dora"]])
    rows = _rows(aset, PROMPTS)
    BatchedDecoder(aset, rows, SamplingSettings(max_new_tokens=10), []).run()
    # Make a token that row 0 first emits mid-way a stop token: that row (and any other
    # that emits it) leaves early; the others go on, each a prefix of the first run.
    tokens = rows[0].tokens
    k = next(k for k in range(2, len(tokens)) if tokens[k] not in tokens[:k])
    again = _rows(aset, PROMPTS)
    decoder = BatchedDecoder(aset, again, SamplingSettings(max_new_tokens=10), [tokens[k]])
    decoder.run()
    assert again[0].tokens == tokens[:k] and again[0].stop == "eos"
    for first, second in zip(rows, again):
        assert first.tokens[:len(second.tokens)] == second.tokens
    assert decoder.steps_rows[0] == len(rows)
    assert decoder.steps_rows[-1] < len(rows)
    assert decoder.steps_rows == sorted(decoder.steps_rows, reverse=True)


def test_a_mixlora_row_decodes_in_the_batch_as_alone(tiny_llama, adapters, tmp_path):
    mix = _mixlora_folder(tiny_llama, tmp_path / "mix")
    together = load_adapter_set([adapters["lora"], mix], include_base=True)
    rows = _rows(together, PROMPTS)
    BatchedDecoder(together, rows, SamplingSettings(max_new_tokens=8), []).run()
    alone = load_adapter_set([mix])
    solo = _rows(alone, PROMPTS)
    BatchedDecoder(alone, solo, SamplingSettings(max_new_tokens=8), []).run()
    mine = [r for r in rows if r.key.startswith("mix-")]
    assert [r.tokens for r in mine] == [r.tokens for r in solo]
    base = [r for r in rows if r.key.startswith("base-")]
    assert [r.tokens for r in mine] != [r.tokens for r in base]


def test_sampling_is_seeded_per_row_and_leaves_the_global_rng_alone(tiny_llama, adapters):
    settings = SamplingSettings(max_new_tokens=10, temperature=1.5, top_p=0.9, seed=7)
    aset = load_adapter_set(list(adapters.values()))
    state = torch.get_rng_state()
    first = _rows(aset, PROMPTS[:2])
    BatchedDecoder(aset, first, settings, []).run()
    assert torch.equal(torch.get_rng_state(), state)
    second = _rows(aset, PROMPTS[:2])
    BatchedDecoder(aset, second, settings, []).run()
    assert [r.tokens for r in first] == [r.tokens for r in second]
    # A row's sample does not depend on the other rows of its batch.
    alone = load_adapter_set([adapters["dora"]])
    solo = [DecodeRow(alone.rows[0].adapter, PROMPTS[0], key="dora-0")]
    BatchedDecoder(alone, solo, settings, []).run()
    assert solo[0].tokens == next(r for r in first if r.key == "dora-0").tokens
    other = SamplingSettings(max_new_tokens=10, temperature=1.5, top_p=0.9, seed=8)
    third = _rows(aset, PROMPTS[:2])
    BatchedDecoder(aset, third, other, []).run()
    assert [r.tokens for r in third] != [r.tokens for r in first]


def test_generate_many_names_rows_and_checks_its_options(tiny_llama, adapters):
    from engine.core.errors import UserError

    out = generate_many([adapters["lora"], adapters["rslora"]], "Say hi", include_base=True,
                        max_new_tokens=6)
    assert [g.name for g in out] == ["base", "lora", "rslora"]
    assert all(g.tokens <= 6 and g.stop in ("eos", "length") for g in out)
    streamed: dict[str, str] = {}
    again = generate_many([adapters["lora"]], "Say hi", max_new_tokens=6,
                          on_text=lambda name, text: streamed.__setitem__(name, text))
    assert again[0].text == out[1].text and streamed.get("lora", "") == out[1].text
    for kwargs, fragment in [({"max_new_tokens": 0}, "max_new_tokens"),
                             ({"temperature": -1.0}, "temperature"),
                             ({"top_p": 0.0}, "top_p"),
                             ({"max_new_tokens": 10_000}, "context")]:
        with pytest.raises(UserError, match=fragment):
            generate_many([adapters["lora"]], "Say hi", **kwargs)
    with pytest.raises(UserError, match="empty"):
        generate_many([adapters["lora"]], "   ")


def test_the_command_prints_json_or_a_panel_per_row(adapters):
    import json

    from typer.testing import CliRunner

    from mlora_tui.cli import app

    args = ["generate", "--adapter", str(adapters["lora"]), "--adapter", str(adapters["dora"]),
            "--base", "--max-new-tokens", "5", "Say hi"]
    result = CliRunner().invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    outputs = json.loads(result.stdout)["outputs"]
    assert list(outputs) == ["base", "lora", "dora"]
    expected = {g.name: g.text for g in generate_many(
        [adapters["lora"], adapters["dora"]], "Say hi", include_base=True, max_new_tokens=5)}
    assert outputs == expected
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("base", "lora", "dora"):
        assert name in result.stdout
    result = CliRunner().invoke(app, ["generate", "--adapter", str(adapters["lora"]),
                                      "--max-new-tokens", "0", "x"])
    assert result.exit_code == 2 and "Traceback" not in result.output
