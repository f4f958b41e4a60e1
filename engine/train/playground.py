"""Generation from jobs' adapters while the engine trains them (the TUI's playground).

A ``generate`` request (engine/core/protocol.py) names jobs; the engine copies each job's
adapter as it is at that moment into a snapshot adapter of its own (so the answer comes
from one step's weights, and the KV cache never mixes steps), then decodes a slice of
tokens (``SLICE_TOKENS``) for every open generation between two training steps until each
is done, so training never stalls for more than a slice. The answers go to the asking
client only, as stream messages; they are not events and never reach metrics.jsonl.

Nothing about training changes: snapshots are separate adapters that no training segment
names, they hold no gradients and no optimizer state, and sampling draws from private
generators (engine/train/decode.py), never the global RNG that checkpoints record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from engine.core import protocol as p
from engine.core.errors import UserError
from engine.core.jobs import CANCELLED, FAILED
from engine.core.prompts import load_template
from engine.train.adapter_set import AdapterRow, AdapterSet, BASE_ROW
from engine.train.adapters import (adapter_state_dict, adapter_tensors, detach_adapter,
                                   load_adapter_state)
from engine.train.decode import BatchedDecoder, DecodeRow, SamplingSettings
from engine.train.generate import prompt_ids, stop_ids
from engine.train.models import find_target_linears
from engine.train.scoring import max_length
from engine.train.variants import variant_for

SLICE_TOKENS = 8
Send = Callable[[int, dict], None]      # (client id, message)


@dataclass
class _Open:
    client_id: int
    request_id: int
    names: list[str]
    decoder: BatchedDecoder
    snapshots: list[str]
    texts: dict[str, str] = field(default_factory=dict)


class Playground:
    """The engine's open generations."""

    def __init__(self, engine):
        self.engine = engine
        self.open: list[_Open] = []
        self._count = 0

    @property
    def active(self) -> bool:
        return bool(self.open)

    def start(self, client_id: int, request_id: int, send: Send, prompt: str,
              jobs: Optional[list] = None, base: bool = False, input: str = "",
              max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
              seed: Optional[int] = None, raw: bool = False) -> dict:
        """Snapshot the jobs' adapters and open a generation; returns the reply."""
        engine = self.engine
        self.send = send
        if len(self.open) >= p.MAX_GENERATIONS:
            raise UserError(f"the engine is already answering {len(self.open)} prompts "
                            f"(at most {p.MAX_GENERATIONS}); try again when one is done")
        if not prompt.strip():
            raise UserError("the prompt is empty")
        if not 1 <= max_new_tokens <= p.MAX_GENERATE_TOKENS:
            raise UserError(f"max_new_tokens must be 1 to {p.MAX_GENERATE_TOKENS}, got "
                            f"{max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise UserError("temperature must be >= 0 and top_p in (0, 1]")
        chosen = self._jobs(jobs)
        if not chosen and not base:
            raise UserError("no job to answer: name jobs (or ask for the base model)")
        self._count += 1
        snapshots, rows, reply_rows = [], [], []
        try:
            for job in chosen:
                snap = f"playground{self._count}_{len(snapshots)}"
                self._snapshot(job, snap)
                snapshots.append(snap)
                rows.append((job.name, snap, None if raw else load_template(job.cfg.prompt)))
                reply_rows.append({"name": job.name, "step": job.step})
            if base:
                template = rows[0][2] if rows else None
                rows.insert(0, (BASE_ROW, None, template))
                reply_rows.insert(0, {"name": BASE_ROW, "step": None})
            decode_rows = []
            limit = max_length(engine.model, engine.tokenizer)
            for name, adapter, template in rows:
                ids = prompt_ids(prompt, engine.tokenizer, template, input)
                if len(ids) + max_new_tokens > limit:
                    raise UserError(f"{name}: the prompt ({len(ids)} tokens) and "
                                    f"max_new_tokens {max_new_tokens} exceed the model's "
                                    f"context of {limit} tokens")
                decode_rows.append(DecodeRow(adapter, ids, key=name))
        except BaseException:
            for snap in snapshots:
                detach_adapter(engine.model, snap)
            raise
        aset = AdapterSet(engine.model, engine.tokenizer, engine.layout,
                          [AdapterRow(name, adapter) for name, adapter, _ in rows],
                          engine.device, {})
        decoder = BatchedDecoder(aset, decode_rows,
                                 SamplingSettings(max_new_tokens, temperature, top_p, seed),
                                 stop_ids(engine.model, engine.tokenizer))
        self.open.append(_Open(client_id, request_id, [r[0] for r in rows], decoder,
                               snapshots))
        return {"rows": reply_rows, "slice_tokens": SLICE_TOKENS}

    def _jobs(self, names: Optional[list]) -> list:
        jobs = self.engine.jobs
        if names is None:
            return [j for j in jobs.values() if j.state not in (CANCELLED, FAILED)
                    and not j.finished]
        chosen = []
        for name in names:
            if not isinstance(name, str) or name not in jobs:
                raise UserError(f"no job named {name!r}")
            job = jobs[name]
            if job.state in (CANCELLED, FAILED):
                raise UserError(f"job {name!r} is {job.state}: its adapter has left the model")
            chosen.append(job)
        return chosen

    @torch.no_grad()
    def _snapshot(self, job, snap: str) -> None:
        """A frozen copy of the job's adapter as it is now, attached as ``snap``."""
        engine = self.engine
        linears = list(find_target_linears(engine.model, job.targets))
        variant_for(snap, job.cfg).attach(engine.model, engine.layout, linears,
                                          init_seed=0, device=engine.device)
        load_adapter_state(engine.model, snap, adapter_state_dict(engine.model, job.name),
                           source=f"job {job.name}")
        for tensor in adapter_tensors(engine.model, snap).values():
            tensor.requires_grad_(False)

    def advance(self) -> None:
        """One slice of every open generation; each sends its texts so far, and closes
        when done (its snapshots detached)."""
        for gen in list(self.open):
            try:
                done = gen.decoder.advance(SLICE_TOKENS)
            except Exception as e:      # one generation's failure is its asker's alone
                self._close(gen, {"done": True, "error": f"generation failed: {e!r}",
                                  "texts": self._texts(gen)})
                continue
            data = {"texts": self._texts(gen), "done": done}
            if done:
                data["stops"] = {name: row.stop for name, row in zip(gen.names,
                                                                      gen.decoder.rows)}
                self._close(gen, data)
            else:
                self.send(gen.client_id, p.stream(gen.request_id, data))

    def close_all(self, why: str) -> None:
        for gen in list(self.open):
            self._close(gen, {"done": True, "error": why, "texts": self._texts(gen)})

    def _texts(self, gen: _Open) -> dict[str, str]:
        tokenizer = self.engine.tokenizer
        return {name: tokenizer.decode(row.tokens, skip_special_tokens=True).strip()
                for name, row in zip(gen.names, gen.decoder.rows)}

    def _close(self, gen: _Open, data: dict) -> None:
        self.open.remove(gen)
        for snap in gen.snapshots:
            detach_adapter(self.engine.model, snap)
        self.send(gen.client_id, p.stream(gen.request_id, data))
