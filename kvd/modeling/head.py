"""A causal LM's output head as data: logits = softcap(hidden @ weight.T + bias).

The offline teacher cache stores a teacher's last hidden states [B, T, d] instead of its logits
[B, T, V] (d = 384..2048 against V = 49152..262144: 30-600x fewer bytes) and this head once; a
cached step applies the head to get the very logits the teacher's forward gives. Whether a
model's logits are exactly this function of its hidden states is checked on a real batch
(TeacherSide.build_cache), never assumed: a model that does more after its output embedding keeps
storing logits.
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
