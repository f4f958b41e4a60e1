"""The benchmarks' rows: synthetic Alpaca rows of realistic lengths, and the micro-batches
a fresh job draws from them (the engine's own order), so every variant runs the same rows."""

from __future__ import annotations

import math
import random


def _text(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


def make_rows(n: int, seed: int, words: list[str], scale: float) -> list[dict]:
    """Alpaca rows whose fields have realistic, varied lengths in tokens.

    ``words`` are one token each (with their leading space) in the tokenizer used, so a
    field of k words is about k tokens. Instruction 6-30 tokens; an input in 60% of rows,
    log-normal with median 40 tokens; output log-normal with median 80 tokens (clipped at
    400), about what a LLaMA tokenizer makes of Alpaca; ``scale`` multiplies every length.
    """
    rng = random.Random(f"mlora-bench/{seed}")
    rows = []

    def length(median: float, sigma: float, low: int, high: int) -> int:
        value = rng.lognormvariate(math.log(median), sigma)
        return max(1, int(round(scale * min(high, max(low, value)))))

    for _ in range(n):
        row = {"instruction": _text(rng, words, max(1, int(scale * rng.randint(6, 30))))}
        if rng.random() < 0.6:
            row["input"] = _text(rng, words, length(40, 0.8, 4, 300))
        row["output"] = _text(rng, words, length(80, 0.9, 2, 400))
        rows.append(row)
    return rows


def one_token_words(tokenizer) -> list[str]:
    """Alphabetic vocabulary entries that are one token with a leading space."""
    words = sorted(k[1:] for k in tokenizer.get_vocab()
                   if k.startswith("\u0120") and k[1:].isalpha() and len(k) > 2)
    good = [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    return good or ["the", "an", "is", "that"]


def plan_micro_batches(data, count: int) -> list[list[int]]:
    """The first ``count`` micro-batches a fresh job draws from ``data`` (a ``JobData``):
    the engine's order, epoch after epoch."""
    planned: list[list[int]] = []
    epoch = 0
    while len(planned) < count:
        batches = data.epoch_batches(epoch)
        if not batches:
            raise SystemExit(f"adapter {data.name!r}: no training examples")
        for batch in batches:
            planned.extend(data.micro_batches(batch))
        epoch += 1
    return planned[:count]


def job_data(config, tokenizer) -> dict:
    """Each adapter's ``JobData`` of a ``RunConfig``, encoded as the engine encodes it."""
    from engine.core.data import JobData
    from engine.core.prompts import load_template

    return {a.name: JobData.from_config(a, tokenizer, load_template(a.prompt),
                                        default_cutoff_len=config.train.cutoff_len,
                                        default_seed=config.train.seed)
            for a in config.adapters}
