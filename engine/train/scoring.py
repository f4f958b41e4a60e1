"""Scores of text under many adapters at once: one base forward serves every adapter.

Three kinds of score, each for every row of an ``AdapterSet`` (adapters, and the base model
alone) in the same passes, the rows of a pass split among adapters by ``BatchLayout``
segments as in training:

- ``choice_logliks``: lm-evaluation-harness's ``loglikelihood`` requests, ``(context,
  continuation)`` pairs, each scored as the summed log-probability of the continuation's
  tokens and whether greedy decoding would produce them. Tokenization, left truncation and
  the empty-context rule mirror lm_eval 0.4.13's ``HFLM`` (``_encode_pair``,
  ``tok_encode``, ``_loglikelihood_tokens``) so the numbers are the harness's. The choices
  of one item share their context: its tokens go through the model once per adapter and
  its KV cache is reused for every choice.
- ``label_logits``: the logits of a few label tokens after a prompt (m-LoRA's letter
  scoring).
- ``target_loss``: summed cross-entropy on the target tokens of encoded rows (perplexity).

Written by hand: lm_eval scores one model at a time, and no library batches rows through
different adapters of one base model while sharing a prefix cache between them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from engine.core.data import IGNORE_INDEX
from engine.train.adapter_set import AdapterSet
from engine.train.lora import Segment
from engine.train.models import hidden_states_and_head

HEAD_CHUNK = 512          # tokens whose full-vocabulary logits exist at once
DEFAULT_MAX_LENGTH = 2048  # lm_eval's, for a model that states no context length


# -- lm-evaluation-harness's tokenization --------------------------------------------------

def max_length(model, tokenizer) -> int:
    """The context length lm_eval gives a model (``resolve_max_length``'s order)."""
    configs = [model.config.get_text_config(), model.config]
    for config in configs:
        for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10 ** 12:
        return value
    return DEFAULT_MAX_LENGTH


class HarnessTokens:
    """``(context, continuation)`` to token ids the way lm_eval's HFLM does it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token_id
        self.prefix_id = bos if bos is not None else tokenizer.eos_token_id
        self.prefix_text = tokenizer.decode(self.prefix_id)

    def encode(self, text: str, add_special_tokens: Optional[bool] = None) -> list[int]:
        if add_special_tokens is None and text.startswith(self.prefix_text):
            add_special_tokens = False      # the text already starts with the BOS string
        if add_special_tokens is None:
            return list(self.tokenizer.encode(text))
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_id:
                return cont[:1], cont[1:]
            return [self.prefix_id], cont
        spaces = len(context) - len(context.rstrip())
        if spaces:      # trailing spaces belong to the continuation
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]


@dataclass
class _Seq:
    """One choice's model input and where its continuation is scored."""
    inp: list[int]        # (context + continuation)[-(max_len + 1):][:-1]
    targets: list[int]    # the continuation tokens, predicted at the last len() positions


def harness_sequences(tokens: HarnessTokens, requests: Sequence[tuple[str, str]],
                      limit: int) -> list[_Seq]:
    out = []
    for context, continuation in requests:
        ctx, cont = tokens.pair(context, continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} has no tokens")
        inp = (ctx + cont)[-(limit + 1):][:-1]
        out.append(_Seq(inp, cont[-len(inp):] if len(cont) > len(inp) else cont))
    return out


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


# -- passes through the model ----------------------------------------------------------

class RowPasses:
    """Forward passes of token rows, each row through one adapter of the set."""

    def __init__(self, aset: AdapterSet):
        self.aset = aset
        self.decoder, self.lm_head, self.softcap = hidden_states_and_head(aset.model)
        self.pad_id = aset.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = aset.tokenizer.eos_token_id or 0
        config = aset.model.config.get_text_config()
        window = getattr(config, "sliding_window", None)
        # A sliding-window layer's cache keeps only its window: a prefix cache is used only
        # where every row fits in the window.
        self.window = window if isinstance(window, int) and window > 0 else None
        # transformers 5.2x names the decoder's KV cache argument `cache`, earlier ones
        # `past_key_values`.
        params = inspect.signature(self.decoder.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def segments(self, adapters: Sequence[Optional[str]], rows_each: int,
                 mask: torch.Tensor) -> list[Segment]:
        segs = []
        for index, adapter in enumerate(adapters):
            start, end = index * rows_each, (index + 1) * rows_each
            # token_mask: a variant that routes tokens (MixLoRA) routes the real ones only.
            segs.append(Segment(adapter, start, end, token_mask=mask[start:end]))
        return segs

    def forward(self, adapters: Sequence[Optional[str]], rows: list[list[int]],
                offsets: Optional[list[int]] = None, cache=None,
                cache_mask: Optional[torch.Tensor] = None, keep_cache: bool = False):
        """Hidden states of ``rows`` (the same rows for each adapter in turn, adapter-major:
        row ``a * len(rows) + i`` is ``rows[i]`` through ``adapters[a]``), right-padded.

        ``offsets[i]``: the position of row i's first token (its prefix's length, when
        ``cache`` holds the prefixes with ``cache_mask`` their real tokens). Returns
        ``(hidden, mask, cache)``; the cache (of these rows too) when ``keep_cache``.
        """
        device = self.aset.device
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        offsets = offsets or [0] * len(rows)
        positions = torch.tensor(offsets, dtype=torch.long).unsqueeze(1) + torch.arange(width)
        n = len(adapters)
        ids, mask, positions = ids.repeat(n, 1), mask.repeat(n, 1), positions.repeat(n, 1)
        self.aset.layout.set_segments(self.segments(adapters, len(rows), mask.bool().to(device)))
        full_mask = mask if cache_mask is None else torch.cat([cache_mask, mask], dim=1)
        out = self.decoder(input_ids=ids.to(device), attention_mask=full_mask.to(device),
                           position_ids=positions.to(device), use_cache=keep_cache,
                           **{self.cache_arg: cache})
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.last_hidden_state, mask, cache

    def log_probs(self, hidden: torch.Tensor, where: list[tuple[int, int]],
                  targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of ``targets[k]`` at hidden position ``where[k]`` (row, column),
        and whether it is the argmax there. fp32, a chunk of positions at a time."""
        device = hidden.device
        flat = hidden.reshape(-1, hidden.shape[-1])
        index = torch.tensor([r * hidden.shape[1] + c for r, c in where], device=device)
        target = torch.tensor(targets, device=device)
        lps, greedy = [], []
        for start in range(0, len(where), HEAD_CHUNK):
            logits = self.head_logits(flat.index_select(0, index[start:start + HEAD_CHUNK]))
            t = target[start:start + HEAD_CHUNK]
            lp = torch.log_softmax(logits, dim=-1)
            lps.append(lp.gather(1, t.unsqueeze(1)).squeeze(1))
            greedy.append(logits.argmax(dim=-1) == t)
        return torch.cat(lps).double().cpu(), torch.cat(greedy).cpu()

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# -- multiple choice: lm_eval's loglikelihood ------------------------------------------

@dataclass
class _Item:
    seqs: list[_Seq]
    prefix: int          # tokens shared by every choice's input, run once per adapter


@torch.no_grad()
def choice_logliks(aset: AdapterSet, items: Sequence[Sequence[tuple[str, str]]], *,
                   batch_size: int = 64, share_prefix: bool = True,
                   progress: Optional[Callable[[int], None]] = None
                   ) -> dict[Optional[str], list[list[tuple[float, bool]]]]:
    """``(loglik, is_greedy)`` of every request of every item, for every row of ``aset``:
    ``result[adapter][item][choice]``. ``batch_size``: sequences per pass, all adapters
    counted (at least one item's). ``share_prefix`` False runs every choice's whole
    sequence (no prefix cache; for tests and benchmarks). ``progress(n)`` is called as
    items are done."""
    passes = RowPasses(aset)
    adapters = [row.adapter for row in aset.rows]
    limit = max_length(aset.model, aset.tokenizer)
    tokens = HarnessTokens(aset.tokenizer)
    prepared = []
    for requests in items:
        seqs = harness_sequences(tokens, requests, limit)
        shared = min(_common_prefix([s.inp for s in seqs]),
                     min(len(s.inp) - len(s.targets) for s in seqs))
        prepared.append(_Item(seqs, shared))
    result = {a: [None] * len(items) for a in adapters}
    # Longest first, as lm_eval orders its requests: batches of like lengths pad little.
    order = sorted(range(len(items)), key=lambda i: -max(len(s.inp) for s in prepared[i].seqs))
    for group in _groups(order, prepared, len(adapters), batch_size):
        cached = [i for i in group if share_prefix and prepared[i].prefix > 0
                  and (passes.window is None
                       or max(len(s.inp) for s in prepared[i].seqs) <= passes.window)]
        plain = [i for i in group if i not in cached]
        for subset, use_cache in ((cached, True), (plain, False)):
            if subset:
                scores = _score_group(passes, adapters, [prepared[i] for i in subset], use_cache)
                for a in adapters:
                    for i, s in zip(subset, scores[a]):
                        result[a][i] = s
        if progress:
            progress(len(group))
    return result


def _groups(order: list[int], prepared: list[_Item], n_adapters: int, batch_size: int):
    group, rows = [], 0
    for i in order:
        need = len(prepared[i].seqs) * n_adapters
        if group and rows + need > batch_size:
            yield group
            group, rows = [], 0
        group.append(i)
        rows += need
    if group:
        yield group


def _score_group(passes: RowPasses, adapters, items: list[_Item], use_cache: bool):
    cache = cache_mask = None
    if use_cache:
        # Each item's shared prefix once per adapter; its cache serves every choice.
        _hidden, cache_mask, cache = passes.forward(
            adapters, [it.seqs[0].inp[:it.prefix] for it in items], keep_cache=True)
        del _hidden
    rows, offsets, owners, seqs = [], [], [], []
    for k, it in enumerate(items):
        start = it.prefix if use_cache else 0
        for seq in it.seqs:
            rows.append(seq.inp[start:])
            offsets.append(start)
            owners.append(k)
            seqs.append(seq)
    n_prefix = len(items)
    if use_cache:
        # Row (adapter a, choice row j) reads the cache row of (a, its item).
        pick = torch.tensor([a * n_prefix + owners[j] for a in range(len(adapters))
                             for j in range(len(rows))])
        cache.batch_select_indices(pick.to(passes.aset.device))
        cache_mask = cache_mask.index_select(0, pick)
    hidden, _mask, _ = passes.forward(adapters, rows, offsets, cache, cache_mask)
    where, targets, spans = [], [], []
    for a in range(len(adapters)):
        for j, row in enumerate(rows):
            seq = seqs[j]
            first = len(row) - len(seq.targets)
            begin = len(where)
            for t, token in enumerate(seq.targets):
                where.append((a * len(rows) + j, first + t))
                targets.append(token)
            spans.append((begin, len(where)))
    lps, greedy = passes.log_probs(hidden, where, targets)
    out = {}
    for a, adapter in enumerate(adapters):
        per_item: list[list[tuple[float, bool]]] = [[] for _ in items]
        for j in range(len(rows)):
            b, e = spans[a * len(rows) + j]
            per_item[owners[j]].append((float(lps[b:e].sum()), bool(greedy[b:e].all())))
        out[adapter] = per_item
    return out


# -- letter scoring: logits of label tokens after a prompt ------------------------------

@torch.no_grad()
def label_logits(aset: AdapterSet, prompts: Sequence[str], labels: Sequence[Sequence[int]], *,
                 batch_size: int = 64, progress: Optional[Callable[[int], None]] = None
                 ) -> dict[Optional[str], list[list[float]]]:
    """For each prompt, the next-token logits of its label token ids, for every row."""
    passes = RowPasses(aset)
    adapters = [row.adapter for row in aset.rows]
    tokens = HarnessTokens(aset.tokenizer)
    limit = max_length(aset.model, aset.tokenizer)
    encoded = [tokens.encode(p)[-limit:] for p in prompts]
    result = {a: [None] * len(prompts) for a in adapters}
    per_pass = max(1, batch_size // len(adapters))
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    for start in range(0, len(order), per_pass):
        group = order[start:start + per_pass]
        rows = [encoded[i] for i in group]
        hidden, _mask, _ = passes.forward(adapters, rows)
        last = torch.tensor([len(r) - 1 for r in rows] * len(adapters), device=hidden.device)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        logits = passes.head_logits(picked).cpu()
        for a, adapter in enumerate(adapters):
            for k, i in enumerate(group):
                row = logits[a * len(group) + k]
                result[adapter][i] = [float(row[t]) for t in labels[i]]
        if progress:
            progress(len(group))
    return result


# -- perplexity: loss on target tokens --------------------------------------------------

@torch.no_grad()
def target_loss(aset: AdapterSet, encoded: dict[Optional[str], list], *, batch_size: int = 16,
                progress: Optional[Callable[[int], None]] = None
                ) -> dict[Optional[str], tuple[float, int]]:
    """(summed cross-entropy, target tokens) of each row's encoded examples
    (``engine.core.data.Encoded``; each adapter's own, as its prompt template encodes them),
    with no dropout: the eval_loss of training, for any adapter set."""
    passes = RowPasses(aset)
    totals = {}
    for adapter, examples in encoded.items():
        total, count = 0.0, 0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            hidden, _mask, _ = passes.forward([adapter], [e.input_ids for e in chunk])
            where, targets = [], []
            for r, e in enumerate(chunk):
                for pos in range(len(e.labels) - 1):
                    if e.labels[pos + 1] != IGNORE_INDEX:
                        where.append((r, pos))
                        targets.append(e.labels[pos + 1])
            if where:
                lps, _ = passes.log_probs(hidden, where, targets)
                total -= float(lps.sum())
                count += len(where)
            if progress:
                progress(len(chunk))
        totals[adapter] = (total, count)
    return totals
