"""Logit distillation: `logit_kd` for a shared vocabulary, `uld` across vocabularies.

forward(student_logits [B, T, Vs], teacher_logits [B, T, Vt] aligned to student positions,
mask [B, T]) -> scalar, mean over valid positions; computed in float32.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kvd.errors import PlanError
from kvd.losses.base import Loss, LossInputs, keep, masked_mean
from kvd.losses.rowwise import RowTerm, SoftKLRows, rowwise_group


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

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
        term = self.row_term(student_logits, teacher_logits, mask)
        return rowwise_group(student_logits, [term])[0]

    def row_term(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> RowTerm:
        vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
        if vs != vt:
            raise PlanError(
                f"logit_kd needs one vocabulary, but the student has {vs} tokens and the "
                f"teacher {vt}",
                hint="map the teacher's logits onto the student's vocabulary with "
                "`alignment.vocab: {name: first_token}`, or use loss 'uld' (Universal Logit "
                "Distillation), which compares sorted probabilities",
            )
        return RowTerm(SoftKLRows(self.temperature), teacher_logits.detach(), mask.bool())


class ULDLoss(LogitLoss):
    """Universal Logit Distillation (Boizard et al. 2024): both probability vectors sorted in
    descending order, the shorter vocabulary zero-padded, L1 distance per position (the
    Wasserstein-1 distance under ULD's uniform transport cost). Any vocabulary sizes."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
        tau, m = self.temperature, mask[..., None]
        p_s = F.softmax(keep(student_logits.float(), m) / tau, dim=-1)
        p_t = F.softmax(keep(teacher_logits.float(), m) / tau, dim=-1)
        p_s = p_s.sort(dim=-1, descending=True).values
        p_t = p_t.sort(dim=-1, descending=True).values
        width = max(p_s.shape[-1], p_t.shape[-1])
        p_s = F.pad(p_s, (0, width - p_s.shape[-1]))
        p_t = F.pad(p_t, (0, width - p_t.shape[-1]))
        return masked_mean((p_s - p_t).abs().sum(dim=-1), mask)
