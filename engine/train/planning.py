"""A step's forward passes: which micro-batches share a pass, and the tensors of a pass.

Each running job gives the step one ``MicroBatch``. ``plan_step`` groups them into
``Pass``es: with packing, back to back in one row (as many rows as ``max_tokens_per_step``
asks); without, padded rows of similar lengths (``plan_passes``). ``segments`` says which
part of a pass is whose, and ``batch_tensors`` builds the pass's inputs on the CPU.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from engine.core.data import IGNORE_INDEX, Encoded
from engine.train.job import Job
from engine.train.lora import Segment
from engine.train.packing import pack, packed_pass

# A forward pass costs about as much as this many more tokens would (launches, Python,
# smaller matrix products): a step splits into passes only where that saves more padding.
# On a CPU a pass is nearly free beside its arithmetic (measured on SmolLM2-135M, fp32, 4
# jobs: 16 gave 1.06-1.12x the tokens/s of one pass, 256 no gain; one pass per row was
# 0.7x); on a GPU small passes are launch-bound (H200, TinyLlama-1.1B: about 0.15 s a
# pass, some 700 tokens' worth).
PASS_OVERHEAD_TOKENS = {"cpu": 16, "cuda": 1024}
DEFAULT_PASS_OVERHEAD = 256


@dataclass
class MicroBatch:
    """A job's share of a step: the indices of its examples and the examples."""

    job: Job
    indices: list[int]
    examples: list[Encoded]

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def width(self) -> int:
        """The length its rows are padded to."""
        return max(len(e.input_ids) for e in self.examples)


@dataclass
class Pass:
    """Micro-batches that go through the model in one forward and backward."""

    packed: bool
    items: list[MicroBatch]

    @property
    def examples(self) -> list[Encoded]:
        return [example for item in self.items for example in item.examples]


@dataclass
class PassResult:
    """What one pass did: each job's micro-batch loss (by name) and the pass's size."""

    losses: dict[str, float]
    rows: int
    tokens: int     # real tokens
    cells: int      # token slots, padding included


@dataclass
class StepTotals:
    """The passes of one step, added up for its ``batch`` event."""

    rows: int = 0
    tokens: int = 0
    cells: int = 0
    passes: int = 0
    packed: int = 0

    def add(self, result: PassResult, packed: bool) -> None:
        self.rows += result.rows
        self.tokens += result.tokens
        self.cells += result.cells
        self.passes += 1
        self.packed += int(packed)

    @property
    def padding(self) -> float:
        return round(1 - self.tokens / max(1, self.cells), 4)


def plan_passes(widths: list[tuple[int, int]], max_tokens: int = 0,
                overhead: int = DEFAULT_PASS_OVERHEAD) -> list[list[int]]:
    """Group micro-batches into forward passes with little padding.

    ``widths[i]`` is micro-batch i's (rows, padded length). A pass holds micro-batches of
    similar lengths (contiguous in length order) and costs rows x its longest length plus
    ``overhead``; the plan with the least total cost wins, keeping each pass within
    ``max_tokens`` where a single micro-batch allows. Returns index groups, each in the
    order given, groups ordered by their first index.
    """
    order = sorted(range(len(widths)), key=lambda i: (widths[i][1], i))
    n = len(order)
    best = [0.0] + [math.inf] * n        # best[k]: least cost of the first k in length order
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        rows = 0
        for start in range(end - 1, -1, -1):
            rows += widths[order[start]][0]
            tokens = rows * widths[order[end - 1]][1]
            if max_tokens and tokens > max_tokens and end - start > 1:
                break
            cost = best[start] + tokens + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], n
    while end > 0:
        groups.append(sorted(order[cut[end]:end]))
        end = cut[end]
    return sorted(groups)


def plan_step(micro: list[MicroBatch], packing: bool, max_tokens: int,
              overhead: int) -> list[Pass]:
    """The step's passes. With packing, every micro-batch in one packed pass, or in as
    many as ``max_tokens`` asks; without, padded passes of similar lengths."""
    if not packing:
        widths = [(len(item.examples), item.width) for item in micro]
        return [Pass(False, [micro[i] for i in group])
                for group in plan_passes(widths, max_tokens, overhead)]
    passes: list[Pass] = []
    current, tokens = [], 0
    for item in micro:
        size = item.tokens
        if current and max_tokens and tokens + size > max_tokens:
            passes.append(Pass(True, current))
            current, tokens = [], 0
        current.append(item)
        tokens += size
    if current:
        passes.append(Pass(True, current))
    return passes


def segments(pass_: Pass) -> list[Segment]:
    """Each micro-batch's part of the pass, in order: token ranges of the packed row
    (masks drawn per real token), or rows."""
    found, start = [], 0
    for item in pass_.items:
        job, chunk = item.job, item.examples
        if pass_.packed:
            lengths = torch.tensor([len(e.input_ids) for e in chunk])
            size = int(lengths.sum())
            found.append(Segment(
                job.name, start, start + size, None, job.dropout_seed(),
                token_rows=torch.arange(len(chunk)).repeat_interleave(lengths)
                if job.adapter.routes_tokens else None))
            start += size
        else:
            found.append(Segment(job.name, start, start + len(chunk), item.width,
                                 job.dropout_seed()))
            start += len(chunk)
    return found


def collate(examples: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, labels, attention_mask) of encoded examples, on the CPU."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    return ids, labels, attention


def batch_tensors(model: torch.nn.Module, examples: list, packed: bool, pad_id: int):
    """(the decoder's inputs, labels, real-token mask, the context to run it in) of
    ``examples``, on the CPU: one packed row (attention per example inside the
    context), or right-padded rows."""
    if packed:
        row = pack(examples)
        inputs = {"input_ids": row.input_ids, "position_ids": row.position_ids,
                  "attention_mask": None}
        return (inputs, row.labels, row.input_ids.new_ones(row.input_ids.shape),
                packed_pass(model, row.bounds))
    input_ids, labels, real = collate(examples, pad_id)
    return ({"input_ids": input_ids, "attention_mask": real}, labels, real,
            contextlib.nullcontext())
