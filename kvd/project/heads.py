"""The KV-head mixing projector Hs -> Ht (the seed's GQA fix, e.g. 12 -> 2 KV heads)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kvd.core.types import KVShape
from kvd.project.base import Projector


def overlap_mixing(source_heads: int, target_heads: int) -> Tensor:
    """Init of the mixing matrix [Ht, Hs]: lay both head ranges over [0, 1); target head j is
    the mean of the source heads its interval overlaps, weighted by overlap (rows sum to 1).

    That is exactly the group mean when Hs % Ht == 0 (target j = mean of source heads
    j*g .. j*g+g-1, g = Hs/Ht, the way GQA groups heads), replication when Ht % Hs == 0
    (target j = source j // (Ht/Hs), like `repeat_kv`), the identity when Hs == Ht, and an
    overlap-weighted mean otherwise (3 -> 2: [[2/3, 1/3, 0], [0, 1/3, 2/3]]).
    """
    src = torch.arange(source_heads + 1, dtype=torch.float64) / source_heads
    tgt = torch.arange(target_heads + 1, dtype=torch.float64) / target_heads
    lo = torch.maximum(tgt[:-1, None], src[None, :-1])
    hi = torch.minimum(tgt[1:, None], src[None, 1:])
    return ((hi - lo).clamp_min(0) * target_heads).float()


def init_kind(source_heads: int, target_heads: int) -> str:
    """Name of the init `overlap_mixing` amounts to, for reports."""
    if source_heads == target_heads:
        return "identity"
    if source_heads % target_heads == 0:
        return "group-mean"
    if target_heads % source_heads == 0:
        return "replication"
    return "overlap-mean (learned)"


class HeadsProjector(Projector):
    """Learned mixing of KV heads, out[:, j] = sum_i W[j, i] x[:, i]; requires equal head_dim.

    W [Ht, Hs] starts from `overlap_mixing` (group mean, replication or overlap mean) and is
    trained like any other weight.
    """

    def __init__(self, config: Projector.Config, *, source: KVShape, target: KVShape) -> None:
        super().__init__(config, source=source, target=target)
        if source.head_dim != target.head_dim:
            raise self._plan_error("heads", "equal head_dim")
        self.mixing = nn.Parameter(overlap_mixing(source.heads, target.heads))

    def forward(self, x: Tensor) -> Tensor:
        """[B, Hs, T, D] -> [B, Ht, T, D]."""
        return torch.einsum("ji,bitd->bjtd", self.mixing, x)

    def describe(self) -> str:
        s, t = self.source.heads, self.target.heads
        return f"heads {s}->{t} mixing ({init_kind(s, t)} init)"
