"""Dynamic selection by teacher quality: the teacher with the lowest CE on each sequence."""

from __future__ import annotations

from typing import ClassVar

import torch

from kvd.core.errors import PlanError
from kvd.fusion.base import Fusion, FusionInput, FusionOutput


class LowestCEFusion(Fusion):
    """Per sequence, weight 1 on the teacher with the lowest `teacher_ce` at every position
    where it is valid; where it is masked, the next-lowest valid teacher (ties: lower index).
    No parameters."""

    routes_on_features: ClassVar[bool] = False
    needs_teacher_ce: ClassVar[bool] = True

    def forward(self, inp: FusionInput) -> FusionOutput:
        if inp.teacher_ce is None:
            raise PlanError("lowest_ce fusion needs each teacher's per-sequence CE (teacher_ce)")
        valid = inp.valid  # [B, T, N]
        rank = inp.teacher_ce.T.argsort(dim=-1, stable=True).argsort(dim=-1)  # [B, N], 0 = best
        rank = rank[:, None, :].expand(valid.shape).masked_fill(~valid, self.n_teachers)
        best = rank.argmin(dim=-1, keepdim=True)
        weights = torch.zeros(valid.shape, dtype=inp.teacher.dtype, device=valid.device)
        weights.scatter_(-1, best, 1.0)
        weights = weights * valid.any(dim=-1, keepdim=True)
        return FusionOutput(weights, inp.teacher.new_zeros(()))
