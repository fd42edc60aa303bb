"""The seed's Elastic Bottleneck projector: a small MLP over each token's whole KV vector."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from kvd.core.types import KVShape
from kvd.project.base import Projector, merge_heads, split_heads


class ElasticBottleneckProjector(Projector):
    """LayerNorm(d) -> Linear(d -> mlp_ratio*d) -> SiLU -> Dropout -> Linear(-> d_t), d = Hs*Ds."""

    class Config(Projector.Config):
        mlp_ratio: float = Field(2.0, gt=0)
        """Hidden width as a multiple of the source width."""
        dropout: float = Field(0.1, ge=0, lt=1)
        """Dropout after the SiLU."""

    def __init__(self, config: Config, *, source: KVShape, target: KVShape) -> None:
        super().__init__(config, source=source, target=target)
        hidden = max(1, round(config.mlp_ratio * source.dim))
        self.net = nn.Sequential(
            nn.LayerNorm(source.dim),
            nn.Linear(source.dim, hidden),
            nn.SiLU(),
            nn.Dropout(config.dropout),
            nn.Linear(hidden, target.dim),
        )
        self.hidden = hidden
        self.dropout_p = config.dropout

    def forward(self, x: Tensor) -> Tensor:
        """[B, Hs, T, Ds] -> [B, Ht, T, Dt]."""
        return split_heads(self.net(merge_heads(x)), self.target.heads)

    def describe(self) -> str:
        return (
            f"elastic bottleneck {self.source.dim}->{self.hidden}->{self.target.dim} "
            f"(LayerNorm, SiLU, dropout {self.dropout_p:g})"
        )
