"""`mlora evaluate`'s numbers equal lm-evaluation-harness 0.4.13's, item by item.

lm_eval runs as a user runs it (its CLI, ``--model hf``, ``peft=`` for the adapter,
``--log_samples``), offline, on local files through a task YAML that includes its own task
(tests/lm_eval_reference.py). Two runs: the base model alone with a tokenizer that adds a
BOS token, and a PEFT LoRA adapter on a tokenizer that adds none, so both of lm_eval's
tokenization paths are covered. Four formats: a 3-5-choice one (arc-e), a 2-choice one
(boolq), HellaSwag (its own preprocessing, acc_norm) and WinoGrande (two contexts, one
continuation).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from engine.core.eval_tasks import TaskSpec, load_task  # noqa: E402
from engine.train.adapter_set import load_adapter_set  # noqa: E402
from engine.train.evaluate import evaluate  # noqa: E402
from engine.train.scoring import choice_logliks  # noqa: E402
from lm_eval_reference import run_lm_eval_many  # noqa: E402
from test_engine_exactness import peft_initial_adapter  # noqa: E402
from test_eval_tasks import ROWS  # noqa: E402
from tiny_models import tiny_model_dir  # noqa: E402

FORMATS = {"arc-e": "arc_easy", "boolq": "boolq", "hellaswag": "hellaswag",
           "winogrande": "winogrande"}


def _with_bos(model_dir: Path, out: Path) -> Path:
    """A copy of the tiny model whose tokenizer puts <s> before every text."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    shutil.copytree(model_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.bos_token_id)])
    tokenizer.save_pretrained(out)
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded.encode("a b")[0] == reloaded.bos_token_id
    return out


def _key(fmt: str) -> str:
    return fmt.replace("-", "_")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vs_lm_eval")
    plain = tiny_model_dir("llama", tmp_path_factory)
    bos = _with_bos(plain, root / "model-bos")
    adapter = peft_initial_adapter(plain, root / "lora")
    files = {}
    for fmt in FORMATS:
        path = root / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in ROWS[fmt]))
        files[fmt] = path
    tasks = {_key(fmt): (task, files[fmt]) for fmt, task in FORMATS.items()}
    base_ref = run_lm_eval_many(bos, tasks, root / "lm_eval_base")
    adapter_ref = run_lm_eval_many(plain, tasks, root / "lm_eval_adapter", adapter_dir=adapter)
    specs = [TaskSpec(fmt, fmt, str(files[fmt])) for fmt in FORMATS]
    return {"base": (bos, None, base_ref), "adapter": (plain, adapter, adapter_ref),
            "specs": specs}


@pytest.mark.parametrize("which", ["base", "adapter"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_per_item_logliks_equal_lm_evals(runs, which, fmt):
    model_dir, adapter, reference = runs[which]
    spec = next(s for s in runs["specs"] if s.key == fmt)
    items = load_task(spec)
    aset = (load_adapter_set([adapter]) if adapter
            else load_adapter_set([], include_base=True, base_model=str(model_dir)))
    scored = choice_logliks(aset, [item.requests for item in items],
                            batch_size=7)[aset.rows[0].adapter]
    samples = sorted(reference[_key(fmt)]["samples"], key=lambda s: s["doc_id"])
    assert len(samples) == len(items)
    for item, ours, theirs in zip(items, scored, samples):
        assert item.requests == [tuple(r) for r in theirs["requests"]]
        if fmt != "winogrande":     # its logged target is the continuation, not the gold
            assert item.gold == theirs["gold"]
        lls = [ll for ll, _ in ours]
        assert float(max(range(len(lls)), key=lls.__getitem__) == item.gold) == theirs["acc"]
        for (ll, greedy), ref_ll, ref_greedy in zip(ours, theirs["logliks"],
                                                    theirs["is_greedy"], strict=True):
            assert ll == pytest.approx(ref_ll, rel=1e-5, abs=1e-5)
            assert greedy == ref_greedy


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_acc_and_acc_norm_equal_lm_evals(runs, which):
    model_dir, adapter, reference = runs[which]
    if adapter:
        document = evaluate([adapter], runs["specs"], write_folders=False)
        results = document["results"][adapter.name]
    else:
        document = evaluate([], runs["specs"], include_base=True, base_model=str(model_dir))
        results = document["results"]["base"]
    for fmt in FORMATS:
        ours, theirs = results[fmt], reference[_key(fmt)]
        assert ours["n"] == len(theirs["samples"])
        assert ours["acc"] == pytest.approx(theirs["acc"])
        if theirs["acc_norm"] is None:
            assert "acc_norm" not in ours
        else:
            assert ours["acc_norm"] == pytest.approx(theirs["acc_norm"])
