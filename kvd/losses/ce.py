"""The student's own next-token cross-entropy."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from kvd.losses.base import Loss, LossInputs


class CELoss(Loss):
    """Next-token CE: logits at t predict input_ids at t+1, counted where the target token is
    valid. forward(student_logits [B, T, V], input_ids [B, T] long, mask [B, T]) -> scalar,
    mean over the valid targets."""

    inputs: ClassVar[LossInputs] = "ce"

    def forward(self, student_logits: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
        valid = mask[:, 1:].bool()
        if not valid.any():
            return student_logits.sum() * 0.0
        # only the valid rows [N, V]: vocabulary-wide work is the cost of this loss
        return F.cross_entropy(student_logits[:, :-1][valid].float(), input_ids[:, 1:][valid])
