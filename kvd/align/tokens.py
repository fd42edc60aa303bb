"""Tokenizer alignment by character offsets: `soft` (IoU-weighted spans) and `hard` (one token).

Causal safety: teacher position j may serve student position i only if the teacher's horizon at
j (the furthest character any of its text tokens up to j ends at) is <= e_i, the end of student
token i; otherwise the student would be taught from text it has not seen. Pieces of one character
(tokens whose horizons coincide, e.g. the byte-level BPE bytes of an emoji) cannot be ordered by
character offsets; they are matched from the end of the character: the student piece with p
pieces still to come may read only the teacher piece with p pieces still to come. So a whole
token reads the teacher's final piece, a student piece never reads a teacher piece that has seen
more of the character, and a tokenizer aligned to itself is the identity.

Every candidate set is built by broadcasting student spans [B, Ts, 1] against teacher spans
[B, 1, Tt]: memory is O(B * Ts * Tt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from kvd.align.base import TokenAligner
from kvd.align.spans import Spans
from kvd.core.component import ComponentConfig
from kvd.core.types import TokenAlignment, TokenBatch

Fallback = Literal["last_causal", "mask"]


class OffsetConfig(ComponentConfig):
    fallback: Fallback = "last_causal"
    """When no causal teacher token overlaps a student token: `last_causal` reads the last teacher
    token ending at or before it (it has seen only text the student has seen, one token earlier
    at most), provided the teacher's text reaches the student token's end (a teacher truncated
    before it has not seen that text); `mask` leaves the position out."""


@dataclass(frozen=True)
class Candidates:
    """Causal teacher candidates of every student position.

    overlap: [B, Ts, Tt] bool, causal teacher tokens sharing characters with the student token
    (only the one with exactly its span, if there is one: tokenizers whose spans overlap, like
    byte-level BPE tokens straddling a character, would otherwise blend neighbours);
    iou: [B, Ts, Tt] float, their intersection over union of character spans (0 elsewhere);
    fallback: [B, Ts] long, the teacher position used when nothing overlaps (-1 = none).
    """

    overlap: torch.Tensor
    iou: torch.Tensor
    fallback: torch.Tensor


def candidates(student: TokenBatch, teacher: TokenBatch, fallback: Fallback) -> Candidates:
    """The causal candidates of `student` [B, Ts] positions among `teacher` [B, Tt] positions."""
    device = student.offsets.device
    s, t = Spans.of(student, device), Spans.of(teacher, device)
    end = s.end[:, :, None]
    horizon = t.horizon[:, None, :]
    same_piece = t.end_piece()[:, None, :] == s.end_piece()[:, :, None]
    served = (horizon < end) | ((horizon == end) & same_piece)
    served &= s.text[:, :, None] & t.text[:, None, :]
    t_start, t_end = t.start[:, None, :], t.end[:, None, :]
    inter = torch.minimum(end, t_end) - torch.maximum(s.start[:, :, None], t_start)
    union = torch.maximum(end, t_end) - torch.minimum(s.start[:, :, None], t_start)
    overlap = served & (inter > 0)
    exact = overlap & (inter == union)
    overlap &= exact | ~exact.any(dim=-1, keepdim=True)
    iou = torch.where(overlap, inter / union.clamp(min=1), 0.0).float()
    allowed = ~overlap.any(dim=-1) & (t.extent[:, None] >= s.end)
    if fallback == "mask":
        allowed = torch.zeros_like(allowed)
    return Candidates(overlap, iou, torch.where(allowed, _last(served), -1))


def _last(which: torch.Tensor) -> torch.Tensor:
    """[B, Ts, Tt] bool -> [B, Ts] long: the last teacher position where True, -1 where none."""
    pos = torch.arange(which.shape[-1], device=which.device)
    return torch.where(which, pos, -1).amax(dim=-1)


def _empty(student: TokenBatch, k: int) -> TokenAlignment:
    """Every position masked (the teacher has no tokens)."""
    b, ts = student.input_ids.shape
    device = student.offsets.device
    return TokenAlignment(
        index=torch.zeros(b, ts, k, dtype=torch.long, device=device),
        weight=torch.zeros(b, ts, k, device=device),
        mask=torch.zeros(b, ts, dtype=torch.bool, device=device),
    )


def next_token_alignment(student: TokenBatch, teacher: TokenBatch) -> TokenAlignment:
    """Each student position reads the teacher token that ends exactly where the student token
    ends (the last such one, with as many pieces of the character still to come), so that both
    predict the token starting at the same character; masked where no teacher token ends there.
    The alignment of next-token distributions (kvd.align.vocab): index/weight [B, Ts, 1]."""
    if teacher.input_ids.shape[1] == 0:
        return _empty(student, 1)
    device = student.offsets.device
    s, t = Spans.of(student, device), Spans.of(teacher, device)
    end = s.end[:, :, None]
    same_piece = t.end_piece()[:, None, :] == s.end_piece()[:, :, None]
    hit = (t.end[:, None, :] == end) & (t.horizon[:, None, :] == end) & same_piece
    hit &= s.text[:, :, None] & t.text[:, None, :]
    last = _last(hit)
    mask = last >= 0
    return TokenAlignment(last.clamp(min=0)[..., None], mask.float()[..., None], mask)


class HardTokenAligner(TokenAligner):
    """Each student token reads one teacher token: the last causal one (K = 1)."""

    Config = OffsetConfig
    config: OffsetConfig

    def align(self, student: TokenBatch, teacher: TokenBatch) -> TokenAlignment:
        """-> index [B, Ts, 1]: the last causal teacher token overlapping the student token, else
        the fallback; weight [B, Ts, 1] is 1 where `mask`."""
        if teacher.input_ids.shape[1] == 0:
            return _empty(student, 1)
        cand = candidates(student, teacher, self.config.fallback)
        last = _last(cand.overlap)
        index = torch.where(last >= 0, last, cand.fallback)
        mask = index >= 0
        return TokenAlignment(index.clamp(min=0)[..., None], mask.float()[..., None], mask)


class SoftTokenAligner(TokenAligner):
    """Each student token reads up to K causal teacher tokens weighted by span IoU."""

    class Config(OffsetConfig):
        max_candidates: int = Field(4, ge=1)
        """K: the teacher tokens kept per student token (highest IoU, then the latest)."""

    config: Config

    def align(self, student: TokenBatch, teacher: TokenBatch) -> TokenAlignment:
        """-> index/weight [B, Ts, K] with K = `max_candidates`; unused slots have index 0 and
        weight 0; a fallback position sits in slot 0 with weight 1."""
        k = self.config.max_candidates
        tt = teacher.input_ids.shape[1]
        if tt == 0:
            return _empty(student, k)
        cand = candidates(student, teacher, self.config.fallback)
        pos = torch.arange(tt, device=cand.iou.device)
        key = torch.where(cand.overlap, (cand.iou * 2**20).round().long() * tt + pos, -1)
        top, index = key.topk(min(k, tt), dim=-1)
        weight = torch.where(top >= 0, cand.iou.gather(-1, index), 0.0)
        use_fallback = (top[..., 0] < 0) & (cand.fallback >= 0)
        index[..., 0] = torch.where(use_fallback, cand.fallback, index[..., 0])
        weight[..., 0] = torch.where(use_fallback, 1.0, weight[..., 0])
        weight = weight / weight.sum(dim=-1, keepdim=True).clamp(min=1e-12)
        index = torch.where(weight > 0, index, 0)
        pad = k - index.shape[-1]
        return TokenAlignment(
            index=torch.nn.functional.pad(index, (0, pad)),
            weight=torch.nn.functional.pad(weight, (0, pad)),
            mask=weight.sum(dim=-1) > 0,
        )
