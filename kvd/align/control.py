"""Control aligners for `kvd ab`: alignments that keep the teacher's signal but break its timing.

`shuffled` is the time-shuffled control. It takes the `soft` alignment and permutes, within each
row, which valid student position reads which teacher positions. The teacher KV a student sees
keeps its distribution but loses its correspondence with the text, so a gain that survives the
shuffle does not come from aligned knowledge. It is intentionally NOT causal: a student position
may read teacher positions from later in the text.
"""

from __future__ import annotations

import zlib

import torch

from kvd.align.tokens import SoftTokenAligner
from kvd.core.types import TokenAlignment, TokenBatch


class ShuffledTokenAligner(SoftTokenAligner):
    """The `soft` alignment with each row's valid student positions randomly permuted (a control;
    not causal). The permutation is drawn from `seed` and the student token ids, so a batch always
    gets the same one (a resumed run or an offline teacher cache agrees with a straight run)."""

    class Config(SoftTokenAligner.Config):
        seed: int = 0
        """Seed of the permutations (combined with each batch's student token ids)."""

    config: Config

    def align(self, student: TokenBatch, teacher: TokenBatch) -> TokenAlignment:
        base = super().align(student, teacher)
        ids = student.input_ids.detach().cpu().numpy().tobytes()
        generator = torch.Generator().manual_seed(zlib.crc32(ids, self.config.seed))
        index, weight = base.index.clone(), base.weight.clone()
        for b in range(index.shape[0]):
            rows = base.mask[b].nonzero().squeeze(-1)
            order = torch.randperm(len(rows), generator=generator).to(rows.device)
            index[b, rows] = base.index[b, rows[order]]
            weight[b, rows] = base.weight[b, rows[order]]
        return TokenAlignment(index, weight, base.mask)
