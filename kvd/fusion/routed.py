"""Routed fusions: weights are a masked softmax of per-position logits, with an optional entropy
regulariser on the routing distribution."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import Tensor

from kvd.fusion.base import (
    Fusion,
    FusionInput,
    FusionOutput,
    masked_softmax,
    routing_entropy,
)


class RouterConfig(Fusion.Config):
    """entropy_weight: strength of the routing-entropy regulariser (0 = off); entropy_target:
    "diverse" maximises the entropy (aux = -weight * H), "specialized" minimises it
    (aux = +weight * H); H is the mean entropy in nats over positions with a valid teacher."""

    entropy_weight: float = Field(0.0, ge=0)
    entropy_target: Literal["diverse", "specialized"] = "diverse"


class RoutedFusion(Fusion):
    """Base of the routers: `logits(inp) -> [B, T, N]`, softmax over valid teachers, then
    `select` (identity here; top-k in `topk`). The entropy term is taken before `select`."""

    def __init__(self, config: RouterConfig, **sizes: Any) -> None:
        super().__init__(config, **sizes)
        sign = -1.0 if config.entropy_target == "diverse" else 1.0
        self.entropy_scale = sign * config.entropy_weight

    def logits(self, inp: FusionInput) -> Tensor:
        """Routing logits [B, T, N] (invalid teachers are masked afterwards)."""
        raise NotImplementedError

    def select(self, probs: Tensor, valid: Tensor) -> Tensor:
        """Final weights [B, T, N] from the routing distribution."""
        return probs

    def forward(self, inp: FusionInput) -> FusionOutput:
        valid = inp.valid
        probs = masked_softmax(self.logits(inp), valid)
        if self.entropy_scale:
            aux = self.entropy_scale * routing_entropy(probs, valid)
        else:
            aux = probs.new_zeros(())
        return FusionOutput(self.select(probs, valid), aux)
