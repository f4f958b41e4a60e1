"""tests/lm_eval_reference.py runs lm-evaluation-harness offline, and its numbers are what we think.

The per-choice log-likelihoods lm_eval logs for a tiny random Llama, base and PEFT LoRA adapter,
on ARC-Easy (4 and 3 choices) and BoolQ (2 choices) rows in local files, equal a plain
transformers / PEFT forward on the (context, continuation) pairs lm_eval 0.4.13 builds, tokenized
the way lm_eval's HFLM does for a causal model:

    ctx_ids   = tokenizer.encode(context)
    whole_ids = tokenizer.encode(context + continuation)
    cont_ids  = whole_ids[len(ctx_ids):]
    loglik    = sum of log_softmax(logits)[t - 1, whole_ids[t]] for t over cont positions

No BOS: lm_eval 0.4.13 leaves ``add_bos_token`` at None and calls the tokenizer with its default
``add_special_tokens``; the tiny tokenizer (a PreTrainedTokenizerFast with no post-processor)
then adds nothing, so the sequence starts with the context's first token. (A tokenizer whose
post-processor adds BOS, e.g. Llama's, gets it on both encodes, and the split is unchanged.)
lm_eval moves trailing spaces of the context to the continuation; these task prompts end in
``Answer:`` with the space in the target delimiter, so that does not arise here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("peft")

from lm_eval_reference import _offline_env, run_lm_eval, run_lm_eval_many  # noqa: E402
from tiny_models import tiny_model_dir  # noqa: E402

ARC_ROWS = [
    {"id": "q0", "question": "Which animal jumps over the lazy dog?",
     "choices": {"text": ["the quick brown fox", "a cat", "Paris", "a great movie"],
                 "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    {"id": "q1", "question": "Where does Alice live?",
     "choices": {"text": ["London", "Paris", "in a book"], "label": ["A", "B", "C"]},
     "answerKey": "B"},
    {"id": "q2", "question": "How old is Bob?",
     "choices": {"text": ["31", "27", "twelve", "old"], "label": ["1", "2", "3", "4"]},
     "answerKey": "2"},
    {"id": "q3", "question": "What is 2 + 3?",
     "choices": {"text": ["5", "six", "23", "-1"], "label": ["A", "B", "C", "D"]},
     "answerKey": "A"},
    {"id": "q4", "question": "Is the review positive or negative?",
     "choices": {"text": ["positive", "negative", "terrible film", "hello world"],
                 "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
]

BOOLQ_ROWS = [
    {"passage": "Alice is 31 years old and lives in Paris.", "question": "does alice live in paris",
     "label": 1, "idx": 0},
    {"passage": "Bob is 27.", "question": "is bob older than alice", "label": 0, "idx": 1},
    {"passage": "The quick brown fox jumps over the lazy dog.", "question": "is the dog lazy",
     "label": 1, "idx": 2},
    {"passage": "The movie was terrible.", "question": "was the review positive", "label": 0,
     "idx": 3},
    {"passage": "0123456789", "question": "is this a number", "label": 1, "idx": 4},
]


def _arc_requests(row):
    # lm_eval's arc_easy.yaml: doc_to_text "Question: {{question}}\nAnswer:", target_delimiter " ".
    ctx = f"Question: {row['question']}\nAnswer:"
    choices = row["choices"]["text"]
    return [(ctx, " " + c) for c in choices], choices, row["choices"]["label"].index(row["answerKey"])


def _boolq_requests(row):
    # lm_eval's super_glue/boolq/default.yaml.
    ctx = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return [(ctx, " no"), (ctx, " yes")], ["no", "yes"], row["label"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("llama", tmp_path_factory)
    tmp = tmp_path_factory.mktemp("lm_eval_ref")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False, lora_dropout=0.0))
    adapter_dir = tmp / "adapter"
    peft_model.save_pretrained(adapter_dir)

    data = {"arc": _write_jsonl(tmp / "arc.jsonl", ARC_ROWS),
            "bq": _write_jsonl(tmp / "boolq.jsonl", BOOLQ_ROWS)}
    tasks = {"arc": ("arc_easy", data["arc"]), "bq": ("boolq", data["bq"])}
    # Two subprocesses in all: each runs both tasks.
    results = {
        "base": run_lm_eval_many(model_dir, tasks, tmp / "run_base", batch_size=3),
        "adapter": run_lm_eval_many(model_dir, tasks, tmp / "run_adapter", adapter_dir=adapter_dir,
                                    batch_size=3),
    }
    print(f"\nlm_eval subprocess wall time: base {results['base']['arc']['wall_s']:.1f} s, "
          f"adapter {results['adapter']['arc']['wall_s']:.1f} s")
    return {"model_dir": model_dir, "adapter_dir": adapter_dir, "data": data, "results": results,
            "tmp": tmp}


def _reference(model_dir, adapter_dir, rows, make_requests):
    """Per row: (logliks, is_greedy, choices, gold, requests) from a plain forward."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    out = []
    with torch.no_grad():
        for row in rows:
            requests, choices, gold = make_requests(row)
            logliks, greedy = [], []
            for ctx, cont in requests:
                ctx_ids = tokenizer.encode(ctx)
                whole = tokenizer.encode(ctx + cont)
                assert whole[:len(ctx_ids)] == ctx_ids
                assert tokenizer.bos_token_id not in whole  # this tokenizer adds no BOS
                # fp32 throughout, as lm_eval: log_softmax, gather, sum (a -69 sum is ~1e-5 from
                # the same in float64: one fp32 ulp there).
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0], -1)
                cont = torch.tensor(whole[len(ctx_ids):])
                picked = logp[len(ctx_ids) - 1:len(whole) - 1]
                logliks.append(float(picked.gather(1, cont[:, None]).sum()))
                greedy.append(bool((picked.argmax(-1) == cont).all()))
            out.append((logliks, greedy, choices, gold, requests))
    return out


