"""The student's own next-token cross-entropy."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from kvd.losses.base import Loss, LossInputs
from kvd.losses.rowwise import CrossEntropyRows, RowTerm, rowwise_group


class CELoss(Loss):
    """Next-token CE: logits at t predict input_ids at t+1, counted where the target token is
    valid. forward(student_logits [B, T, V], input_ids [B, T] long, mask [B, T]) -> scalar,
    mean over the valid targets."""

    inputs: ClassVar[LossInputs] = "ce"

    def forward(self, student_logits: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
        return rowwise_group(student_logits, [self.row_term(student_logits, input_ids, mask)])[0]

    def row_term(self, student_logits: Tensor, input_ids: Tensor, mask: Tensor) -> RowTerm:
        valid = F.pad(mask[:, 1:].bool(), (0, 1), value=False)  # [B, T]: row t predicts t+1
        return RowTerm(CrossEntropyRows(), F.pad(input_ids[:, 1:], (0, 1)), valid)
