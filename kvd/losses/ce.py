"""The student's own next-token cross-entropy."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from kvd.losses.base import Loss, LossInputs, keep, masked_mean


class CELoss(Loss):
    """Next-token CE: logits at t predict input_ids at t+1, counted where the target token is
    valid. forward(student_logits [B, T, V], input_ids [B, T] long, mask [B, T]) -> scalar,
    mean over the valid targets."""

    inputs: ClassVar[LossInputs] = "ce"

    def forward(self, student_logits: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
        target_mask = mask[:, 1:]
        logits = keep(student_logits[:, :-1].float(), target_mask[..., None])
        ce = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
        return masked_mean(ce, target_mask)
