"""The identity projector, for teacher and student KV of the same shape."""

from __future__ import annotations

from torch import Tensor

from kvd.core.types import KVShape
from kvd.project.base import Projector, shape_text


class IdentityProjector(Projector):
    """No projection: requires equal source and target shapes."""

    def __init__(self, config: Projector.Config, *, source: KVShape, target: KVShape) -> None:
        super().__init__(config, source=source, target=target)
        if source != target:
            raise self._plan_error("identity", "equal KV shapes")

    def forward(self, x: Tensor) -> Tensor:
        """[B, H, T, D] -> the same tensor."""
        return x

    def describe(self) -> str:
        return f"identity {shape_text(self.source)}"
