"""Similarity routing: each teacher's own vector at a position is its prototype, the student's
vector is the query; weights = softmax over teachers of cos(query, prototype) / temperature."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kvd.fusion.base import FusionInput
from kvd.fusion.routed import RoutedFusion, RouterConfig
from kvd.project.base import merge_heads


class SimilarityFusion(RoutedFusion):
    """Per position, teachers whose KV (all heads concatenated) points the way the student's
    does get more weight. No parameters unless `learn_temperature`, which makes the temperature a
    learned scalar (log-parametrised, starting at `temperature`)."""

    class Config(RouterConfig):
        """temperature: softmax temperature of the cosines; learn_temperature: train it."""

        temperature: float = Field(0.1, gt=0)
        learn_temperature: bool = False

    def __init__(self, config: Config, **sizes: Any) -> None:
        super().__init__(config, **sizes)
        log_t = torch.tensor(math.log(config.temperature))
        if config.learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    def logits(self, inp: FusionInput) -> Tensor:
        query = merge_heads(inp.student)  # [B, T, H*D] or [N, B, T, H*D]
        cos = F.cosine_similarity(query, merge_heads(inp.teacher), dim=-1)  # [N, B, T]
        return cos.permute(1, 2, 0) / self.log_temperature.exp()
