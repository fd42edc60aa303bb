"""Learned routers: `learnable` (MLP / gate / attention over a student query) and `topk`
(dynamic selection of the k highest-weighted teachers)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from kvd.core.errors import PlanError
from kvd.fusion.base import FusionInput, normalise
from kvd.fusion.routed import RoutedFusion, RouterConfig


def head_pooled(x: Tensor) -> Tensor:
    """[..., H, T, D] -> [..., T, D], the mean over KV heads."""
    return x.mean(dim=-3)


class LearnableFusion(RoutedFusion):
    """A learned router. Query per position: LayerNorm of the student's KV pooled over heads (and
    over teachers when given per teacher) plus a learned embedding of the layer, so weights can
    differ by layer. `kind`:
    - "mlp": Linear(D, hidden) -> SiLU -> Linear(hidden, N) on the query;
    - "gate": Linear(D, N) on the query (a mixture-of-experts gate);
    - "attention": scaled dot product of the projected query with each teacher's projected,
      head-pooled, LayerNormed KV at that position.
    The output layer (the query projection for "attention") starts at zero, so routing begins
    uniform, like `mean`.
    """

    class Config(RouterConfig):
        """kind: router architecture; hidden: width of the MLP / attention projections."""

        kind: Literal["mlp", "gate", "attention"] = "mlp"
        hidden: int = Field(64, ge=1)

    def __init__(self, config: Config, **sizes: Any) -> None:
        super().__init__(config, **sizes)
        d, n = self.kv_dim, self.n_teachers
        self.kind = config.kind
        self.norm = nn.LayerNorm(d)
        self.layer_embedding = nn.Embedding(self.n_layers, d)
        if config.kind == "mlp":
            self.body: nn.Module = nn.Sequential(nn.Linear(d, config.hidden), nn.SiLU())
            self.out = nn.Linear(config.hidden, n)
        else:
            self.body = nn.Identity()
            self.out = nn.Linear(d, config.hidden if config.kind == "attention" else n)
        if config.kind == "attention":
            self.key = nn.Linear(d, config.hidden)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def logits(self, inp: FusionInput) -> Tensor:
        query = head_pooled(inp.student)
        if query.dim() == 4:
            query = query.mean(dim=0)
        query = self.norm(query) + self.layer_embedding.weight[inp.layer].to(query.dtype)
        out: Tensor = self.out(self.body(query))  # [B, T, N], or [B, T, hidden] for attention
        if self.kind != "attention":
            return out
        keys = self.key(self.norm(head_pooled(inp.teacher)))  # [N, B, T, hidden]
        scores: Tensor = torch.einsum("btc,nbtc->btn", out, keys) / keys.shape[-1] ** 0.5
        return scores


class TopKFusion(LearnableFusion):
    """Dynamic selection: the learnable router's k highest weights at each position (among the
    valid teachers; all of them when fewer are valid), renormalised to sum to 1.

    The selection is straight-through: the forward pass uses the renormalised top-k weights,
    the backward pass the router's full softmax, so the router keeps learning (with k=1 the
    kept weight is always exactly 1 and would otherwise pass no gradient)."""

    class Config(LearnableFusion.Config):
        """k: how many teachers to keep per position."""

        k: int = Field(1, ge=1)

    def __init__(self, config: Config, **sizes: Any) -> None:
        super().__init__(config, **sizes)
        if config.k > self.n_teachers:
            raise PlanError(f"topk fusion: k={config.k} exceeds the {self.n_teachers} teachers")
        self.k = config.k

    def select(self, probs: Tensor, valid: Tensor) -> Tensor:
        top = probs.masked_fill(~valid, -1.0).topk(self.k, dim=-1).indices
        keep = torch.zeros_like(valid).scatter(-1, top, True) & valid
        hard = normalise(probs, keep)
        return hard.detach() + probs - probs.detach()
