"""Attention-relation KL (MiniLMv2-style): compares token-token relations, so the teacher and
the student keep their own KV geometry and need no projector."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from kvd.core.errors import PlanError
from kvd.core.types import KVShape
from kvd.losses.base import Loss, LossInputs, keep, masked_mean
from kvd.project.base import merge_heads, shape_text, split_heads


class RelationKLLoss(Loss):
    """KL(teacher || student) of K-K and V-V self-relations, averaged over the two.

    Each token's K (or V) heads are concatenated into one H*D vector and split into
    `relation_heads` R chunks of d_r = H*D / R, so the loss is independent of the head count;
    relations per chunk are softmax_j(x_i . x_j / sqrt(d_r)) over keys j <= i that are valid.
    KL per query row, mean over valid query positions and chunks.
    forward(student_k, student_v [B, Hs, T, Ds], teacher_k, teacher_v [B, Ht, T, Dt],
    mask [B, T]) -> scalar.
    """

    inputs: ClassVar[LossInputs] = "kv_raw"

    class Config(Loss.Config):
        """relation_heads: R, must divide both sides' heads * head_dim."""

        relation_heads: int = Field(4, ge=1)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.relation_heads = config.relation_heads

    def check(self, student: KVShape, teacher: KVShape) -> None:
        """Raise PlanError unless R divides both widths."""
        bad = [s for s in (student, teacher) if s.dim % self.relation_heads]
        if bad:
            widths = ", ".join(f"{shape_text(s)} = {s.dim}" for s in bad)
            raise PlanError(
                f"relation_kl: relation_heads={self.relation_heads} does not divide the KV "
                f"width ({widths})",
                hint="pick relation_heads dividing heads * head_dim of the student and teachers",
            )

    def relations(self, x: Tensor, allowed: Tensor) -> Tensor:
        """x [B, H, T, D], allowed [B, 1, T, T] -> log relations [B, R, T, T]."""
        chunks = split_heads(merge_heads(x), self.relation_heads)  # [B, R, T, d_r]
        scores: Tensor = chunks @ chunks.transpose(-1, -2) / chunks.shape[-1] ** 0.5
        scores = scores.float().masked_fill(~allowed, torch.finfo(torch.float32).min)
        return scores.log_softmax(dim=-1)

    def forward(
        self,
        student_k: Tensor,
        student_v: Tensor,
        teacher_k: Tensor,
        teacher_v: Tensor,
        mask: Tensor,
    ) -> Tensor:
        _, hs, t, ds = student_k.shape
        self.check(KVShape(hs, ds), KVShape(teacher_k.shape[1], teacher_k.shape[3]))
        eye = torch.eye(t, dtype=torch.bool, device=mask.device)
        causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
        allowed = ((causal & mask[:, None, :]) | eye)[:, None]  # [B, 1, T(query), T(key)]
        total = student_k.new_zeros(())
        m = mask[:, None, :, None]
        for student, teacher in ((student_k, teacher_k), (student_v, teacher_v)):
            log_s = self.relations(keep(student, m), allowed)
            log_t = self.relations(keep(teacher, m), allowed)
            kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)  # [B, R, T]
            total = total + masked_mean(kl, mask[:, None, :])
        return total / 2
