"""Fixed-weight fusions: `fixed` (given weights) and `mean` (uniform)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from kvd.core.errors import PlanError
from kvd.fusion.base import Fusion, FusionInput, FusionOutput, normalise


class StaticFusion(Fusion):
    """Constant teacher weights `prior` [N], renormalised over the teachers valid at a position."""

    routes_on_features: ClassVar[bool] = False

    prior: torch.Tensor

    def __init__(self, config: Fusion.Config, weights: list[float], **sizes: Any) -> None:
        super().__init__(config, **sizes)
        if len(weights) != self.n_teachers or min(weights) < 0 or sum(weights) <= 0:
            raise PlanError(
                f"fusion weights {weights} must be {self.n_teachers} non-negative numbers "
                "(one per teacher) with a positive sum"
            )
        self.register_buffer("prior", torch.tensor(weights, dtype=torch.float32))

    def forward(self, inp: FusionInput) -> FusionOutput:
        valid = inp.valid
        weights = normalise(self.prior.to(inp.teacher.dtype).expand(valid.shape), valid)
        return FusionOutput(weights, inp.teacher.new_zeros(()))


class FixedFusion(StaticFusion):
    """Fixed weights: `weights` from the config, else the teachers' spec weights, else uniform."""

    class Config(Fusion.Config):
        """weights: one non-negative weight per teacher; None = the teachers' spec weights."""

        weights: list[float] | None = Field(None, min_length=1)

    def __init__(self, config: Config, **sizes: Any) -> None:
        n = sizes["n_teachers"]
        weights = config.weights or sizes.get("teacher_weights") or [1.0] * n
        super().__init__(config, weights, **sizes)


class MeanFusion(StaticFusion):
    """Uniform weights over the teachers valid at each position."""

    def __init__(self, config: Fusion.Config, **sizes: Any) -> None:
        super().__init__(config, [1.0] * sizes["n_teachers"], **sizes)
