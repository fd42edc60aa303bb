"""Time resampling: linear maps between student and teacher positions by token counts.

`resample` is the safe global resampler: each row's Ls student text tokens are mapped onto its Lt
teacher text tokens with integer arithmetic (long indices, clamped into range, built on the
student's device), so T=0, T=1, empty rows and Tt<Ts or Tt>Ts cannot index out of bounds.
`segment_resample` cuts the text at the characters where both tokenizations end a token and
resamples linearly inside each segment. Text tokens exclude BOS, special tokens and padding on
both sides (a BOS on one side only does not shift the map); student positions that are not text
tokens are masked.
"""

from __future__ import annotations

import torch

from kvd.align.base import TokenAligner
from kvd.align.spans import BEYOND, Spans
from kvd.core.component import ComponentConfig
from kvd.core.types import TokenAlignment, TokenBatch


def linear_index(
    rank: torch.Tensor, n_src: torch.Tensor, n_dst: torch.Tensor, *, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map source ranks onto [0, n_dst) (all long, broadcastable) -> (index, valid).

    causal: index = floor((rank + 1) * n_dst / n_src) - 1, the last destination whose share of
    the sequence, (index + 1) / n_dst, does not exceed the source's, (rank + 1) / n_src; ranks
    before the first such destination are invalid. Otherwise the endpoints are matched:
    index = round(rank * (n_dst - 1) / (n_src - 1)) (n_src = 1 -> the last destination).
    `valid` is also False for ranks outside [0, n_src) and when n_dst = 0; `index` is always
    clamped into [0, max(n_dst - 1, 0)].
    """
    if causal:
        index = _floor_map(rank, n_src, n_dst)
        valid = index >= 0
    else:
        span = (n_src - 1).clamp(min=1)
        index = torch.where(n_src > 1, (2 * rank * (n_dst - 1) + span) // (2 * span), n_dst - 1)
        valid = torch.ones_like(index, dtype=torch.bool)
    valid = valid & (rank >= 0) & (rank < n_src) & (n_dst > 0)
    index = torch.minimum(index.clamp(min=0), (n_dst - 1).clamp(min=0))
    return index, valid


def _floor_map(rank: torch.Tensor, n_src: torch.Tensor, n_dst: torch.Tensor) -> torch.Tensor:
    """floor((rank + 1) * n_dst / n_src) - 1 in integers (-1 = before the first destination)."""
    return (rank + 1) * n_dst // n_src.clamp(min=1) - 1


class TimeConfig(ComponentConfig):
    causal: bool = True
    """Floor mapping: a student position never reads a teacher position proportionally later
    than itself; False matches first to first and last to last (round to nearest)."""


def _alignment(index: torch.Tensor, mask: torch.Tensor) -> TokenAlignment:
    """[B, Ts] teacher positions and mask -> a K = 1 alignment (index 0 where masked)."""
    index = torch.where(mask, index, 0)
    return TokenAlignment(index[..., None], mask.float()[..., None], mask)


class ResampleAligner(TokenAligner):
    """Safe global time resampling by token counts (no character offsets used)."""

    Config = TimeConfig
    config: TimeConfig

    def align(self, student: TokenBatch, teacher: TokenBatch) -> TokenAlignment:
        """-> index/weight [B, Ts, 1]: student text token r of Ls reads teacher text token
        `linear_index(r, Ls, Lt)` of its row. Not character-causal: use `soft`, `hard` or
        `segment_resample` for that."""
        device = student.offsets.device
        s, t = Spans.of(student, device), Spans.of(teacher, device)
        rank, valid = linear_index(
            s.rank, s.length[:, None], t.length[:, None], causal=self.config.causal
        )
        return _alignment(t.position(rank), s.text & valid)


def _segments(s: Spans, t: Spans) -> tuple[torch.Tensor, ...]:
    """Per student position [B, Ts]: text tokens of earlier segments (student, teacher) and of its
    own segment (student, teacher). Segments end at common boundaries: characters where a student
    and a teacher text token both end (horizons); the last segment runs to the end of the text."""
    horizon = s.horizon
    common = s.text & (t.count_seen(horizon) > t.count_seen(horizon, strict=True))
    # the last common boundary before the student token's own group of pieces, or -1
    marks = torch.where(common, horizon, -1).cummax(dim=1).values
    marks = torch.nn.functional.pad(marks, (1, 0), value=-1)
    prev = marks.gather(1, torch.searchsorted(horizon, horizon))
    # the first common boundary at or after the student token, or beyond the text
    nxt = torch.where(common, horizon, BEYOND).flip(1).cummin(dim=1).values.flip(1)
    s_done, t_done = s.count_seen(prev), t.count_seen(prev)
    return s_done, t_done, s.count_seen(nxt) - s_done, t.count_seen(nxt) - t_done


class SegmentResampleAligner(TokenAligner):
    """Time resampling inside segments cut where both tokenizations end a token.

    With `causal` the map is also capped at the last teacher token ending at or before the
    student token, so every pair is character-causal as in `soft` and `hard`.
    """

    Config = TimeConfig
    config: TimeConfig

    def align(self, student: TokenBatch, teacher: TokenBatch) -> TokenAlignment:
        """-> index/weight [B, Ts, 1]. Student token r of a segment with ns student and nt teacher
        text tokens reads the segment's teacher token `linear_index(r, ns, nt)`; in causal mode an
        index of -1 reads the previous segment's last teacher token (it ends at the boundary).
        Positions ending beyond the teacher's text (a truncated teacher) are masked."""
        device = student.offsets.device
        s, t = Spans.of(student, device), Spans.of(teacher, device)
        s_done, t_done, n_s, n_t = _segments(s, t)
        local = s.rank - s_done
        if self.config.causal:
            rank = t_done + _floor_map(local, n_s, n_t)
            rank = torch.minimum(rank, t.pieces_through(s.end, s.end_piece()) - 1)
            valid = rank >= 0
        else:
            offset, valid = linear_index(local, n_s, n_t, causal=False)
            rank = t_done + offset
        valid &= t.extent[:, None] >= s.end
        return _alignment(t.position(rank.clamp(min=0)), s.text & valid)
