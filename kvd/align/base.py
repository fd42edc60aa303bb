"""Base classes of the parameter-free aligners and the layer plan they produce.

Aligners have no learned parameters: the same inputs always give the same alignment, so it can be
tested exactly and cached. Each one is built from its nested `Config` alone; `stage` names the
slot of `alignment:` in the run spec it fills (`tokens`, `layers` or `rope`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvd.core.component import ComponentConfig
from kvd.core.types import TokenAlignment, TokenBatch


def distinct_layers(layers: list[int]) -> list[int]:
    """`layers` (a config's list of layer indices) unless one is listed twice (ValueError)."""
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers listed twice in {layers}")
    return layers


class Aligner:
    """A parameter-free aligner of one stage, built from its `Config`."""

    stage: ClassVar[str]
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, config: ComponentConfig) -> None:
        self.config = config


class TokenAligner(Aligner):
    """Maps every student position to weighted teacher positions (tokenizer and time alignment)."""

    stage: ClassVar[str] = "tokens"

    def align(self, student: TokenBatch, teacher: TokenBatch) -> TokenAlignment:
        """Student batch [B, Ts] and teacher batch [B, Tt] of the same texts -> [B, Ts, K] map."""
        raise NotImplementedError


@dataclass(frozen=True)
class LayerCalibration:
    """Features of N aligned tokens per layer (row n of every tensor is the same token).

    teacher: one [N, Ft] tensor per teacher layer; student: one [N, Fs] tensor per student layer.
    """

    teacher: list[torch.Tensor]
    student: list[torch.Tensor]


@dataclass(frozen=True)
class LayerPlan:
    """Which teacher layers each student layer reads, with blend weights.

    `sources[j]` holds the (teacher_layer, weight) pairs of student layer j, weights summing to 1;
    an empty tuple means student layer j is not distilled.
    """

    sources: list[tuple[tuple[int, float], ...]]

    def __post_init__(self) -> None:
        for j, pairs in enumerate(self.sources):
            if any(t < 0 for t, _ in pairs):
                raise ValueError(f"student layer {j}: negative teacher layer in {pairs}")
            if pairs and abs(sum(w for _, w in pairs) - 1.0) > 1e-6:
                raise ValueError(f"student layer {j}: weights of {pairs} do not sum to 1")

    @property
    def student_layers(self) -> list[int]:
        """Student layers that are distilled, ascending."""
        return [j for j, pairs in enumerate(self.sources) if pairs]

    @property
    def teacher_layers(self) -> list[int]:
        """Teacher layers read by any student layer, ascending."""
        return sorted({t for pairs in self.sources for t, _ in pairs})

    def apply(
        self, teacher: Sequence[torch.Tensor] | Mapping[int, torch.Tensor]
    ) -> list[torch.Tensor | None]:
        """Per-teacher-layer tensors (a list, or a dict holding at least `teacher_layers`) -> one
        tensor per student layer: the weighted sum of its sources, None where not distilled."""
        out: list[torch.Tensor | None] = []
        for pairs in self.sources:
            if not pairs:
                out.append(None)
            elif len(pairs) == 1:
                out.append(teacher[pairs[0][0]])
            else:
                blend = teacher[pairs[0][0]] * pairs[0][1]
                for t, w in pairs[1:]:
                    blend = blend + teacher[t] * w
                out.append(blend)
        return out

    def describe(self) -> str:
        """Compact text: `s0<-t0, s1<-t2(0.25)+t3(0.75)`; undistilled student layers left out."""
        parts = []
        for j, pairs in enumerate(self.sources):
            if len(pairs) == 1:
                parts.append(f"s{j}<-t{pairs[0][0]}")
            elif pairs:
                parts.append(f"s{j}<-" + "+".join(f"t{t}({w:.3g})" for t, w in pairs))
        return ", ".join(parts) or "(no layer distilled)"


class LayerAligner(Aligner):
    """Plans which teacher layers each student layer is distilled from."""

    stage: ClassVar[str] = "layers"
    needs_calibration: ClassVar[bool] = False

    def plan(
        self, n_teacher: int, n_student: int, calibration: LayerCalibration | None = None
    ) -> LayerPlan:
        """The plan for a teacher of `n_teacher` layers and a student of `n_student` layers."""
        raise NotImplementedError
