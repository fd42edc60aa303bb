"""Fusion strategies: weight invariants, exact static weights, routing behaviour, gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvd.core.errors import PlanError
from kvd.core.manager import load_plugins
from kvd.core.types import KVShape
from kvd.fusion import Fusion, FusionInput, fuse, fused_mask, routing_entropy

PLUGINS = load_plugins(entry_points=False)
FUSIONS = PLUGINS.registry("fusions")
NAMES = ["fixed", "mean", "similarity", "learnable", "task_conditional", "topk", "lowest_ce"]
N, B, H, T, D = 3, 2, 2, 5, 4


def build(name: str, n_teachers: int = N, **options: Any) -> Fusion:
    cls = FUSIONS.get(name)
    fusion: Fusion = cls(
        cls.Config(**options), n_teachers=n_teachers, n_layers=2, kv_dim=D, n_tasks=2
    )
    return fusion


def make_input(mask: torch.Tensor | None = None, n: int = N, layer: int = 0) -> FusionInput:
    torch.manual_seed(0)
    if mask is None:
        mask = torch.rand(n, B, T) > 0.3
        mask[:, 0, 0] = False  # no teacher valid here
    return FusionInput(
        teacher=torch.randn(n, B, H, T, D),
        student=torch.randn(B, H, T, D),
        mask=mask,
        layer=layer,
        task=torch.tensor([0, 1]),
        teacher_ce=torch.rand(n, B),
    )


def test_all_fusions_registered() -> None:
    assert sorted(NAMES) == FUSIONS.names()


@pytest.mark.parametrize("name", NAMES)
def test_weights_sum_to_one_over_valid_teachers(name: str) -> None:
    fusion = build(name)
    with torch.no_grad():  # perturb learned routers away from their uniform start
        for p in fusion.parameters():
            p.normal_()
    inp = make_input()
    out = fusion(inp)
    valid = inp.valid
    assert out.weights.shape == (B, T, N)
    assert (out.weights[~valid] == 0).all()
    any_valid = valid.any(dim=-1)
    torch.testing.assert_close(out.weights.sum(-1)[any_valid], torch.ones(int(any_valid.sum())))
    assert (out.weights[0, 0] == 0).all()
    assert out.aux_loss.shape == ()
    fused = fuse(inp.teacher, out.weights)
    assert fused.shape == (B, H, T, D) and torch.isfinite(fused).all()


def test_fuse_and_fused_mask() -> None:
    teacher = torch.stack([torch.zeros(1, 1, 2, 1), torch.ones(1, 1, 2, 1)])
    weights = torch.tensor([[[0.25, 0.75], [1.0, 0.0]]])
    assert fuse(teacher, weights).flatten().tolist() == [0.75, 0.0]
    mask = torch.tensor([[[True, False]], [[False, False]]])
    assert fused_mask(mask).tolist() == [[True, False]]


def test_fixed_and_mean_exact_values() -> None:
    mask = torch.ones(2, B, T, dtype=torch.bool)
    mask[1, :, 0] = False
    inp = make_input(mask, n=2)
    fixed = build("fixed", n_teachers=2, weights=[1.0, 3.0])(inp).weights
    assert fixed[:, 1:].flatten(0, 1).tolist() == [[0.25, 0.75]] * (B * (T - 1))
    assert fixed[:, 0].tolist() == [[1.0, 0.0]] * B
    mean = build("mean", n_teachers=2)(inp).weights
    assert mean[:, 1:].flatten(0, 1).tolist() == [[0.5, 0.5]] * (B * (T - 1))
    cls = FUSIONS.get("fixed")
    from_spec = cls(
        cls.Config(), n_teachers=2, n_layers=1, kv_dim=D, n_tasks=0, teacher_weights=[3.0, 1.0]
    )
    assert from_spec(inp).weights[0, 1].tolist() == [0.75, 0.25]
    uniform = cls(cls.Config(), n_teachers=2, n_layers=1, kv_dim=D, n_tasks=0)
    assert uniform(inp).weights[0, 1].tolist() == [0.5, 0.5]
    with pytest.raises(PlanError):
        build("fixed", n_teachers=2, weights=[1.0, 2.0, 3.0])


def test_similarity_prefers_the_teacher_like_the_student() -> None:
    inp = make_input(torch.ones(N, B, T, dtype=torch.bool))
    inp.teacher[1] = inp.student
    weights = build("similarity", temperature=0.05)(inp).weights
    assert (weights.argmax(-1) == 1).all()
    per_teacher = FusionInput(inp.teacher, inp.teacher.clone(), inp.mask, 0)  # [N, B, H, T, D]
    torch.testing.assert_close(
        build("similarity")(per_teacher).weights, torch.full((B, T, N), 1 / N)
    )
    learned = build("similarity", learn_temperature=True)
    assert [n for n, _ in learned.named_parameters()] == ["log_temperature"]


@pytest.mark.parametrize("kind", ["mlp", "gate", "attention"])
def test_learnable_router_starts_uniform_and_differs_by_layer(kind: str) -> None:
    fusion = build("learnable", kind=kind)
    inp = make_input(torch.ones(N, B, T, dtype=torch.bool))
    torch.testing.assert_close(fusion(inp).weights, torch.full((B, T, N), 1 / N))
    with torch.no_grad():
        for p in fusion.parameters():
            p.normal_()
    other_layer = make_input(inp.mask, layer=1)
    assert not torch.allclose(fusion(inp).weights, fusion(other_layer).weights)


def test_task_conditional_learns_task_dependent_weights() -> None:
    fusion = build("task_conditional", n_teachers=2)
    inp = make_input(torch.ones(2, B, T, dtype=torch.bool), n=2)
    target = torch.stack([inp.teacher[0, 0], inp.teacher[1, 1]])  # task 0 -> t0, task 1 -> t1
    opt = torch.optim.Adam(fusion.parameters(), lr=0.2)
    for _ in range(15):
        loss = (fuse(inp.teacher, fusion(inp).weights) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = fusion(inp).weights
    assert weights[0, :, 0].min() > 0.8 and weights[1, :, 1].min() > 0.8
    with pytest.raises(PlanError):
        FUSIONS.get("task_conditional")(
            FUSIONS.get("task_conditional").Config(), n_teachers=2, n_layers=1, kv_dim=D, n_tasks=0
        )


def test_topk_keeps_exactly_k_teachers() -> None:
    fusion = build("topk", n_teachers=4, k=2)
    with torch.no_grad():
        for p in fusion.parameters():
            p.normal_()
    inp = make_input(torch.ones(4, B, T, dtype=torch.bool), n=4)
    weights = fusion(inp).weights
    assert ((weights > 0).sum(-1) == 2).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, T))
    with pytest.raises(PlanError):
        build("topk", n_teachers=2, k=3)


def test_lowest_ce_picks_the_argmin_and_falls_back_where_masked() -> None:
    mask = torch.ones(N, B, T, dtype=torch.bool)
    mask[1, 0, 2] = False
    inp = make_input(mask)
    inp.teacher_ce = torch.tensor([[2.0, 0.5], [1.0, 3.0], [1.5, 1.0]])  # [N, B]
    weights = build("lowest_ce")(inp).weights
    picked = weights.argmax(-1)
    assert picked[0].tolist() == [1, 1, 2, 1, 1]  # sequence 0: teacher 1, else next-best 2
    assert (picked[1] == 0).all()
    assert ((weights == 1).sum(-1) == 1).all()


@pytest.mark.parametrize("target", ["diverse", "specialized"])
def test_entropy_regulariser_sign(target: str) -> None:
    torch.manual_seed(1)
    fusion = build("learnable", entropy_weight=1.0, entropy_target=target)
    with torch.no_grad():
        for p in fusion.parameters():
            p.normal_(std=0.5)
    inp = make_input(torch.ones(N, B, T, dtype=torch.bool))
    before = routing_entropy(fusion(inp).weights, inp.valid).item()
    opt = torch.optim.SGD(fusion.parameters(), lr=0.5)
    for _ in range(20):
        aux = fusion(inp).aux_loss
        opt.zero_grad()
        aux.backward()
        opt.step()
    after = routing_entropy(fusion(inp).weights, inp.valid).item()
    assert (after > before) if target == "diverse" else (after < before)
    assert build("learnable")(inp).aux_loss.item() == 0.0


@pytest.mark.parametrize("kind", ["mlp", "gate", "attention"])
def test_gradients_reach_projectors_router_and_student_not_teachers(kind: str) -> None:
    torch.manual_seed(0)
    projectors = PLUGINS.registry("projectors")
    losses = PLUGINS.registry("losses")
    cls = projectors.get("head_dim_then_heads")
    teacher_models = [torch.nn.Linear(8, 8) for _ in range(2)]
    teacher_shape, student_shape = KVShape(4, 8), KVShape(H, D)
    projs = [cls(cls.Config(), source=teacher_shape, target=student_shape) for _ in range(2)]
    fusion = build("learnable", n_teachers=2, kind=kind, entropy_weight=0.1)
    kv_mse = losses.get("kv_mse")(losses.get("kv_mse").Config())

    raw_input = torch.randn(B, 4, T, 8)
    with torch.no_grad():
        raw = [model(raw_input) for model in teacher_models]
    raw[1].requires_grad_(False)
    student = torch.randn(B, H, T, D, requires_grad=True)
    teacher = torch.stack([p(r) for p, r in zip(projs, raw, strict=True)])
    mask = torch.ones(2, B, T, dtype=torch.bool)
    out = fusion(FusionInput(teacher, student.detach(), mask, layer=1))
    target = fuse(teacher, out.weights)
    loss = kv_mse(student, target, fused_mask(mask)) + out.aux_loss
    loss.backward()

    assert student.grad is not None and student.grad.abs().sum() > 0
    for module in [*projs, fusion]:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0
    assert all(r.grad is None for r in raw)
    assert all(p.grad is None for m in teacher_models for p in m.parameters())
