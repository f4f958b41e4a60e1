"""Evaluate adapters on multiple-choice tasks and perplexity, every adapter in the same passes.

``evaluate`` loads the adapters onto one base model (``adapter_set``), reads each task's
items (``engine.core.eval_tasks``: lm-evaluation-harness 0.4.13's tasks on local files),
scores them for every adapter at once (``scoring``) and reduces the scores to the metrics
lm_eval reports: ``acc`` is the argmax of the summed log-likelihood of each choice,
``acc_norm`` the argmax of that divided by the choice's length in characters, each with its
standard error (sample standard deviation over the square root of n, as lm_eval's
``mean_stderr``). The results are
``{"results": {row: {task key: {metric: value, ...}}}}``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

from engine.core.data import encode_row
from engine.core.eval_tasks import METRICS, ChoiceItem, LetterItem, TaskSpec, load_task
from engine.core.errors import DataError, UserError
from engine.train.adapter_set import AdapterSet, load_adapter_set
from engine.train.adapters import write_files_atomically
from engine.train.scoring import HarnessTokens, choice_logliks, label_logits, max_length, target_loss

RESULTS_FILE = "eval_results.json"
Progress = Callable[[str, int, int], None]    # (task key, items done so far, items in all)


def evaluate(adapters: Sequence[str | Path], tasks: Sequence[TaskSpec], *,
             include_base: bool = False, base_model: Optional[str] = None,
             dtype: Optional[str] = None, quantize: Optional[str] = None,
             batch_size: int = 64, progress: Optional[Progress] = None,
             log: Optional[Callable[[str], None]] = None, write_folders: bool = True) -> dict:
    """Every adapter (and the base model alone with ``include_base``) on every task.

    Task files are read and checked before the model loads, so a bad row fails fast.
    ``write_folders``: each adapter's folder gets ``eval_results.json`` (its row).
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    loaded = [(spec, load_task(spec)) for spec in tasks]
    aset = load_adapter_set(list(adapters), include_base=include_base, base_model=base_model,
                            dtype=dtype, quantize=quantize, log=log)
    results = score_tasks(aset, loaded, batch_size=batch_size, progress=progress)
    document = {"results": results}
    if write_folders:
        for row in aset.rows:
            if row.folder is None:
                continue
            try:
                write_results(row.folder, {"results": {row.name: results[row.name]}})
            except UserError as e:    # the results still reach the caller
                (log or print)(f"warning: {e}")
    return document


def score_tasks(aset: AdapterSet, loaded: Sequence[tuple[TaskSpec, list]], *,
                batch_size: int = 64, progress: Optional[Progress] = None) -> dict:
    """``{row name: {task key: metrics}}`` of tasks already read (``load_task``)."""
    results: dict = {row.name: {} for row in aset.rows}
    for spec, items in loaded:
        done = [0]

        def tick(n: int, key=spec.key, total=len(items), done=done) -> None:
            done[0] += n
            if progress:
                progress(key, done[0], total)

        if spec.format == "perplexity":
            scores = _perplexity(aset, spec, items, batch_size, tick)
        elif spec.method == "letter":
            scores = _letter(aset, items, batch_size, tick)
        else:
            scores = _loglik(aset, spec, items, batch_size, tick)
        for row in aset.rows:
            results[row.name][spec.key] = scores[row.adapter]
    return results


def _loglik(aset: AdapterSet, spec: TaskSpec, items: list[ChoiceItem], batch_size: int,
            tick) -> dict:
    scored = choice_logliks(aset, [item.requests for item in items], batch_size=batch_size,
                            progress=tick)
    metrics = METRICS[spec.format]
    out = {}
    for adapter, per_item in scored.items():
        values: dict[str, list[float]] = {m: [] for m in metrics}
        for item, choices in zip(items, per_item):
            lls = [ll for ll, _greedy in choices]
            for metric in metrics:
                values[metric].append(float(_pick(lls, item, metric) == item.gold))
        out[adapter] = summarize(values)
    return out


def _pick(lls: list[float], item: ChoiceItem, metric: str) -> int:
    """The chosen index, as lm_eval's ``np.argmax`` picks it (the first of equal maxima)."""
    if metric == "acc":
        scores = lls
    elif metric == "acc_norm":
        scores = [ll / len(text) for ll, text in zip(lls, item.choice_texts)]
    elif metric == "acc_bytes":
        scores = [ll / len(text.encode()) for ll, text in zip(lls, item.choice_texts)]
    else:
        raise ValueError(f"unknown metric {metric!r}")
    return max(range(len(scores)), key=scores.__getitem__)


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[int]:
    """The token each label is scored by: the last token of ``" " + label`` (m-LoRA's)."""
    tokens = HarnessTokens(tokenizer)
    return [tokens.encode(" " + label, add_special_tokens=False)[-1] for label in labels]


def _letter(aset: AdapterSet, items: list[LetterItem], batch_size: int, tick) -> dict:
    ids = [label_token_ids(aset.tokenizer, item.labels) for item in items]
    scored = label_logits(aset, [item.prompt for item in items], ids, batch_size=batch_size,
                          progress=tick)
    out = {}
    for adapter, per_item in scored.items():
        hits = [float(max(range(len(logits)), key=logits.__getitem__) == item.gold)
                for item, logits in zip(items, per_item)]
        out[adapter] = summarize({"acc": hits})
    return out


def _perplexity(aset: AdapterSet, spec: TaskSpec, rows: list[dict], batch_size: int,
                tick) -> dict:
    cutoff = max_length(aset.model, aset.tokenizer)
    encoded = {}
    for row in aset.rows:
        template = row.template()
        examples = []
        for index, data in enumerate(rows):
            try:
                examples.append(encode_row(data, aset.tokenizer, template, cutoff,
                                           file=spec.path, line=index + 1))
            except DataError as e:
                raise UserError(str(e)) from None
        encoded[row.adapter] = examples
    totals = target_loss(aset, encoded, batch_size=max(1, batch_size // 4),
                         progress=lambda n: tick(n / len(aset.rows)))
    out = {}
    for adapter, (total, count) in totals.items():
        if not count:
            raise UserError(f"{spec.path}: task {spec.key!r} has no target tokens to score")
        loss = total / count
        out[adapter] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}
    return out


def summarize(values: dict[str, list[float]]) -> dict:
    """Mean and standard error of each metric's per-item values, and n."""
    out: dict = {}
    n = 0
    for metric, xs in values.items():
        n = len(xs)
        mean = sum(xs) / n
        out[metric] = mean
        out[f"{metric}_stderr"] = (math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n)
                                   if n > 1 else None)
    out["n"] = n
    return out


def write_results(folder: Path, document: dict) -> None:
    """``eval_results.json`` in an adapter folder, written atomically."""
    try:
        write_files_atomically(Path(folder), {
            RESULTS_FILE: (json.dumps(document, indent=2) + "\n").encode()})
    except OSError as e:
        raise UserError(f"{folder}: cannot write {RESULTS_FILE} ({e.strerror or e})") from None
