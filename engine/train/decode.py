"""One batched decode for many adapters: every row of the batch goes through its own adapter.

Each row is a prompt for one adapter of an ``AdapterSet`` (or the base model alone). The
prompts are left-padded into one batch; each row's positions count its own tokens only
(``position_ids`` from its attention mask), so a row decodes as it would alone. One forward
per new token serves every row, with a KV cache (transformers' ``DynamicCache``). A row that
emits a stop token or reaches its budget leaves the batch at once: its cache rows are
dropped, and the following steps run on fewer rows.

Written by hand rather than through ``model.generate``: generate keeps finished rows in the
batch (padding them) and knows nothing of the per-row adapter segments of ``BatchLayout``.

Sampling draws from a private ``torch.Generator`` per row, seeded from (seed, row), never the
global RNG: a row's sample does not depend on which other rows share the batch, and a
training engine's random state (which checkpoints record) is untouched.
"""

from __future__ import annotations

import inspect
import secrets
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from engine.train.adapter_set import AdapterSet
from engine.train.lora import Segment, mix_seed
from engine.train.models import hidden_states_and_head


@dataclass
class DecodeRow:
    adapter: Optional[str]      # the adapter's name in the model; None: the base model alone
    prompt: list[int]           # token ids
    key: str = ""               # names the row in its sampling seed
    tokens: list[int] = field(default_factory=list)   # what it generated
    stop: str = ""              # "eos" or "length" once it left the batch


@dataclass
class SamplingSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0    # 0: greedy
    top_p: float = 1.0
    seed: Optional[int] = None


OnToken = Callable[[int, int], None]     # (row index, token id)


class BatchedDecoder:
    """Decodes rows a few tokens at a time (``advance``), or to the end (``run``).

    A training engine advances it a slice at a time between two steps; a command runs it to
    the end. The rows' adapters must not change between calls (the engine decodes a
    snapshot of them).
    """

    def __init__(self, aset: AdapterSet, rows: Sequence[DecodeRow], settings: SamplingSettings,
                 stop_ids: Sequence[int], on_token: Optional[OnToken] = None):
        if not rows:
            raise ValueError("nothing to decode")
        self.aset, self.rows, self.settings = aset, list(rows), settings
        self.stop_ids = set(int(i) for i in stop_ids)
        self.on_token = on_token
        self.decoder, self.lm_head, self.softcap = hidden_states_and_head(aset.model)
        params = inspect.signature(self.decoder.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.cache = None
        self.alive: list[int] = []          # row indices still in the batch, in batch order
        self.generators: dict[int, torch.Generator] = {}
        self.steps_rows: list[int] = []     # rows in the batch at each forward (for tests)
        if settings.temperature > 0:
            # Never torch.seed(): that would reseed the global generator.
            seed = settings.seed if settings.seed is not None else secrets.randbits(63)
            for i, row in enumerate(self.rows):
                key = zlib.crc32((row.key or str(i)).encode())
                self.generators[i] = torch.Generator().manual_seed(mix_seed(seed, key))

    @property
    def done(self) -> bool:
        return self.cache is not None and not self.alive

    @torch.no_grad()
    def run(self) -> list[DecodeRow]:
        while not self.done:
            self.advance(self.settings.max_new_tokens)
        return self.rows

    @torch.no_grad()
    def advance(self, tokens: int) -> bool:
        """Decode up to ``tokens`` more tokens per row; returns whether every row is done."""
        for _ in range(tokens):
            if self.done:
                break
            if self.cache is None:
                logits = self._prefill()
            else:
                logits = self._step()
            self._choose(logits)
        return self.done

    # -- the passes --------------------------------------------------------------------

    def _set_segments(self, width: int) -> None:
        """Rows of one adapter are consecutive in the batch: one segment each."""
        device = self.aset.device
        segs: list[Segment] = []
        for pos, i in enumerate(self.alive):
            adapter = self.rows[i].adapter
            if segs and segs[-1].adapter == adapter:
                segs[-1].end = pos + 1
            else:
                segs.append(Segment(adapter, pos, pos + 1))
        for seg in segs:
            seg.token_mask = self.mask[seg.start:seg.end, -width:].to(device, torch.bool)
        self.aset.layout.set_segments(segs)

    def _prefill(self) -> torch.Tensor:
        adapters = [row.adapter for row in self.rows]
        order = {a: k for k, a in enumerate(dict.fromkeys(adapters))}
        self.alive = sorted(range(len(self.rows)), key=lambda i: order[self.rows[i].adapter])
        width = max(len(self.rows[i].prompt) for i in self.alive)
        ids = torch.full((len(self.alive), width), self._pad_id(), dtype=torch.long)
        self.mask = torch.zeros((len(self.alive), width), dtype=torch.long)
        for pos, i in enumerate(self.alive):
            prompt = self.rows[i].prompt
            ids[pos, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            self.mask[pos, width - len(prompt):] = 1
        positions = (self.mask.cumsum(1) - 1).clamp(min=0)
        self.next_position = positions[:, -1] + 1
        self._set_segments(width)
        return self._forward(ids, positions, None)

    def _step(self) -> torch.Tensor:
        ids = torch.tensor([[self.rows[i].tokens[-1]] for i in self.alive], dtype=torch.long)
        self.mask = torch.cat([self.mask, torch.ones((len(self.alive), 1), dtype=torch.long)], 1)
        positions = self.next_position.unsqueeze(1)
        self.next_position = self.next_position + 1
        self._set_segments(1)
        return self._forward(ids, positions, self.cache)

    def _forward(self, ids, positions, cache) -> torch.Tensor:
        device = self.aset.device
        self.steps_rows.append(len(self.alive))
        out = self.decoder(input_ids=ids.to(device), attention_mask=self.mask.to(device),
                           position_ids=positions.to(device), use_cache=True,
                           **{self.cache_arg: cache})
        self.cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        logits = self.lm_head(out.last_hidden_state[:, -1]).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _pad_id(self) -> int:
        tokenizer = self.aset.tokenizer
        for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    # -- choosing tokens, and rows leaving -------------------------------------------

    def _choose(self, logits: torch.Tensor) -> None:
        settings = self.settings
        if settings.temperature > 0:
            chosen = [self._sample(logits[pos], i) for pos, i in enumerate(self.alive)]
        else:
            chosen = logits.argmax(dim=-1).tolist()
        keep = []
        for pos, (i, token) in enumerate(zip(self.alive, chosen)):
            row = self.rows[i]
            if token in self.stop_ids:
                row.stop = "eos"
                continue
            row.tokens.append(int(token))
            if self.on_token:
                self.on_token(i, int(token))
            if len(row.tokens) >= settings.max_new_tokens:
                row.stop = "length"
                continue
            keep.append(pos)
        if len(keep) < len(self.alive):
            self.alive = [self.alive[pos] for pos in keep]
            if keep:
                index = torch.tensor(keep, dtype=torch.long)
                self.cache.batch_select_indices(index.to(self.aset.device))
                self.mask = self.mask[index]
                self.next_position = self.next_position[index]

    def _sample(self, logits: torch.Tensor, row: int) -> int:
        probs = torch.softmax(logits.cpu() / self.settings.temperature, dim=-1)
        top_p = self.settings.top_p
        if top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest set whose mass reaches top_p (the first token always).
            drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generators[row]))
