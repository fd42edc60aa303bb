"""Character-span bookkeeping shared by the token and time aligners.

A *text token* is a real (attention_mask) token that covers text (offsets not (-1, -1)); BOS,
special tokens and padding are not. A position's *horizon* is the furthest character any text
token up to it ends at (running max of end offsets): the text its KV has seen. Horizons never
decrease along a row, so counting the text tokens whose horizon is <= a character position is a
binary search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvd.core.types import TokenBatch

BEYOND = torch.iinfo(torch.long).max
"""A character position after every text (an 'open' bound)."""


@dataclass(frozen=True)
class Spans:
    """Text tokens of one TokenBatch; every tensor is [B, T] long unless noted."""

    text: torch.Tensor
    """[B, T] bool: real tokens that cover text."""
    start: torch.Tensor
    end: torch.Tensor
    horizon: torch.Tensor
    """Running max of `end` over text tokens (-1 before the first one)."""
    before: torch.Tensor
    """[B, T + 1]: number of text tokens before each position (`before[:, T]` = row total)."""

    @classmethod
    def of(cls, batch: TokenBatch, device: torch.device) -> Spans:
        offsets = batch.offsets.to(device=device, dtype=torch.long)
        start, end = offsets[..., 0], offsets[..., 1]
        text = batch.attention_mask.to(device=device, dtype=torch.bool) & (start >= 0)
        horizon = torch.where(text, end, -1).cummax(dim=1).values
        before = torch.nn.functional.pad(text.long().cumsum(dim=1), (1, 0))
        return cls(text, start, end, horizon.contiguous(), before)

    @property
    def length(self) -> torch.Tensor:
        """[B]: text tokens per row."""
        return self.before[:, -1]

    @property
    def extent(self) -> torch.Tensor:
        """[B]: the furthest character covered by a text token of the row (-1 when none)."""
        if not self.horizon.shape[1]:
            return torch.full_like(self.length, -1)
        return self.horizon[:, -1]

    @property
    def rank(self) -> torch.Tensor:
        """[B, T]: index of each position among its row's text tokens."""
        return self.before[:, :-1]

    def position(self, rank: torch.Tensor) -> torch.Tensor:
        """[B, M] text-token ranks -> [B, M] positions of those tokens, clamped into [0, T)."""
        pos = torch.searchsorted(self.before[:, 1:].contiguous(), rank.contiguous() + 1)
        return pos.clamp(max=max(self.text.shape[1] - 1, 0))

    def count_seen(self, chars: torch.Tensor, *, strict: bool = False) -> torch.Tensor:
        """[B, M] character positions -> [B, M] number of text tokens whose horizon is <= each
        (< each when `strict`)."""
        pos = torch.searchsorted(self.horizon, chars.contiguous(), right=not strict)
        return self.before.gather(1, pos)

    def end_piece(self) -> torch.Tensor:
        """[B, T]: for each text token, how many later text tokens share its horizon. Such groups
        are the pieces of one character (a byte-level BPE splits an emoji into pieces that all
        end at the same character) or zero-width tokens at one point; 0 = the last piece."""
        return self.count_seen(self.horizon) - self.rank - 1

    def pieces_through(self, chars: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
        """[B, M] text tokens whose horizon is < `chars`, plus those ending exactly at `chars`
        with at least `later` [B, M] pieces after them (see `end_piece`)."""
        below = self.count_seen(chars, strict=True)
        at = self.count_seen(chars) - below
        return below + (at - later).clamp(min=0)
