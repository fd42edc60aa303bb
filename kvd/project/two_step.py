"""The seed's two-step KV projector: head_dim linear first, then KV-head mixing (the default)."""

from __future__ import annotations

from torch import Tensor

from kvd.core.types import KVShape
from kvd.project.base import Projector
from kvd.project.head_dim import HeadDimProjector
from kvd.project.heads import HeadsProjector


class HeadDimThenHeadsProjector(Projector):
    """head_dim Linear Ds -> Dt on each of the Hs heads, then head mixing Hs -> Ht; any shapes."""

    def __init__(self, config: Projector.Config, *, source: KVShape, target: KVShape) -> None:
        super().__init__(config, source=source, target=target)
        middle = KVShape(source.heads, target.head_dim)
        self.head_dim = HeadDimProjector(config, source=source, target=middle)
        self.heads = HeadsProjector(config, source=middle, target=target)

    def forward(self, x: Tensor) -> Tensor:
        """[B, Hs, T, Ds] -> [B, Hs, T, Dt] -> [B, Ht, T, Dt]."""
        out: Tensor = self.heads(self.head_dim(x))
        return out

    def describe(self) -> str:
        return f"{self.head_dim.describe()}; {self.heads.describe()}"
