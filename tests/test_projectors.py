"""Learned KV projectors: shapes both ways, the seed's GQA case, inits, training, K/V separation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvd.core.errors import PlanError
from kvd.core.manager import load_plugins
from kvd.core.types import KVShape
from kvd.project import HeadsProjector, KVProjector, Projector, overlap_mixing

PROJECTORS = load_plugins(entry_points=False).registry("projectors")
NAMES = ["identity", "head_dim", "heads", "head_dim_then_heads", "linear", "elastic_bottleneck"]
SHAPE_PAIRS = [  # (teacher, student)
    (KVShape(2, 8), KVShape(2, 8)),
    (KVShape(2, 16), KVShape(2, 8)),
    (KVShape(6, 8), KVShape(2, 8)),
    (KVShape(6, 16), KVShape(2, 8)),
    (KVShape(3, 8), KVShape(2, 4)),
]


def build(name: str, source: KVShape, target: KVShape, **options: Any) -> Projector:
    cls = PROJECTORS.get(name)
    projector: Projector = cls(cls.Config(**options), source=source, target=target)
    return projector


def compatible(name: str, a: KVShape, b: KVShape) -> bool:
    if name == "identity":
        return a == b
    if name == "head_dim":
        return a.heads == b.heads
    if name == "heads":
        return a.head_dim == b.head_dim
    return True


def test_all_projectors_registered() -> None:
    assert sorted(NAMES) == PROJECTORS.names()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pair", SHAPE_PAIRS, ids=lambda p: f"{p[0].heads}x{p[0].head_dim}")
@pytest.mark.parametrize("direction", ["teacher_to_student", "student_to_teacher"])
def test_every_projector_both_directions(
    name: str, pair: tuple[KVShape, KVShape], direction: str
) -> None:
    source, target = pair if direction == "teacher_to_student" else pair[::-1]
    if not compatible(name, source, target):
        with pytest.raises(PlanError, match=name):
            build(name, source, target)
        return
    projector = build(name, source, target)
    x = torch.randn(3, source.heads, 5, source.head_dim)
    assert projector(x).shape == (3, target.heads, 5, target.head_dim)
    assert projector.describe()


def test_seed_gqa_group_mean_init_is_exact_group_mean() -> None:
    projector = build("heads", KVShape(12, 128), KVShape(2, 128)).double()
    x = torch.randn(4, 12, 50, 128, dtype=torch.float64)
    out = projector(x)
    for j in range(2):
        torch.testing.assert_close(out[:, j], x[:, 6 * j : 6 * j + 6].mean(dim=1))
    assert "group-mean" in projector.describe()


def test_replication_init_copies_each_source_head() -> None:
    projector = build("heads", KVShape(2, 8), KVShape(12, 8))
    x = torch.randn(2, 2, 5, 8)
    out = projector(x)
    for j in range(12):
        torch.testing.assert_close(out[:, j], x[:, j // 6])
    assert "replication" in projector.describe()


def test_non_divisible_heads_are_learned_from_an_overlap_init() -> None:
    projector = build("heads", KVShape(3, 8), KVShape(2, 8))
    assert isinstance(projector, HeadsProjector)
    expected = torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 2 / 3]])
    torch.testing.assert_close(projector.mixing.detach(), expected)
    assert projector.mixing.requires_grad
    assert "learned" in projector.describe()
    assert overlap_mixing(3, 2).sum(dim=1).allclose(torch.ones(2))


def test_seed_heads_and_head_dim_mismatch_trains() -> None:
    torch.manual_seed(0)
    source, target = KVShape(12, 128), KVShape(2, 64)
    projector = build("head_dim_then_heads", source, target)
    reference = build("linear", source, target)  # a fixed map the projector has to fit
    x = torch.randn(4, 12, 50, 128)
    with torch.no_grad():
        y = reference(x) + 0.5
    assert projector(x).shape == (4, 2, 50, 64)
    assert (
        projector.describe()
        == "head_dim 128->64 linear (orthogonal init); heads 12->2 mixing (group-mean init)"
    )
    opt = torch.optim.Adam(projector.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = (projector(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name", ["identity", "head_dim", "heads", "head_dim_then_heads", "linear"])
def test_identical_shapes_give_the_identity_at_init(name: str) -> None:
    shape = KVShape(4, 8)
    x = torch.randn(2, 4, 6, 8)
    assert torch.equal(build(name, shape, shape)(x), x)


def test_scaled_init_keeps_the_variance() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 2, 64, 32)
    for d in (8, 128):
        y = build("head_dim", KVShape(2, 32), KVShape(2, d))(x)
        assert 0.8 < y.var().item() < 1.25


@pytest.mark.parametrize("name", NAMES)
def test_kv_projector_has_separate_k_and_v_weights(name: str) -> None:
    shape = KVShape(2, 8)
    cls = PROJECTORS.get(name)
    kv = KVProjector(cls, cls.Config(), shape, shape)
    assert kv.k is not kv.v
    k_params = {id(p) for p in kv.k.parameters()}
    assert k_params.isdisjoint(id(p) for p in kv.v.parameters())
    k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    k2, v2 = kv(k, v)
    assert k2.shape == k.shape and v2.shape == v.shape
    assert kv.describe().startswith("K and V each: ")


def test_elastic_bottleneck_config() -> None:
    projector = build(
        "elastic_bottleneck", KVShape(2, 8), KVShape(1, 4), mlp_ratio=0.5, dropout=0.0
    )
    assert projector.describe() == "elastic bottleneck 16->8->4 (LayerNorm, SiLU, dropout 0)"
    with pytest.raises(ValueError):
        PROJECTORS.get("elastic_bottleneck").Config(mlp_ratio=0)


def test_plan_error_names_the_shapes_and_a_fix() -> None:
    with pytest.raises(PlanError) as info:
        build("heads", KVShape(12, 128), KVShape(2, 64))
    assert "12x128 -> 2x64" in info.value.message
    assert info.value.hint is not None and "head_dim_then_heads" in info.value.hint
