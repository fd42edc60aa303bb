"""Layer maps: which teacher layer(s) each student layer is distilled from.

Every layer aligner takes `student_layers` to choose the distilled student layers: `all`, or a
third of them (`shallow` = the first, `middle` = the centred block, `deep` = the last; each of
max(1, round(Ls / 3)) layers), or an explicit list of indices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field, NonNegativeInt, field_validator

from kvd.align.base import LayerAligner, LayerCalibration, LayerPlan, distinct_layers
from kvd.align.cka import cka_matrix, monotone_assignment
from kvd.core.component import ComponentConfig
from kvd.core.errors import PlanError

Selection = Literal["all", "shallow", "middle", "deep"] | list[NonNegativeInt]


class LayerConfig(ComponentConfig):
    student_layers: Selection = "all"
    """The student layers distilled: all, shallow / middle / deep (a third each), or indices."""

    @field_validator("student_layers")
    @classmethod
    def _distinct(cls, value: Selection) -> Selection:
        if isinstance(value, list):
            if not value:
                raise ValueError("list at least one student layer")
            distinct_layers(value)
        return value


def select_student_layers(selection: Selection, n_student: int) -> list[int]:
    """Ascending student layer indices picked by `selection` out of `n_student` layers."""
    if isinstance(selection, list):
        bad = [j for j in selection if j >= n_student]
        if bad:
            raise PlanError(
                f"student_layers {bad}: the student has {n_student} layers (0..{n_student - 1})"
            )
        return sorted(selection)
    size = max(1, round(n_student / 3))
    first = {"all": 0, "shallow": 0, "middle": (n_student - size) // 2, "deep": n_student - size}
    count = n_student if selection == "all" else size
    return list(range(first[selection], first[selection] + count))


def _check_sizes(n_teacher: int, n_student: int) -> None:
    if n_teacher < 1 or n_student < 1:
        raise PlanError(f"cannot map layers: teacher has {n_teacher}, student has {n_student}")


def _plan(n_student: int, chosen: Mapping[int, tuple[tuple[int, float], ...]]) -> LayerPlan:
    return LayerPlan([chosen.get(j, ()) for j in range(n_student)])


class UniformLayerAligner(LayerAligner):
    """Ratio map, first to first and last to last: student j <- teacher j * (Lt-1) / (Ls-1)."""

    class Config(LayerConfig):
        interpolate: bool = False
        """Blend the two teacher layers around a fractional position instead of rounding."""

    config: Config

    def plan(
        self, n_teacher: int, n_student: int, calibration: LayerCalibration | None = None
    ) -> LayerPlan:
        """Position p = j (Lt-1) / (Ls-1) (Ls = 1: the last teacher layer); rounded half up, or
        with `interpolate` the layers floor(p) and floor(p)+1 weighted by the fraction."""
        _check_sizes(n_teacher, n_student)
        chosen: dict[int, tuple[tuple[int, float], ...]] = {}
        span = max(n_student - 1, 1)
        for j in select_student_layers(self.config.student_layers, n_student):
            whole, part = divmod(j * (n_teacher - 1), span) if n_student > 1 else (n_teacher - 1, 0)
            if part == 0:
                chosen[j] = ((whole, 1.0),)
            elif self.config.interpolate:
                chosen[j] = ((whole, 1 - part / span), (whole + 1, part / span))
            else:
                chosen[j] = ((whole + 1 if 2 * part >= span else whole, 1.0),)
        return _plan(n_student, chosen)


class ExplicitLayerAligner(LayerAligner):
    """Pairs given in the spec: `pairs: [[student, teacher], ...]`."""

    class Config(LayerConfig):
        pairs: list[tuple[NonNegativeInt, NonNegativeInt]] = Field(min_length=1)
        """[student_layer, teacher_layer] pairs; each student layer at most once."""

        @field_validator("pairs")
        @classmethod
        def _once(cls, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
            students = [s for s, _ in pairs]
            twice = sorted({s for s in students if students.count(s) > 1})
            if twice:
                raise ValueError(f"student layers {twice} are paired more than once")
            return pairs

    config: Config

    def plan(
        self, n_teacher: int, n_student: int, calibration: LayerCalibration | None = None
    ) -> LayerPlan:
        """The pairs whose student layer `student_layers` selects; a pair outside the layer
        counts is a PlanError naming it."""
        _check_sizes(n_teacher, n_student)
        for i, (s, t) in enumerate(self.config.pairs):
            if s >= n_student or t >= n_teacher:
                raise PlanError(
                    f"alignment.layers.pairs.{i} = [{s}, {t}] is out of range: the student has "
                    f"{n_student} layers (0..{n_student - 1}), the teacher {n_teacher} "
                    f"(0..{n_teacher - 1})"
                )
        selected = set(select_student_layers(self.config.student_layers, n_student))
        chosen = {s: ((t, 1.0),) for s, t in self.config.pairs if s in selected}
        if not chosen:
            raise PlanError(
                f"no pair of alignment.layers.pairs has a student layer in "
                f"student_layers={self.config.student_layers!r}"
            )
        return _plan(n_student, chosen)


class CKALayerAligner(LayerAligner):
    """Monotone map maximising linear CKA on a calibration batch."""

    Config = LayerConfig
    config: LayerConfig
    needs_calibration = True

    def plan(
        self, n_teacher: int, n_student: int, calibration: LayerCalibration | None = None
    ) -> LayerPlan:
        """Student layers (those selected, in order) get teacher layers m(j), non-decreasing in j,
        maximising the summed CKA of `calibration` features."""
        _check_sizes(n_teacher, n_student)
        if calibration is None:
            raise PlanError("the cka layer map needs a calibration batch; none was given")
        if len(calibration.teacher) != n_teacher or len(calibration.student) != n_student:
            raise PlanError(
                f"calibration has {len(calibration.teacher)} teacher and "
                f"{len(calibration.student)} student layers; expected {n_teacher} and {n_student}"
            )
        layers = select_student_layers(self.config.student_layers, n_student)
        score = cka_matrix(calibration.teacher, [calibration.student[j] for j in layers])
        rows = monotone_assignment(score)
        return _plan(n_student, {j: ((t, 1.0),) for j, t in zip(layers, rows, strict=True)})
