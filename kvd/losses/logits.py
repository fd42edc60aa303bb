"""Logit distillation: `logit_kd` for a shared vocabulary, `uld` across vocabularies.

forward(student_logits [B, T, Vs], teacher_logits [B, T, Vt] aligned to student positions,
mask [B, T]) -> scalar, mean over valid positions; computed in float32.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kvd.core.errors import PlanError
from kvd.losses.base import Loss, LossInputs
from kvd.losses.rowwise import (
    Rows,
    RowTerm,
    SoftKLRows,
    chunk_rows,
    row_chunks,
    rowwise_group,
)


class TemperatureConfig(Loss.Config):
    """temperature: both distributions are softmax(logits / temperature)."""

    temperature: float = Field(1.0, gt=0)


class LogitLoss(Loss):
    """Base of the logit losses: `inputs` "logits", a temperature."""

    inputs: ClassVar[LossInputs] = "logits"
    Config = TemperatureConfig

    def __init__(self, config: TemperatureConfig) -> None:
        super().__init__(config)
        self.temperature = config.temperature


class LogitKDLoss(LogitLoss):
    """KL(teacher || student) of temperature-softened distributions, times temperature^2;
    requires the same vocabulary size."""

    needs_student_vocab: ClassVar[bool] = True
    reads_logit_rows: ClassVar[bool] = True

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor | Rows, mask: Tensor
    ) -> Tensor:
        term = self.row_term(student_logits, teacher_logits, mask)
        return rowwise_group(student_logits, [term])[0]

    def row_term(
        self, student_logits: Tensor, teacher_logits: Tensor | Rows, mask: Tensor
    ) -> RowTerm:
        vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
        if vs != vt:
            raise PlanError(
                f"logit_kd needs one vocabulary, but the student has {vs} tokens and the "
                f"teacher {vt}",
                hint="map the teacher's logits onto the student's vocabulary with "
                "`alignment.vocab: {name: first_token}`, or use loss 'uld' (Universal Logit "
                "Distillation), which compares sorted probabilities",
            )
        if isinstance(teacher_logits, Tensor):
            teacher_logits = teacher_logits.detach()
        return RowTerm(SoftKLRows(self.temperature), teacher_logits, mask.bool())


class ULDLoss(LogitLoss):
    """Universal Logit Distillation (Boizard et al. 2024): both probability vectors sorted in
    descending order, the shorter vocabulary zero-padded, L1 distance per position (the
    Wasserstein-1 distance under ULD's uniform transport cost). Any vocabulary sizes.

    Computed in chunks of valid rows with its gradient formed in forward, as kvd.losses.rowwise
    does for CE and logit KD: through autograd, the sorts, their int64 indices, the softmaxes,
    casts and pads of every position were each a full [B, T, V] buffer of both vocabularies.
    For a chunk of rows with p = softmax(x / tau) and d = sort(p) - sort(p_t) (padded), the
    loss is sum |d| and its gradient is sign(d) scattered back through sort's permutation
    (g), then through the softmax: (p * (g - <g, p>)) / tau, the same as autograd's. Measured
    on 2 x 64 positions, 49152 student against 151936 teacher tokens, forward and backward:
    peak tensor memory 394 -> 75 MiB, the same time (2.9 s on 2 CPU cores)."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
        value: Tensor = _ULDRows.apply(  # type: ignore[no-untyped-call]
            student_logits, teacher_logits.detach(), mask.bool(), self.temperature
        )  # torch's Function.apply is unannotated
        return value


class _ULDRows(torch.autograd.Function):
    """mean over valid rows of ULD's row loss; student [..., Vs], teacher [..., Vt], mask [...]."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, teacher: Tensor, mask: Tensor, tau: float) -> Tensor:
        vs, vt = logits.shape[-1], teacher.shape[-1]
        flat, t_flat, valid = logits.reshape(-1, vs), teacher.reshape(-1, vt), mask.reshape(-1)
        count = valid.sum().clamp_min(1)
        grad = torch.empty_like(flat)
        total = flat.new_zeros((), dtype=torch.float32)
        width = max(vs, vt)
        step = chunk_rows(logits.device, width)
        for rows, _ in row_chunks(valid, None, step, grad):
            p = torch.softmax(flat[rows].float() / tau, dim=-1)
            p_sorted, order = p.sort(dim=-1, descending=True)
            q_sorted = torch.softmax(t_flat[rows].float() / tau, dim=-1)
            q_sorted = q_sorted.sort(dim=-1, descending=True).values
            d = F.pad(p_sorted, (0, width - vs)) - F.pad(q_sorted, (0, width - vt))
            total += d.abs().sum()
            g = torch.empty_like(p).scatter_(1, order, d[:, :vs].sign())
            g -= (g * p).sum(-1, keepdim=True)
            grad[rows] = (g.mul_(p) / (tau * count)).to(grad.dtype)
        ctx.grad, ctx.shape = grad, logits.shape
        return total / count

    @staticmethod
    def backward(ctx: Any, out: Tensor) -> tuple[Tensor, None, None, None]:
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("uld can be differentiated once (no retain_graph)")
        ctx.grad = None
        return grad.mul_(out.to(grad.dtype)).view(ctx.shape), None, None, None
