"""Vocabulary-wide losses (CE, logit KD) computed in chunks of rows, with their gradient.

Logits [B, T, V] are the largest tensors of a step (V = 49152..262144). Through autograd, a
softmax loss keeps its log-softmax output for backward, allocates a gradient of the same size
there, and every intermediate op (cast, division, subtraction) is one more [B, T, V] buffer.
Here the forward pass walks the rows in chunks that fit in cache, computes each chunk's loss
and its gradient d loss / d logits (softmax minus target, in closed form) and writes the
gradient into one preallocated buffer; backward only scales that buffer. One [B, T, V] buffer
instead of four to six, and no full-size temporaries (quickstart: benchmarks/RESULTS.md).

Invalid rows (weight 0) are zeroed inside their chunk before the softmax, so whatever they hold
(even NaN) reaches neither the value nor the gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Kernel = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""(logits rows [c, V] float32, target rows [c, ...], weights [c]) -> (weighted loss sum [],
its gradient with respect to the logits rows [c, V] float32)."""

CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**27}
"""Elements per chunk: 16 MiB of float32 on CPU (cache-sized), 512 MiB on CUDA (few launches)."""


def rowwise_loss(kernel: Kernel, logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """sum over rows r of weights[r] * loss(logits[r], targets[r]) as a differentiable scalar.

    logits [..., V] (any float dtype; the gradient comes back in it), targets [..., *] (rows
    matching logits' leading dims), weights [...] float (0 = ignore the row)."""
    return _Rowwise.apply(logits, targets, weights, kernel)


class _Rowwise(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, targets: Tensor, weights: Tensor, kernel: Kernel
    ) -> Tensor:
        v = logits.shape[-1]
        flat = logits.reshape(-1, v)
        flat_t = targets.reshape(flat.shape[0], *targets.shape[weights.dim() :])
        flat_w = weights.reshape(-1).float()
        grad = torch.empty_like(flat)
        total = flat.new_zeros((), dtype=torch.float32)
        step = max(1, CHUNK_ELEMENTS.get(logits.device.type, 2**22) // v)
        for first in range(0, flat.shape[0], step):
            rows = slice(first, first + step)
            w = flat_w[rows]
            x = flat[rows].float().masked_fill((w == 0)[:, None], 0.0)
            value, g = kernel(x, flat_t[rows], w)
            total += value
            grad[rows] = g
        ctx.grad = grad
        ctx.shape = logits.shape
        return total

    @staticmethod
    def backward(ctx: Any, out: Tensor) -> tuple[Tensor, None, None, None]:
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("a row-wise loss can be differentiated once (no retain_graph)")
        ctx.grad = None  # scaled in place: the buffer is handed to autograd, not copied
        return grad.mul_(out.to(grad.dtype)).view(ctx.shape), None, None, None


def ce_kernel(x: Tensor, labels: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of rows x [c, V] against labels [c] long (any id where w == 0)."""
    log_p = F.log_softmax(x, dim=-1)
    labels = labels.where(w > 0, 0)[:, None]
    value = -(log_p.gather(1, labels).squeeze(1) * w).sum()
    grad = log_p.exp_()
    grad.scatter_add_(1, labels, torch.full_like(labels, -1, dtype=grad.dtype))
    return value, grad.mul_(w[:, None])


def kd_kernel(tau: float) -> Kernel:
    """tau^2 * KL(softmax(t / tau) || softmax(x / tau)) of rows x [c, V] against teacher rows
    t [c, V]; its gradient tau * (softmax(x / tau) - softmax(t / tau))."""

    def kernel(x: Tensor, t: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        t = t.float().masked_fill((w == 0)[:, None], 0.0)
        log_s = F.log_softmax(x / tau, dim=-1)
        log_t = F.log_softmax(t / tau, dim=-1)
        p_t = log_t.exp()
        value = ((log_t - log_s).mul_(p_t).sum(-1) * w).sum() * tau**2
        grad = log_s.exp_().sub_(p_t).mul_(w[:, None] * tau)
        return value, grad

    return kernel
