"""Summed cross-entropy through the LM head, a chunk of tokens at a time.

Full-vocabulary logits are the largest tensor of a training step (tokens x vocabulary, in
fp32 for the loss). ``chunked_head_loss`` never holds more than ``chunk`` tokens' worth:
for each chunk it computes the logits, the loss and, at once, the gradient with respect to
the hidden states, then drops the logits. The backward pass only scales the stored
gradient. This is exact, not an approximation: the LM head is frozen, so the gradient of
the loss with respect to the hidden states is all the backward pass needs from it, and the
arithmetic is the same as autograd's through ``linear -> float -> (softcap) -> cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 1024


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            logits = F.linear(h, weight, bias).float()
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            log_probs = torch.log_softmax(logits, dim=-1)
            t = targets[start:start + chunk]
            total += -log_probs.gather(1, t.unsqueeze(1)).sum()
            if grad is not None:
                # d(sum of -log p[target]) / d logits = softmax - one_hot.
                d_logits = log_probs.exp_()
                d_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                if softcap:
                    d_logits.mul_(1.0 - capped * capped)
                grad[start:start + chunk] = d_logits.to(h.dtype) @ weight.to(h.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None
        return grad * grad_output.to(grad.dtype), None, None, None, None, None


def chunked_head_loss(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                      softcap: float | None = None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Sum over rows of ``-log softmax(head(hidden))[target]``: ``hidden`` is (tokens, dim).

    ``head`` is the model's frozen output linear (its weight may be the tied embedding).
    """
    weight = head.weight
    if weight.requires_grad:
        raise ValueError("chunked_head_loss needs a frozen LM head")
    return _ChunkedHeadLoss.apply(hidden, weight, getattr(head, "bias", None), targets,
                                  softcap or None, max(1, int(chunk)))
