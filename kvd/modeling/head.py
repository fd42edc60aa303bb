"""A causal LM's output head as data: logits = softcap(hidden @ weight.T + bias).

A step keeps a teacher's last hidden states [B, T, d] instead of its logits [B, T, V]
(d = 384..2048 against V = 49152..262144: 30-600x fewer bytes), and so does the offline teacher
cache, which stores this head once; the logit losses apply the head a chunk of rows at a time
(HeadRows), so the teacher's [B, T, V] logits are never held whole. Whether a model's logits are
exactly this function of its hidden states is checked on a real batch (TeacherSide), never
assumed: a model that does more after its output embedding keeps giving logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class OutputHead:
    """weight [V, d], bias [V] or None, softcap: Gemma's final_logit_softcapping or None."""

    weight: Tensor
    bias: Tensor | None
    softcap: float | None

    @staticmethod
    def of(model: Any) -> OutputHead | None:
        """The head of a transformers causal LM, None when its output embedding is not a
        Linear."""
        linear = model.get_output_embeddings()
        if not isinstance(linear, torch.nn.Linear):
            return None
        cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        bias = None if linear.bias is None else linear.bias.detach()
        return OutputHead(linear.weight.detach(), bias, float(cap) if cap else None)

    def __call__(self, hidden: Tensor) -> Tensor:
        """hidden [..., d] -> logits [..., V], with the ops (and their order) of transformers'
        soft-capping models."""
        logits = F.linear(hidden, self.weight, self.bias)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        """The head as named tensors (`PREFIX/weight`, `PREFIX/bias`) for a safetensors file."""
        out = {f"{prefix}/weight": self.weight.contiguous()}
        if self.bias is not None:
            out[f"{prefix}/bias"] = self.bias.contiguous()
        return out

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @staticmethod
    def from_tensors(
        tensors: dict[str, Tensor], prefix: str, softcap: float | None, device: torch.device
    ) -> OutputHead:
        """The inverse of `tensors`, on `device`."""
        bias = tensors.get(f"{prefix}/bias")
        return OutputHead(
            tensors[f"{prefix}/weight"].to(device),
            None if bias is None else bias.to(device),
            softcap,
        )


BLOCK_ELEMENTS = 2**23
"""Logits HeadRows makes per head call: 16 MiB in bf16, e.g. 170 rows of a 49,152-token vocabulary.
A row-wise loss reads 2**21 elements a chunk (42 such rows); a bf16 matmul of so few rows runs
at half the speed of one of 170-256 on a CPU (measured: 0.17 s against 0.08 s for 835 rows of
[384 -> 49152]), so the head runs on a block of rows that several chunks then read."""


class HeadRows:
    """Logits [..., V] = head(hidden) for hidden [..., d], made on demand a block of rows at a
    time: `rows[a:b]` -> [b - a, V], rows of the flattened leading dims. The row-wise logit
    losses (kvd.losses.rowwise) read it in place of a [..., V] tensor, in increasing slices:
    a slice inside the last block is a view of it, any other starts a new block at its first
    row (at least BLOCK_ELEMENTS // V rows). The head runs outside any autocast region, in the
    teacher's dtype, as the teacher's own forward does."""

    def __init__(self, hidden: Tensor, head: OutputHead) -> None:
        self.hidden = hidden.reshape(-1, hidden.shape[-1])
        self.head = head
        self.shape = torch.Size((*hidden.shape[:-1], head.vocab_size))
        self.block_rows = max(1, BLOCK_ELEMENTS // head.vocab_size)
        self._start = 0
        self._block: Tensor | None = None  # logits of rows _start.. [n, V]

    def __getitem__(self, rows: slice) -> Tensor:
        first, last, _ = rows.indices(len(self.hidden))
        block = self._block
        if block is None or not self._start <= first <= last <= self._start + len(block):
            end = min(len(self.hidden), max(last, first + self.block_rows))
            with torch.autocast(self.hidden.device.type, enabled=False):
                block = self._block = self.head(self.hidden[first:end])
            self._start = first
        return block[first - self._start : last - self._start]
