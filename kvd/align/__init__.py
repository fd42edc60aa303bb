"""Parameter-free alignment of a teacher to the student: tokens/time, layers (and RoPE)."""

from kvd.align.base import (
    Aligner,
    LayerAligner,
    LayerCalibration,
    LayerPlan,
    TokenAligner,
)
from kvd.align.cka import cka_matrix, linear_cka, monotone_assignment
from kvd.align.layers import (
    CKALayerAligner,
    ExplicitLayerAligner,
    UniformLayerAligner,
    select_student_layers,
)
from kvd.align.time import ResampleAligner, SegmentResampleAligner, linear_index
from kvd.align.tokens import HardTokenAligner, SoftTokenAligner

__all__ = [
    "Aligner",
    "CKALayerAligner",
    "ExplicitLayerAligner",
    "HardTokenAligner",
    "LayerAligner",
    "LayerCalibration",
    "LayerPlan",
    "ResampleAligner",
    "SegmentResampleAligner",
    "SoftTokenAligner",
    "TokenAligner",
    "UniformLayerAligner",
    "cka_matrix",
    "linear_cka",
    "linear_index",
    "monotone_assignment",
    "select_student_layers",
]
