"""Vocabulary-wide losses (CE, logit KD) computed in chunks of rows, with their gradient.

Logits [B, T, V] are the largest tensors of a step (V = 49152..262144). Through autograd, a
softmax loss keeps its log-softmax output for backward, allocates a gradient of the same size
there, and every intermediate op (cast, division, subtraction) is one more [B, T, V] buffer.
Here the forward pass walks the rows in chunks that fit in cache and forms each loss's gradient
d loss / d logits in closed form: tau * (softmax(x / tau) - p) for a target distribution p
(onehot(label) for CE, the teacher's softmax for logit KD). All losses of a group with the same
tau share the student's softmax, computed once per chunk straight into one preallocated
gradient buffer; each loss then subtracts its weighted p. Backward only scales that buffer.
One [B, T, V] buffer for CE and logit KD together, no full-size temporaries.

Kernels work row by row, so whatever an invalid row holds (even NaN) stays in that row, which
is left out of the sum and zeroed in the gradient: it reaches neither the value nor the
gradient; rows no term counts (padding) are not visited at all. Measured on [8, 128, 49152]
float32 logits with 835 real tokens, 2 CPU cores, forward + backward: CE 0.012 s (torch's
cross_entropy on the same view 0.044 s; the boolean-indexed rows this replaced 0.17 s); logit
KD 0.038 s on its own (autograd over log_softmax 0.11 s), less in a group with CE, whose
softmax it shares (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


class RowKernel(Protocol):
    """A loss of one row of student logits x, compared as q = softmax(x / tau), against its
    target distribution p: the row loss is tau^2 * (H(p, q) - H(p)) and its gradient with
    respect to x is tau * (q - p), so every kernel of a group with the same tau shares q."""

    tau: float

    def __call__(
        self, xs: Tensor, lse: Tensor, target: Tensor, acc: Tensor, coef: Tensor, /
    ) -> Tensor:
        """xs = x / tau [c, V] float32 and lse = logsumexp(xs) [c] (read-only), target rows
        [c, ...], acc [c, V] float32 and coef [c] -> the loss of each row [c], after
        subtracting coef * p from acc (p = the target distribution of each row; rows whose
        coef is 0 may hold anything, even NaN, and must add nothing). Row by row only."""
        ...


CHUNK_ELEMENTS = {"cpu": 2**21, "cuda": 2**27}
"""Elements per chunk: 8 MiB of float32 on CPU (a chunk and its temporaries stay near the
last-level cache; 2**21 was fastest of 2**18..2**22 measured), 512 MiB on CUDA (few launches)."""


def chunk_rows(device: torch.device, width: int) -> int:
    """Rows of `width` elements per chunk on `device` (CHUNK_ELEMENTS' worth, at least one)."""
    return max(1, CHUNK_ELEMENTS.get(device.type, 2**22) // width)


class Rows(Protocol):
    """Target rows [..., V] made on demand (a teacher's logits from its hidden states:
    kvd.modeling.head.HeadRows): `shape` as the tensor's, and `rows[a:b]` -> [b - a, V], rows
    a..b-1 of the flattened leading dims."""

    @property
    def shape(self) -> torch.Size: ...

    def __getitem__(self, rows: slice, /) -> Tensor: ...


@dataclass
class RowTerm:
    """One row-wise loss on a logits tensor: its kernel, targets [..., *] (rows matching the
    logits' leading dims, or the rows `index` names: `rowwise_group`; a tensor, or Rows made a
    chunk at a time), valid [...] bool rows, and its weight in a group's total."""

    kernel: RowKernel
    targets: Tensor | Rows
    valid: Tensor
    weight: float = 1.0


def rowwise_group(
    logits: Tensor, terms: list[RowTerm], index: Tensor | None = None
) -> tuple[Tensor, list[Tensor]]:
    """sum_k weight_k * mean_k for several row-wise losses on the same logits [..., V], as one
    differentiable scalar, and each mean_k (detached).

    With `index` [N] long, logits [N, V] are rows index[n] of the terms' flattened rows
    (logits computed at the N real tokens only: kvd.modeling.capture `rows`); index must increase.

    One pass over the rows and one gradient buffer for the whole group: the weighted gradients
    are summed chunk by chunk in forward, where autograd would keep a buffer per loss and add
    them in backward."""
    outputs: tuple[Tensor, ...] = _Rowwise.apply(  # type: ignore[no-untyped-call]
        logits, terms, index
    )  # torch's Function.apply is unannotated
    total, *means = outputs
    return total, means


class _Rowwise(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, terms: list[RowTerm], index: Tensor | None
    ) -> tuple[Tensor, ...]:
        v = logits.shape[-1]
        flat = logits.reshape(-1, v)
        rows_of: list[tuple[Tensor | Rows, Tensor]] = []  # per term: targets, valid [R] by flat row
        for term in terms:
            valid = term.valid.reshape(-1)
            targets = term.targets
            if isinstance(targets, Tensor):
                targets = targets.reshape(valid.shape[0], *targets.shape[term.valid.dim() :])
            rows_of.append((targets, valid))
        valids = [valid if index is None else valid[index] for _, valid in rows_of]
        counts = [valid.sum().clamp_min(1) for valid in valids]
        # d total / d x of term k on a valid row: weight_k * tau_k * (q - p) / n_k
        scales = [t.weight * t.kernel.tau / n for t, n in zip(terms, counts, strict=True)]
        taus = sorted({t.kernel.tau for t in terms})
        grad = torch.empty_like(flat)
        direct = grad.dtype == torch.float32  # else each chunk is computed in float32, then cast
        sums = [flat.new_zeros((), dtype=torch.float32) for _ in terms]
        step = chunk_rows(logits.device, v)
        for rows, source in row_chunks(torch.stack(valids).any(0), index, step, grad):
            x = flat[rows].float()
            acc = grad[rows] if direct else torch.empty_like(x)
            for i, tau in enumerate(taus):
                ks = [k for k, t in enumerate(terms) if t.kernel.tau == tau]
                coefs = {k: valids[k][rows] * scales[k] for k in ks}
                xs = x / tau if tau != 1.0 else x
                q = acc if i == 0 else torch.empty_like(x)
                lse = softmax_lse(xs, q)  # shared by every term with this tau
                q.mul_(torch.stack(list(coefs.values())).sum(0)[:, None])  # sum_k coef_k * q
                for k in ks:
                    loss = terms[k].kernel(xs, lse, rows_of[k][0][source], q, coefs[k])
                    sums[k] += torch.where(valids[k][rows], loss, 0.0).sum()
                if i:
                    acc.add_(q)
            if not direct:
                grad[rows] = acc
        means = [s / n for s, n in zip(sums, counts, strict=True)]
        ctx.grad = grad
        ctx.shape = logits.shape
        total = sum((t.weight * m for t, m in zip(terms, means, strict=True)), sums[0] * 0)
        detached = [m.detach() for m in means]
        ctx.mark_non_differentiable(*detached)
        return (total, *detached)

    @staticmethod
    def backward(ctx: Any, out: Tensor, *_: Tensor) -> tuple[Tensor, None, None]:
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("a row-wise loss can be differentiated once (no retain_graph)")
        ctx.grad = None  # scaled in place: the buffer is handed to autograd, not copied
        return grad.mul_(out.to(grad.dtype)).view(ctx.shape), None, None


def row_chunks(
    counted: Tensor, index: Tensor | None, step: int, grad: Tensor
) -> list[tuple[slice, slice]]:
    """(logits rows, target rows) slices of at most `step` rows covering the runs of rows some
    term counts, counted [N] bool; a run is also cut where `index` jumps, so that its target
    rows are one slice too. The other rows of grad [N, V] are zeroed here and never read (the
    padding of a batch costs nothing)."""
    flags = counted.to(torch.int8)
    edges = torch.diff(flags, prepend=flags.new_zeros(1), append=flags.new_zeros(1))
    cuts = set((edges != 0).nonzero().squeeze(1).tolist())
    if index is not None:
        cuts |= set(((index[1:] - index[:-1]) != 1).nonzero().squeeze(1).add(1).tolist())
    bounds = sorted(cuts | {0, len(counted)})
    firsts = counted[bounds[:-1]].tolist() if len(counted) else []
    sources = index[bounds[:-1]].tolist() if index is not None and len(counted) else bounds
    out: list[tuple[slice, slice]] = []
    for start, end, counts, source in zip(bounds, bounds[1:], firsts, sources, strict=False):
        if not counts:
            grad[start:end].zero_()
            continue
        for first in range(start, end, step):
            last = min(first + step, end)
            at = source + first - start
            out.append((slice(first, last), slice(at, at + last - first)))
    return out


PROBE_FLOOR = 1e-30
"""Smallest softmax value whose log `softmax_lse` trusts: exp(x - lse) is then a normal float32,
accurate to a few ulp, so log(softmax) is accurate to ~1e-7 absolute."""


def softmax_lse(x: Tensor, out: Tensor) -> Tensor:
    """softmax(x) of rows x [c, V] into `out`, returning logsumexp(x) [c] without another pass
    over the rows: softmax(x)_j = exp(x_j - lse) for every j, so lse = x_0 - log(softmax(x)_0),
    read off the first column. Where that value is below PROBE_FLOOR (x_0 far below the rest,
    or -inf) the chunk takes the row maximum m instead, where the softmax is largest (>= 1/V):
    lse = m - log(max softmax), two more passes (`amax`: 10x faster on CPU than `max`). On the
    CPU the check is one host read; on an accelerator, where a read would stall the queue for
    every chunk, both forms are computed and chosen row by row (lse_by_rows)."""
    torch.softmax(x, dim=-1, out=out)
    if x.device.type != "cpu":
        return lse_by_rows(x, out)
    probe = out[:, 0]
    if bool((probe >= PROBE_FLOOR).all()):
        return x[:, 0] - probe.log()
    return x.amax(dim=-1) - out.amax(dim=-1).log()


def lse_by_rows(x: Tensor, softmax: Tensor) -> Tensor:
    """logsumexp(x) [c] from rows x [c, V] and their softmax, without reading a value on the
    host: the first-column form where its probe is trusted, the row-maximum form elsewhere."""
    probe = softmax[:, 0]
    first = x[:, 0] - probe.log()
    return torch.where(probe >= PROBE_FLOOR, first, x.amax(dim=-1) - softmax.amax(dim=-1).log())


class CrossEntropyRows:
    """Cross-entropy of each row against a label [c] long (any id on invalid rows):
    logsumexp(x) - x[label]; its target distribution is onehot(label)."""

    tau = 1.0

    def __call__(
        self, xs: Tensor, lse: Tensor, labels: Tensor, acc: Tensor, coef: Tensor
    ) -> Tensor:
        labels = labels.clamp(0, xs.shape[-1] - 1)[:, None]
        acc.scatter_add_(1, labels, -coef[:, None].to(acc.dtype))
        return lse - xs.gather(1, labels).squeeze(1)


class SoftKLRows:
    """tau^2 * KL(softmax(t / tau) || softmax(x / tau)) of each row against teacher logits t
    [c, V]: with p = softmax(t / tau), KL = sum p (t - x) / tau - lse(t / tau) + lse(x / tau),
    one dot product and the teacher's softmax; the student's is shared by the group."""

    def __init__(self, tau: float) -> None:
        self.tau = tau

    def __call__(self, xs: Tensor, lse: Tensor, t: Tensor, acc: Tensor, coef: Tensor) -> Tensor:
        d = t.to(torch.float32, copy=True)  # becomes t/tau - x/tau in place below
        if self.tau != 1.0:
            d.div_(self.tau)
        p = torch.empty_like(d)
        lse_t = softmax_lse(d, p)
        left_out = (coef == 0).nonzero().squeeze(1)
        if len(left_out):  # such a row may hold NaN: it must not reach acc
            p.index_fill_(0, left_out, 0.0)
        kl = torch.linalg.vecdot(p, d.sub_(xs)) - lse_t + lse
        acc.addcmul_(p, coef[:, None], value=-1.0)
        out: Tensor = kl * self.tau**2
        return out
