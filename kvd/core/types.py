"""Data passed between the stages of a distillation step. Shapes use:
B batch, T tokens (Tt teacher, Ts student), H KV heads, D head_dim, L layers, K candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class KVShape:
    """KV geometry of one layer: `heads` KV heads (num_key_value_heads) of `head_dim` each."""

    heads: int
    head_dim: int

    @property
    def dim(self) -> int:
        """Width of one token's K (or V) across heads: heads * head_dim."""
        return self.heads * self.head_dim


@dataclass
class TokenBatch:
    """One tokenizer's view of a batch of texts.

    input_ids: [B, T] long; attention_mask: [B, T] bool (True = real token, padding is False);
    offsets: [B, T, 2] long character span [start, end) in the text, (-1, -1) for tokens that
    cover no text (BOS, special tokens, padding).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    offsets: torch.Tensor


@dataclass
class TokenAlignment:
    """Where each student position reads its teacher positions from.

    index: [B, Ts, K] long, teacher positions in [0, Tt); weight: [B, Ts, K] float, summing to 1
    over K where `mask` is True and 0 elsewhere; mask: [B, Ts] bool, False where no causally valid
    teacher token exists (those positions are left out of every loss, never filled).
    """

    index: torch.Tensor
    weight: torch.Tensor
    mask: torch.Tensor
    _maps: dict[tuple[int, torch.dtype, torch.device], torch.Tensor | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )  # gather's dense maps (None: the map only keeps rows), built once per Tt, dtype, device
    _host: TokenAlignment | None = field(default=None, init=False, repr=False, compare=False)

    def to(self, device: torch.device) -> TokenAlignment:
        """This alignment with index and weight on `device`; gather decides whether the map
        only keeps rows from this (host) copy, so a GPU step waits for no device read."""
        moved = TokenAlignment(self.index.to(device), self.weight.to(device), self.mask)
        moved._host = self._host or self
        return moved

    def matrix(self, tt: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The alignment as a dense map [B, Ts, Tt]: row s holds the weights of its teacher
        positions (all zero where masked)."""
        b, ts, _ = self.index.shape
        out = torch.zeros(b, ts, max(tt, 1), dtype=dtype, device=self.index.device)
        out.scatter_add_(2, self.index.clamp(0, max(tt - 1, 0)), self.weight.to(dtype))
        return out[:, :, :tt]

    def keeps_rows(self, tt: int) -> bool:
        """Whether matrix(tt) is the identity on some rows and zero elsewhere (each student
        position reads its own teacher position with weight 1, or nothing): a teacher sharing
        the student's tokenizer. Weights are non-negative."""
        _, ts, _ = self.index.shape
        if ts > tt:
            return False
        index = self.index.clamp(0, max(tt - 1, 0))
        own = index == torch.arange(ts, device=index.device)[None, :, None]
        diag = (self.weight * own).sum(dim=-1)
        return bool(((diag == 0) | (diag == 1)).all()) and not bool((self.weight * ~own).any())

    def selects_rows(self, tt: int) -> bool:
        """`keeps_rows(tt)`, read from the host copy (no device read)."""
        return (self._host or self).keeps_rows(tt)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher tensor [B, H, Tt, D] -> student-aligned [B, H, Ts, D] (weighted over K).
        Rows where `mask` is False hold no target: every consumer masks them out.

        One batched matmul with the dense map: far cheaper than gathering K candidates of a
        wide D (logits over a vocabulary). A map that only keeps or drops positions (a teacher
        sharing the student's tokenizer) returns a view of `x` instead, its dropped rows as the
        teacher had them. The map is built once for all the tensors gathered (K and V of every
        layer, logits); index and weight must not change after the first gather."""
        key = (x.shape[2], x.dtype, x.device)
        if key not in self._maps:
            keeps = self.selects_rows(x.shape[2])
            self._maps[key] = None if keeps else self.matrix(x.shape[2], x.dtype).to(x.device)
        m = self._maps[key]
        if m is None:  # a view: no copy of [B, 1, T, V] logits
            return x[:, :, : self.index.shape[1]]
        return torch.matmul(m[:, None], x)


@dataclass
class KVBundle:
    """Per-layer keys and values of one model on one batch.

    keys[i], values[i]: [B, H, T, D] for model layer `layers[i]`; mask: [B, T] bool.
    `pre_rope` tells whether keys are before the rotary embedding (True) or as cached (False).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    layers: list[int]
    mask: torch.Tensor
    pre_rope: bool = False
