"""The whole-vector linear projector: each token's Hs*Ds vector -> Ht*Dt."""

from __future__ import annotations

from torch import Tensor, nn

from kvd.core.types import KVShape
from kvd.project.base import Projector, identity_like_, merge_heads, split_heads


class LinearProjector(Projector):
    """Linear Hs*Ds -> Ht*Dt (with bias) over the concatenated heads of each token; any shapes.

    Init: the identity when the widths match, otherwise variance-preserving semi-orthogonal.
    """

    def __init__(self, config: Projector.Config, *, source: KVShape, target: KVShape) -> None:
        super().__init__(config, source=source, target=target)
        self.linear = nn.Linear(source.dim, target.dim)
        identity_like_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        """[B, Hs, T, Ds] -> [B, Ht, T, Dt]."""
        return split_heads(self.linear(merge_heads(x)), self.target.heads)

    def describe(self) -> str:
        return f"linear {self.source.dim}->{self.target.dim} (whole vector)"
