"""Fusion of several teachers' aligned KV into one target: KV_fused = sum_i w_i KV_i.

A fusion returns the routing weights [B, T, N] (logged by layer and task) and an auxiliary
loss; `fuse` applies the weights and `fused_mask` says where the target is defined.
"""

from kvd.fusion.base import (
    Fusion,
    FusionInput,
    FusionOutput,
    fuse,
    fused_mask,
    masked_softmax,
    normalise,
    routing_entropy,
)
from kvd.fusion.lowest_ce import LowestCEFusion
from kvd.fusion.routed import RoutedFusion, RouterConfig
from kvd.fusion.router import LearnableFusion, TopKFusion
from kvd.fusion.similarity import SimilarityFusion
from kvd.fusion.static import FixedFusion, MeanFusion, StaticFusion
from kvd.fusion.task import TaskConditionalFusion

__all__ = [
    "FixedFusion",
    "Fusion",
    "FusionInput",
    "FusionOutput",
    "LearnableFusion",
    "LowestCEFusion",
    "MeanFusion",
    "RoutedFusion",
    "RouterConfig",
    "SimilarityFusion",
    "StaticFusion",
    "TaskConditionalFusion",
    "TopKFusion",
    "fuse",
    "fused_mask",
    "masked_softmax",
    "normalise",
    "routing_entropy",
]
