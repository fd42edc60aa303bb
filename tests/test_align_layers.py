"""Layer maps (uniform, explicit, CKA), the plan they produce, and aligner registration."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError

from kvd.align.base import LayerCalibration, LayerPlan
from kvd.align.cka import cka_matrix, linear_cka, monotone_assignment
from kvd.align.layers import (
    CKALayerAligner,
    ExplicitLayerAligner,
    UniformLayerAligner,
    select_student_layers,
)
from kvd.core.errors import PlanError
from kvd.core.manager import load_plugins


def uniform(**options: object) -> UniformLayerAligner:
    return UniformLayerAligner(UniformLayerAligner.Config.model_validate(options))


def teachers_of(plan: LayerPlan) -> list[int | None]:
    """The single teacher layer of each student layer (None = not distilled)."""
    out: list[int | None] = []
    for pairs in plan.sources:
        assert len(pairs) <= 1
        out.append(pairs[0][0] if pairs else None)
    return out


@pytest.mark.parametrize(
    ("n_teacher", "n_student"), [(30, 9), (18, 30), (12, 12), (2, 5), (5, 1), (1, 5), (1, 1)]
)
def test_uniform_maps_first_to_first_and_last_to_last(n_teacher: int, n_student: int) -> None:
    plan = uniform().plan(n_teacher, n_student)
    layers = teachers_of(plan)
    assert len(layers) == n_student and None not in layers
    assert layers[-1] == n_teacher - 1
    if n_student > 1:
        assert layers[0] == 0
    assert layers == sorted(layers)  # type: ignore[type-var]
    assert plan.student_layers == list(range(n_student))
    assert plan.teacher_layers == sorted(set(layers))  # type: ignore[type-var]


def test_uniform_rounds_half_up_and_interpolates() -> None:
    assert teachers_of(uniform().plan(4, 3)) == [0, 2, 3]  # 0, 1.5, 3
    assert teachers_of(uniform().plan(2, 5)) == [0, 0, 1, 1, 1]  # Ls > Lt: 0 .25 .5 .75 1
    plan = uniform(interpolate=True).plan(4, 3)
    assert plan.sources == [((0, 1.0),), ((1, 0.5), (2, 0.5)), ((3, 1.0),)]
    assert plan.describe() == "s0<-t0, s1<-t1(0.5)+t2(0.5), s2<-t3"
    plan = uniform(interpolate=True).plan(30, 9)  # position 29 / 8 = 3.625
    assert plan.sources[1] == ((3, 0.375), (4, 0.625))


def test_plan_apply_blends_and_skips() -> None:
    plan = LayerPlan([((0, 1.0),), (), ((1, 0.25), (2, 0.75))])
    teacher = [torch.full((2, 3), float(i)) for i in range(3)]
    out = plan.apply(teacher)
    assert out[0] is teacher[0] and out[1] is None
    assert out[2] is not None and torch.allclose(out[2], torch.full((2, 3), 1.75))
    by_layer = plan.apply({t: teacher[t] for t in plan.teacher_layers})
    assert by_layer[2] is not None and torch.equal(by_layer[2], out[2])
    assert plan.student_layers == [0, 2] and plan.teacher_layers == [0, 1, 2]
    assert plan.describe() == "s0<-t0, s2<-t1(0.25)+t2(0.75)"
    assert LayerPlan([(), ()]).describe() == "(no layer distilled)"
    with pytest.raises(ValueError, match="sum to 1"):
        LayerPlan([((0, 0.5),)])


@pytest.mark.parametrize(
    ("n", "shallow", "middle", "deep"),
    [
        (30, range(0, 10), range(10, 20), range(20, 30)),
        (18, range(0, 6), range(6, 12), range(12, 18)),
        (5, [0, 1], [1, 2], [3, 4]),
        (2, [0], [0], [1]),
        (1, [0], [0], [0]),
    ],
)
def test_student_layer_thirds(
    n: int, shallow: range | list[int], middle: range | list[int], deep: range | list[int]
) -> None:
    assert select_student_layers("all", n) == list(range(n))
    assert select_student_layers("shallow", n) == list(shallow)
    assert select_student_layers("middle", n) == list(middle)
    assert select_student_layers("deep", n) == list(deep)


def test_student_layers_in_plans() -> None:
    plan = uniform(student_layers="deep").plan(18, 30)
    assert plan.student_layers == list(range(20, 30))
    assert teachers_of(plan)[29] == 17 and teachers_of(plan)[0] is None
    assert uniform(student_layers=[3, 0]).plan(10, 4).student_layers == [0, 3]
    with pytest.raises(PlanError, match=r"student_layers \[4\]"):
        uniform(student_layers=[0, 4]).plan(10, 4)
    with pytest.raises(ValidationError, match="twice"):
        uniform(student_layers=[1, 1])
    with pytest.raises(ValidationError):
        uniform(student_layers="top")
    with pytest.raises(ValidationError):
        uniform(student_layers=[-1])


def explicit(**options: object) -> ExplicitLayerAligner:
    return ExplicitLayerAligner(ExplicitLayerAligner.Config.model_validate(options))


def test_explicit_pairs() -> None:
    plan = explicit(pairs=[[0, 2], [3, 7]]).plan(8, 4)
    assert teachers_of(plan) == [2, None, None, 7]
    assert plan.describe() == "s0<-t2, s3<-t7"
    plan = explicit(pairs=[[0, 2], [3, 7]], student_layers="deep").plan(8, 4)
    assert teachers_of(plan) == [None, None, None, 7]


def test_explicit_validation_names_the_pair() -> None:
    with pytest.raises(PlanError, match=r"pairs\.1 = \[5, 1\].*student has 4 layers"):
        explicit(pairs=[[0, 0], [5, 1]]).plan(8, 4)
    with pytest.raises(PlanError, match=r"pairs\.0 = \[1, 8\].*teacher 8"):
        explicit(pairs=[[1, 8]]).plan(8, 4)
    with pytest.raises(PlanError, match="no pair"):
        explicit(pairs=[[0, 0]], student_layers="deep").plan(8, 4)
    with pytest.raises(ValidationError, match="more than once"):
        explicit(pairs=[[0, 0], [0, 1]])
    with pytest.raises(ValidationError):
        explicit(pairs=[])
    with pytest.raises(ValidationError):
        explicit(pairs=[[0, -1]])
    with pytest.raises(ValidationError):
        explicit()


@pytest.mark.parametrize("aligner", [uniform(), explicit(pairs=[[0, 0]])])
def test_no_layers_is_a_plan_error(aligner: UniformLayerAligner | ExplicitLayerAligner) -> None:
    with pytest.raises(PlanError):
        aligner.plan(0, 3)
    with pytest.raises(PlanError):
        aligner.plan(3, 0)


def orthogonal(n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """[n, m] with orthonormal rows (n <= m): x @ it keeps every linear CKA."""
    q, _ = torch.linalg.qr(torch.randn(m, n, generator=gen, dtype=torch.float64))
    return q.T


def test_linear_cka_invariances() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=gen, dtype=torch.float64)
    assert linear_cka(x, x @ orthogonal(16, 16, gen)) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, 3.0 * x @ orthogonal(16, 40, gen) + 5.0) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, x[:, :8]) < 1.0
    assert linear_cka(x, torch.randn(200, 16, generator=gen)) < 0.2
    assert linear_cka(x, torch.ones(200, 4)) == 0.0
    wide = torch.randn(10, 64, generator=gen)  # fewer rows than features
    assert linear_cka(wide, wide @ orthogonal(64, 64, gen).float()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="rows"):
        linear_cka(x, x[:5])


def test_cka_matrix_matches_pairwise() -> None:
    gen = torch.Generator().manual_seed(1)
    teacher = [torch.randn(50, 8, generator=gen) for _ in range(3)]
    student = [torch.randn(50, 5, generator=gen) for _ in range(2)]
    matrix = cka_matrix(teacher, student)
    assert matrix.shape == (3, 2)
    for i, j in itertools.product(range(3), range(2)):
        assert matrix[i, j].item() == pytest.approx(linear_cka(teacher[i], student[j]))


@settings(max_examples=200, deadline=None)
@given(
    arrays("float64", st.tuples(st.integers(1, 4), st.integers(0, 4)), elements=st.floats(-1, 1))
)
def test_monotone_assignment_is_optimal(score: object) -> None:
    matrix = torch.as_tensor(score)
    n_rows, n_cols = matrix.shape
    rows = monotone_assignment(matrix)
    assert len(rows) == n_cols and rows == sorted(rows)
    assert all(0 <= r < n_rows for r in rows)
    total = sum(matrix[r, j].item() for j, r in enumerate(rows))
    best = max(
        (
            sum(matrix[r, j].item() for j, r in enumerate(m))
            for m in itertools.combinations_with_replacement(range(n_rows), n_cols)
        ),
        default=0.0,
    )
    assert total == pytest.approx(best)


def planted(gen: torch.Generator, n_teacher: int, chosen: list[int]) -> LayerCalibration:
    """Correlated teacher layers (like a residual stream); student j rotates teacher chosen[j]."""
    x = torch.randn(256, 16, generator=gen, dtype=torch.float64)
    teacher = []
    for _ in range(n_teacher):
        x = x + 0.8 * torch.randn(256, 16, generator=gen, dtype=torch.float64)
        teacher.append(x)
    student = [teacher[t] @ orthogonal(16, 24, gen) for t in chosen]
    return LayerCalibration(teacher=teacher, student=student)


def test_cka_recovers_a_planted_monotone_map() -> None:
    gen = torch.Generator().manual_seed(2)
    chosen = [1, 3, 3, 6, 7]
    calibration = planted(gen, 8, chosen)
    aligner = CKALayerAligner(CKALayerAligner.Config())
    assert aligner.needs_calibration and not uniform().needs_calibration
    assert teachers_of(aligner.plan(8, 5, calibration)) == chosen
    deep = CKALayerAligner(CKALayerAligner.Config(student_layers="deep"))
    assert teachers_of(deep.plan(8, 5, calibration)) == [None, None, None, 6, 7]


def test_cka_needs_a_matching_calibration() -> None:
    aligner = CKALayerAligner(CKALayerAligner.Config())
    with pytest.raises(PlanError, match="calibration"):
        aligner.plan(8, 5)
    calibration = planted(torch.Generator().manual_seed(3), 8, [0, 1])
    with pytest.raises(PlanError, match="expected 8 and 5"):
        aligner.plan(8, 5, calibration)


def test_builtin_aligners_are_registered_in_their_stage() -> None:
    registry = load_plugins(entry_points=False).registry("aligners")
    stages = {
        "soft": "tokens",
        "hard": "tokens",
        "resample": "tokens",
        "segment_resample": "tokens",
        "uniform": "layers",
        "explicit": "layers",
        "cka": "layers",
    }
    for name, stage in stages.items():
        cls = registry.get(name)
        assert cls.stage == stage
        assert registry.entry(name).summary
        if name != "explicit":
            cls(cls.Config())  # every other aligner works with its defaults
