"""Learned KV projectors: map one model's K or V [B, Hs, T, Ds] to another geometry [B, Ht, T, Dt].

Direction is the caller's choice (`projector.direction` in the spec): teacher->student projects
each teacher into the student's geometry (a learned, fused target), student->teacher projects the
student into each teacher's geometry (a fixed target). See `kvd.losses.kv` for the collapse guard
a learned target needs.
"""

from kvd.project.base import (
    KVProjector,
    Projector,
    identity_like_,
    merge_heads,
    shape_text,
    split_heads,
)
from kvd.project.bottleneck import ElasticBottleneckProjector
from kvd.project.head_dim import HeadDimProjector
from kvd.project.heads import HeadsProjector, overlap_mixing
from kvd.project.identity import IdentityProjector
from kvd.project.linear import LinearProjector
from kvd.project.two_step import HeadDimThenHeadsProjector

__all__ = [
    "ElasticBottleneckProjector",
    "HeadDimProjector",
    "HeadDimThenHeadsProjector",
    "HeadsProjector",
    "IdentityProjector",
    "KVProjector",
    "LinearProjector",
    "Projector",
    "identity_like_",
    "merge_heads",
    "overlap_mixing",
    "shape_text",
    "split_heads",
]
