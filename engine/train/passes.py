"""One pass through the shared model: forward with every adapter on its own part, each
job's loss from its own target tokens, one backward; and the same forward for evaluation.

The engine (engine/train/engine.py) decides which passes a step runs (planning.py) and what
happens when one runs out of memory; ``PassRunner`` runs one.
"""

from __future__ import annotations

import math
import time

import torch

from engine.core.data import IGNORE_INDEX
from engine.train.job import Job
from engine.train.lora import BatchLayout, Segment
from engine.train.loss import chunked_head_loss
from engine.train.planning import Pass, PassResult, batch_tensors, segments


class StepClock:
    """Wall time of a step's phases (synchronising the GPU at each boundary, if any).

    A phase that runs several times in a step (a step of several passes) adds up.
    """

    def __init__(self, device: torch.device):
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.laps[phase] = round(self.laps.get(phase, 0.0) + now - self._last, 6)
        self._last = now


class PassRunner:
    """Runs passes of the engine's model (its decoder, then the LM head on target tokens)."""

    def __init__(self, model: torch.nn.Module, decoder: torch.nn.Module, lm_head,
                 softcap: float | None, layout: BatchLayout, device: torch.device,
                 pad_id: int):
        self.model = model
        self.decoder = decoder
        self.lm_head = lm_head
        self.softcap = softcap
        self.layout = layout
        self.device = device
        self.pad_id = pad_id

    def forward_backward(self, pass_: Pass, clock: StepClock) -> PassResult:
        """Forward and backward of one pass; each job's micro-batch loss, by job name.

        Gradients are computed first and added to the jobs' accumulated ones only when the
        whole pass succeeded, so a pass that fails (out of memory) leaves no trace.
        """
        parts = segments(pass_)
        inputs, labels, real, context = batch_tensors(self.model, pass_.examples,
                                                      pass_.packed, self.pad_id)
        # Each job's variant sees the pass begin (MixLoRA: token masks, router records).
        # First of anything on the device: a pass that fails after it (out of memory) is
        # the one whose records are discarded.
        for item, seg in zip(pass_.items, parts):
            item.job.adapter.begin_pass(seg, real)
        for seg in parts:
            seg.tokens_to(self.device)
        inputs = self._on_device(inputs)
        self.layout.set_segments(parts, packed=pass_.packed)
        with context:   # packed attention for the forward and the backward's recomputation
            hidden = self.decoder(**inputs, use_cache=False).last_hidden_state
            job_losses, total = self._pass_losses(pass_, parts, hidden, labels)
            clock.lap("forward")
            params = [p for item in pass_.items for p in item.job.parameters]
            grads = (torch.autograd.grad(total, params, allow_unused=True)
                     if total is not None and total.requires_grad else [None] * len(params))
        for param, grad in zip(params, grads):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad.add_(grad)
        clock.lap("backward")
        losses = {}
        # One device-to-host copy for the pass's losses (one wait, not one per job).
        values = torch.stack([loss.detach().float() for loss in job_losses]).tolist()
        for item, value in zip(pass_.items, values):
            if math.isfinite(value):
                item.job.record_micro_batch(value, item.tokens)
            losses[item.job.name] = value
        return PassResult(losses, rows=len(pass_.examples), tokens=int(real.sum()),
                          cells=real.numel())

    def _pass_losses(self, pass_: Pass, parts: list[Segment], hidden: torch.Tensor,
                     labels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Each job's loss from its own part of the pass, and their sum with the variants'
        extra losses (MixLoRA's router losses): what the backward differentiates."""
        job_losses, total = [], None
        for item, seg in zip(pass_.items, parts):
            job = item.job
            own = slice(seg.start, seg.end)
            own = (slice(None), own) if pass_.packed else own   # positions, or rows
            loss_sum, count = self._token_loss_sum(hidden[own], labels[own])
            job_loss = loss_sum / job.loss_normalizer()
            job_losses.append(job_loss)
            total = job_loss if total is None else total + job_loss
            extra = job.adapter.extra_loss()
            if extra is not None:
                # It weighs like each target token's loss, so it is normalised as the LM
                # loss is (docs/mixlora.md); the reported loss is LM only.
                total = total + extra * count / job.loss_normalizer()
        return job_losses, total

    def _on_device(self, inputs: dict) -> dict:
        return {k: v.to(self.device) if v is not None else None for k, v in inputs.items()}

    def _token_loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor):
        """Summed cross-entropy over the target tokens of these rows, and their count.

        Only target positions go through the LM head, a chunk of tokens at a time, so
        full-vocabulary logits never exist for prompts, padding or other jobs' rows, nor for
        more than a chunk of tokens at once (engine/train/loss.py). ``labels`` stay on the CPU:
        the target positions are found there, so the device never waits for the host.
        """
        shifted = labels[:, 1:]
        rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
        # Position (row, col) predicts label (row, col + 1): its index in the flat rows.
        where = rows * hidden.shape[1] + cols
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(
            0, where.to(hidden.device, non_blocking=True))
        targets = shifted[rows, cols].to(hidden.device, non_blocking=True)
        return (chunked_head_loss(selected, self.lm_head, targets, self.softcap),
                int(where.numel()))

    @torch.no_grad()
    def evaluate(self, job: Job, packed: bool) -> float | None:
        """Mean loss per target token on the job's validation rows (no dropout), laid out
        as the jobs train (``packed`` or padded)."""
        if not job.data.val:
            return None
        self.layout.set_single(job.name)
        total, count = 0.0, 0
        size = job.cfg.micro_batch_size
        for start in range(0, len(job.data.val), size):
            inputs, labels, _real, context = batch_tensors(
                self.model, job.data.val[start:start + size], packed, self.pad_id)
            with context:
                hidden = self.decoder(**self._on_device(inputs),
                                      use_cache=False).last_hidden_state
            loss_sum, n = self._token_loss_sum(hidden, labels)
            total += float(loss_sum)
            count += n
        return total / count if count else None