@pytest.mark.parametrize("which", ["base", "adapter"])
@pytest.mark.parametrize("key", ["arc", "bq"])
def test_per_item_logliks_equal_a_plain_forward(setup, which, key):
    rows, make = (ARC_ROWS, _arc_requests) if key == "arc" else (BOOLQ_ROWS, _boolq_requests)
    adapter = setup["adapter_dir"] if which == "adapter" else None
    ref = _reference(setup["model_dir"], adapter, rows, make)
    got = setup["results"][which][key]
    assert [s["doc_id"] for s in got["samples"]] == list(range(len(rows)))
    for sample, (logliks, greedy, choices, gold, requests) in zip(got["samples"], ref):
        assert sample["requests"] == requests
        assert sample["gold"] == gold
        assert sample["logliks"] == pytest.approx(logliks, abs=1e-5, rel=0)
        assert sample["is_greedy"] == greedy
        # lm_eval's acc: argmax of the summed logliks; acc_norm: divided by the choice's length
        # in characters (the choice text without the target delimiter).
        assert sample["acc"] == float(max(range(len(choices)), key=lambda i: logliks[i]) == gold)
        if key == "arc":
            norm = [ll / len(c) for ll, c in zip(logliks, choices)]
            assert sample["acc_norm"] == float(max(range(len(choices)), key=lambda i: norm[i]) == gold)
        else:
            assert sample["acc_norm"] is None  # lm_eval's boolq reports acc only
    assert got["acc"] == pytest.approx(sum(s["acc"] for s in got["samples"]) / len(rows))
    if key == "arc":
        assert got["acc_norm"] == pytest.approx(sum(s["acc_norm"] for s in got["samples"]) / len(rows))
    else:
        assert got["acc_norm"] is None


def test_the_adapter_changes_the_scores(setup):
    for key in ("arc", "bq"):
        base = [ll for s in setup["results"]["base"][key]["samples"] for ll in s["logliks"]]
        adapted = [ll for s in setup["results"]["adapter"][key]["samples"] for ll in s["logliks"]]
        assert max(abs(a - b) for a, b in zip(base, adapted)) > 1e-3


def test_limit_takes_the_first_rows(setup, tmp_path):
    # One more subprocess, one task: --limit N scores docs 0..N-1, as load_task's limit must.
    got = run_lm_eval(setup["model_dir"], "boolq", setup["data"]["bq"], tmp_path, limit=2)
    assert [s["doc_id"] for s in got["samples"]] == [0, 1]
    full = setup["results"]["base"]["bq"]["samples"][:2]
    assert [s["logliks"] for s in got["samples"]] == [s["logliks"] for s in full]


def test_the_subprocess_cannot_reach_the_network(tmp_path):
    # The same environment run_lm_eval gives lm_eval: an internet connection is refused and logged.
    env = _offline_env(tmp_path)
    code = ("import socket\n"
            "try:\n    socket.create_connection(('huggingface.co', 443), timeout=5)\n"
            "except OSError as e:\n    print('refused', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert "refused" in proc.stdout
    assert "huggingface.co" in (tmp_path / "network_attempts.log").read_text()
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["HF_HOME"].startswith(str(tmp_path))
