"""The head_dim projector: one Linear Ds -> Dt shared by every KV head."""

from __future__ import annotations

from torch import Tensor, nn

from kvd.core.types import KVShape
from kvd.project.base import Projector, identity_like_


class HeadDimProjector(Projector):
    """Per-head Linear Ds -> Dt (no bias) shared across heads; requires equal head counts.

    Init: the identity when Ds == Dt, otherwise variance-preserving semi-orthogonal.
    """

    def __init__(self, config: Projector.Config, *, source: KVShape, target: KVShape) -> None:
        super().__init__(config, source=source, target=target)
        if source.heads != target.heads:
            raise self._plan_error("head_dim", "equal KV head counts")
        self.linear = nn.Linear(source.head_dim, target.head_dim, bias=False)
        identity_like_(self.linear.weight)

    def forward(self, x: Tensor) -> Tensor:
        """[B, H, T, Ds] -> [B, H, T, Dt]."""
        out: Tensor = self.linear(x)
        return out

    def describe(self) -> str:
        s, t = self.source.head_dim, self.target.head_dim
        init = "identity" if s == t else "orthogonal"
        return f"head_dim {s}->{t} linear ({init} init)"
