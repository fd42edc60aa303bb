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
    _maps: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, bool]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )  # gather's dense maps (and whether each only keeps rows), built once per Tt, dtype, device

    def matrix(self, tt: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The alignment as a dense map [B, Ts, Tt]: row s holds the weights of its teacher
        positions (all zero where masked)."""
        b, ts, _ = self.index.shape
        out = torch.zeros(b, ts, max(tt, 1), dtype=dtype, device=self.index.device)
        out.scatter_add_(2, self.index.clamp(0, max(tt - 1, 0)), self.weight.to(dtype))
        return out[:, :, :tt]

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
            m = self.matrix(x.shape[2], x.dtype).to(x.device)
            self._maps[key] = (m, _identity_rows(m) is not None)
        m, keeps_rows = self._maps[key]
        if keeps_rows:  # a view: no copy of [B, 1, T, V] logits
            return x[:, :, : m.shape[1]]
        return torch.matmul(m[:, None], x)


def _identity_rows(m: torch.Tensor) -> torch.Tensor | None:
    """For a map m [B, Ts, Tt] that is the identity on some rows and zero elsewhere, its
    diagonal [B, Ts] (1 kept, 0 dropped); otherwise None."""
    ts, tt = m.shape[1:]
    if ts > tt:
        return None
    diag = m.diagonal(dim1=1, dim2=2)
    if not ((diag == 0) | (diag == 1)).all() or m[:, :, ts:].any():
        return None
    return diag if torch.equal(m[:, :, :ts], torch.diag_embed(diag)) else None


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
