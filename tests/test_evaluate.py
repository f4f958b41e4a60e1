"""Batched evaluation (engine/train/scoring.py, evaluate.py): every adapter's scores in the same
passes equal PEFT's forward for that adapter alone, and each adapter evaluated alone.

References are independent of the code under test: a plain transformers / ``PeftModel``
forward of each full (context + continuation) sequence, tokenized the way lm-evaluation-
harness's HFLM does it (context alone, then the whole string split after the context's
tokens), summed in float64.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.core.eval_tasks import ChoiceItem, TaskSpec, load_task
from engine.train.adapter_set import load_adapter_set
from engine.train.evaluate import evaluate, label_token_ids
from engine.train.scoring import HarnessTokens, choice_logliks
from test_engine_exactness import peft_initial_adapter
from tiny_models import tiny_model_dir

# Items of 1-4 choices and unequal lengths: a shared context, contexts that differ after a
# common start (WinoGrande's shape), a context ending in a space (moved to the
# continuation), an empty context (the prefix token stands in) and a one-token context.
ITEMS = [
    [("Question: what is up?\nAnswer:", " the sky"),
     ("Question: what is up?\nAnswer:", " down below here"),
     ("Question: what is up?\nAnswer:", " no"),
     ("Question: what is up?\nAnswer:", " a b c d e f g")],
    [("hello world", " a"), ("hello world", " b c d e")],
    [("The cat sat on the mat", " because it was warm"),
     ("The dog sat on the", " because it was warm")],
    [("x ", "yes"), ("x ", "no")],
    [("", "an empty context"), ("", "another one")],
    [("a", " b")],
]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_model_dir("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: peft_initial_adapter(tiny_llama, root / name, **fields)
            for name, fields in [("lora", {}), ("rslora", {"use_rslora": True}),
                                 ("dora", {"use_dora": True})]}


def _harness_logliks(model, tokenizer, items) -> list[list[float]]:
    tokens = HarnessTokens(tokenizer)
    out = []
    for requests in items:
        scores = []
        for context, continuation in requests:
            ctx, cont = tokens.pair(context, continuation)
            with torch.no_grad():
                logits = model(torch.tensor([ctx + cont])).logits[0].double()
            log_probs = torch.log_softmax(logits, dim=-1)
            scores.append(sum(float(log_probs[len(ctx) - 1 + k, t]) for k, t in enumerate(cont)))
        out.append(scores)
    return out


def _peft(model_dir: Path, folder: Path | None):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = base if folder is None else peft.PeftModel.from_pretrained(base, folder)
    return model.eval()


def _close(a: list[list[float]], b: list[list[float]], rel: float) -> None:
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            assert abs(u - v) <= rel * max(1.0, abs(v)), (u, v)


def test_harness_tokenization_moves_trailing_spaces_and_uses_the_prefix_token(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokens = HarnessTokens(tokenizer)
    ctx, cont = tokens.pair("x ", "yes")
    assert ctx == tokens.encode("x") and ctx + cont == tokens.encode("x yes")
    ctx, cont = tokens.pair("", "an empty context")
    assert ctx == [tokens.prefix_id]
    assert cont == tokenizer.encode("an empty context", add_special_tokens=False)


def test_every_adapter_in_one_pass_equals_peft_alone(tiny_llama, adapters):
    aset = load_adapter_set(list(adapters.values()), include_base=True)
    scored = choice_logliks(aset, ITEMS, batch_size=8)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    differ = 0.0
    for row in aset.rows:
        reference = _harness_logliks(_peft(tiny_llama, row.folder), tokenizer, ITEMS)
        ours = [[ll for ll, _ in item] for item in scored[row.adapter]]
        _close(ours, reference, 1e-5)
        if row.adapter is not None:
            base = [[ll for ll, _ in item] for item in scored[None]]
            differ = max(differ, max(abs(a - b) for x, y in zip(ours, base) for a, b in zip(x, y)))
    assert differ > 1e-3      # the adapters change the scores, or equality would mean little


def test_greedy_flags_match_an_argmax_check(tiny_llama, adapters):
    model = _peft(tiny_llama, adapters["lora"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokens = HarnessTokens(tokenizer)
    # Continuations of the model's own greedy tokens (each decoded and kept where the
    # text encodes back to that token), so that some flags are True.
    items = [list(item) for item in ITEMS]
    for context in ("The cat sat", "hello world", "Question:"):
        ids = tokens.encode(context)
        with torch.no_grad():
            best = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        text = tokenizer.decode([best])
        if tokens.pair(context, text) == (ids, [best]):
            items.append([(context, text), (context, " zzz")])
    assert len(items) > len(ITEMS), "no greedy continuation round-trips through the tokenizer"
    expected = []
    for requests in items:
        flags = []
        for context, continuation in requests:
            ctx, cont = tokens.pair(context, continuation)
            with torch.no_grad():
                logits = model(torch.tensor([ctx + cont])).logits[0]
            flags.append(all(int(logits[len(ctx) - 1 + k].argmax()) == t
                             for k, t in enumerate(cont)))
        expected.append(flags)
    aset = load_adapter_set([adapters["lora"]])
    scored = choice_logliks(aset, items, batch_size=6)[aset.rows[0].adapter]
    assert [[greedy for _, greedy in item] for item in scored] == expected
    assert any(flag for item in expected for flag in item)


def test_the_shared_prefix_cache_equals_full_sequences(tiny_llama, adapters):
    aset = load_adapter_set(list(adapters.values()), include_base=True)
    cached = choice_logliks(aset, ITEMS, batch_size=64)
    plain = choice_logliks(aset, ITEMS, batch_size=64, share_prefix=False)
    for adapter in cached:
        _close([[ll for ll, _ in i] for i in cached[adapter]],
               [[ll for ll, _ in i] for i in plain[adapter]], 1e-6)


def test_together_equals_alone_and_batch_size_does_not_matter(tiny_llama, adapters):
    together = load_adapter_set(list(adapters.values()))
    both = choice_logliks(together, ITEMS, batch_size=5)
    for row in together.rows:
        alone = load_adapter_set([row.folder])
        one = choice_logliks(alone, ITEMS, batch_size=64)[alone.rows[0].adapter]
        _close([[ll for ll, _ in i] for i in one],
               [[ll for ll, _ in i] for i in both[row.adapter]], 1e-6)


def _mixlora_folder(model_dir: Path, folder: Path) -> Path:
    """A saved MixLoRA adapter with random (non-zero) weights, written as the engine saves."""
    from engine.core.config import ModelConfig
    from engine.train.adapters import adapter_files, peft_config, write_folder_atomically
    from engine.train.lora import BatchLayout
    from engine.train.models import find_target_linears, load_base_model
    from engine.train.variants import variant_for

    fields = dict(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=False, use_dora=False,
                  routing_strategy="mixlora", num_experts=3, top_k=2)
    model, _tok, _info = load_base_model(ModelConfig(base_model=str(model_dir)), "cpu")
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    variant = variant_for("m", fields)
    variant.attach(model, BatchLayout(), list(find_target_linears(model, targets)),
                   init_seed=3, device=torch.device("cpu"))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.add_(torch.randn_like(p) * 0.05)
    config = peft_config(r=4, alpha=8, dropout=0.0, target_modules=targets, use_rslora=False,
                         use_dora=False, base_model=str(model_dir))
    config.update(variant.config_fields())
    write_folder_atomically(folder, adapter_files(model, "m", config,
                                                  {"base_model": str(model_dir)}))
    return folder


def test_a_mixlora_adapter_scores_in_the_same_pass_as_alone(tiny_llama, adapters, tmp_path):
    mix = _mixlora_folder(tiny_llama, tmp_path / "mix")
    together = load_adapter_set([adapters["lora"], mix], include_base=True)
    both = choice_logliks(together, ITEMS, batch_size=16)
    alone = load_adapter_set([mix])
    one = choice_logliks(alone, ITEMS)[alone.rows[0].adapter]
    mine = both[together.rows[2].adapter]
    _close([[ll for ll, _ in i] for i in one], [[ll for ll, _ in i] for i in mine], 1e-6)
    base = [[ll for ll, _ in i] for i in both[None]]
    assert max(abs(a[0] - b) for x, y in zip(mine, base) for a, b in zip(x, y)) > 1e-3


def test_a_sliding_window_model_falls_back_to_full_sequences(tmp_path_factory, tmp_path):
    model_dir = tiny_model_dir("gemma2", tmp_path_factory)    # window 64, logit soft cap
    adapter = peft_initial_adapter(model_dir, tmp_path / "g")
    long_context = " ".join(["word"] * 25)      # about 125 tokens: over the window
    items = ITEMS[:2] + [[(long_context, " one"), (long_context, " two three")]]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert 64 < len(tokenizer.encode(long_context)) < 250    # and under the 256 context
    aset = load_adapter_set([adapter], include_base=True)
    scored = choice_logliks(aset, items, batch_size=8)
    for row in aset.rows:
        reference = _harness_logliks(_peft(model_dir, row.folder), tokenizer, items)
        _close([[ll for ll, _ in i] for i in scored[row.adapter]], reference, 1e-5)


# -- metrics and the whole evaluation ------------------------------------------------------

def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _arc_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        texts = [f"red {i}", f"the blue one {i}", "green", f"a yellow thing number {i}"][: 3 + i % 2]
        labels = ["A", "B", "C", "D"][: len(texts)]
        rows.append({"question": f"Which colour is item {i}?",
                     "choices": {"text": texts, "label": labels},
                     "answerKey": labels[i % len(labels)]})
    return rows


def test_acc_and_acc_norm_are_lm_evals_argmaxes_with_their_stderr(tiny_llama, adapters,
                                                                 tmp_path):
    path = _write_jsonl(tmp_path / "arc.jsonl", _arc_rows(9))
    spec = TaskSpec("arc", "arc-e", str(path))
    items: list[ChoiceItem] = load_task(spec)
    document = evaluate([adapters["lora"]], [spec], include_base=True, write_folders=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    for name, folder in (("base", None), ("lora", adapters["lora"])):
        lls = _harness_logliks(_peft(tiny_llama, folder), tokenizer,
                               [item.requests for item in items])
        acc = [float(max(range(len(x)), key=x.__getitem__) == it.gold)
               for x, it in zip(lls, items)]
        norm = [float(max(range(len(x)), key=lambda j: x[j] / len(it.choice_texts[j])) == it.gold)
                for x, it in zip(lls, items)]
        got = document["results"][name]["arc"]
        mean = sum(acc) / len(acc)
        assert got["acc"] == pytest.approx(mean)
        assert got["acc_norm"] == pytest.approx(sum(norm) / len(norm))
        stderr = math.sqrt(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1) / len(acc))
        assert got["acc_stderr"] == pytest.approx(stderr)
        assert got["n"] == 9


def test_letter_scoring_takes_the_last_token_of_space_label(tiny_llama, adapters, tmp_path):
    rows = [{"goal": f"open jar {i}", "sol1": "twist the lid", "sol2": "hit it", "label": i % 2}
            for i in range(6)]
    path = _write_jsonl(tmp_path / "piqa.jsonl", rows)
    spec = TaskSpec("piqa", "piqa", str(path), method="letter")
    items = load_task(spec)
    document = evaluate([adapters["dora"]], [spec], write_folders=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = _peft(tiny_llama, adapters["dora"])
    hits = []
    for item in items:
        ids = label_token_ids(tokenizer, item.labels)
        assert ids == [tokenizer.encode(" " + label)[-1] for label in item.labels]
        with torch.no_grad():
            logits = model(torch.tensor([tokenizer.encode(item.prompt)])).logits[0, -1]
        chosen = max(range(len(ids)), key=lambda j: float(logits[ids[j]]))
        hits.append(float(chosen == item.gold))
    assert document["results"]["dora"]["piqa"]["acc"] == pytest.approx(sum(hits) / len(hits))


def test_perplexity_is_the_mean_loss_on_target_tokens(tiny_llama, adapters, tmp_path):
    rows = [{"text": f"the number {i} is followed by {i + 1}"} for i in range(5)]
    path = _write_jsonl(tmp_path / "text.jsonl", rows)
    spec = TaskSpec("ppl", "perplexity", str(path))
    document = evaluate([adapters["rslora"]], [spec], include_base=True, write_folders=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    for name, folder in (("base", None), ("rslora", adapters["rslora"])):
        model = _peft(tiny_llama, folder)
        total, count = 0.0, 0
        for row in rows:
            ids = tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id]
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            total -= sum(float(lp[k, ids[k + 1]]) for k in range(len(ids) - 1))
            count += len(ids) - 1
        got = document["results"][name]["ppl"]
        assert got["tokens"] == count
        assert got["loss"] == pytest.approx(total / count, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_a_context_past_the_models_length_is_cut_from_the_left_as_lm_eval_does(tiny_llama,
                                                                               adapters):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokens = HarnessTokens(tokenizer)
    context = " ".join(f"w{i}" for i in range(150))       # over the 256-token context
    requests = [(context, " end"), (context, " other end")]
    aset = load_adapter_set([adapters["lora"]])
    scored = choice_logliks(aset, [requests])[aset.rows[0].adapter][0]
    model = _peft(tiny_llama, adapters["lora"])
    for (ll, _), (ctx_text, cont_text) in zip(scored, requests):
        ctx, cont = tokens.pair(ctx_text, cont_text)
        assert len(ctx) + len(cont) > 257
        inp = (ctx + cont)[-257:][:-1]               # lm_eval's _loglikelihood_tokens
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([inp])).logits[0].double(), -1)
        first = len(inp) - len(cont)
        expected = sum(float(lp[first + k, t]) for k, t in enumerate(cont))
        assert ll == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("fields", [
    {"target_modules": r".*\.layers\.1\..*(q_proj|down_proj)"},             # a regex
    {"target_modules": "all-linear"},
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "rank_pattern": {"v_proj": 8},
     "alpha_pattern": {r"layers\.0\.self_attn\.q_proj": 32}},
], ids=["regex", "all-linear", "patterns"])
def test_peft_target_forms_and_rank_patterns_load_as_peft_reads_them(tiny_llama, tmp_path,
                                                                      fields):
    folder = peft_initial_adapter(tiny_llama, tmp_path / "peft", **fields)
    aset = load_adapter_set([folder])
    scored = choice_logliks(aset, ITEMS)[aset.rows[0].adapter]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    reference = _harness_logliks(_peft(tiny_llama, folder), tokenizer, ITEMS)
    _close([[ll for ll, _ in i] for i in scored], reference, 1e-5)
    plain = _harness_logliks(_peft(tiny_llama, None), tokenizer, ITEMS)
    assert max(abs(a - b) for x, y in zip(reference, plain) for a, b in zip(x, y)) > 1e-4


def test_a_regex_adapter_and_a_list_adapter_share_the_wrapped_layers(tiny_llama, adapters,
                                                                     tmp_path):
    folder = peft_initial_adapter(tiny_llama, tmp_path / "regex", r=2, lora_alpha=8,
                                  target_modules=r".*\.(q_proj|up_proj)")
    aset = load_adapter_set([adapters["lora"], folder])      # q_proj is wrapped first
    scored = choice_logliks(aset, ITEMS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    for row in aset.rows:
        reference = _harness_logliks(_peft(tiny_llama, row.folder), tokenizer, ITEMS)
        _close([[ll for ll, _ in i] for i in scored[row.adapter]], reference, 1e-5)
