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


class HeadRows:
    """Logits [..., V] = head(hidden) for hidden [..., d], made on demand a slice of rows at a
    time: `rows[a:b]` -> [b - a, V], rows of the flattened leading dims. The row-wise logit
    losses (kvd.losses.rowwise) read it in place of a [..., V] tensor. The head runs outside any
    autocast region, in the teacher's dtype, as the teacher's own forward does."""

    def __init__(self, hidden: Tensor, head: OutputHead) -> None:
        self.hidden = hidden.reshape(-1, hidden.shape[-1])
        self.head = head
        self.shape = torch.Size((*hidden.shape[:-1], head.vocab_size))

    def __getitem__(self, rows: slice) -> Tensor:
        with torch.autocast(self.hidden.device.type, enabled=False):
            return self.head(self.hidden[rows])
