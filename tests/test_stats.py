"""The statistics of `kvd compare` on synthetic data: known differences are found, identical
samples are not, Holm's correction is applied, bootstrap intervals cover the truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvd.study.compare import compare_groups, differences
from kvd.study.runs import Group, Member
from kvd.study.stats import bootstrap_ci, holm, summarize, welch, wilcoxon


def test_summary() -> None:
    s = summarize([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)
    assert summarize([5.0]).std == 0.0


def test_known_difference_is_significant_and_identical_samples_are_not() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, 12)
    b = rng.normal(2.0, 1.0, 12)
    assert welch(a.tolist(), b.tolist()) < 1e-3  # type: ignore[operator]
    assert welch(a.tolist(), a.tolist()) == pytest.approx(1.0)
    assert welch([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]) == 1.0  # constant and equal: no difference
    assert welch([1.0], [2.0, 3.0]) is None  # one run cannot estimate a variance
    paired = rng.normal(0.0, 1.0, 50)
    assert wilcoxon(paired.tolist(), (paired + 0.3 + rng.normal(0, 0.1, 50)).tolist()) < 1e-6  # type: ignore[operator]
    assert wilcoxon(paired.tolist(), paired.tolist()) == 1.0


def test_holm_matches_the_hand_computed_adjustment() -> None:
    # sorted: 0.01 * 3, 0.03 * 2, then max(0.06, 0.04 * 1) (monotone)
    assert holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    assert holm([0.2, None, 0.9]) == [pytest.approx(0.4), None, pytest.approx(0.9)]
    assert holm([0.8, 0.9]) == [1.0, 1.0]  # capped at 1


def test_bootstrap_interval_contains_the_true_mean_difference() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(10.0, 1.0, 300)
    b = rng.normal(11.0, 1.0, 300)
    low, high = bootstrap_ci(a.tolist(), b.tolist())  # type: ignore[misc]
    assert low < 1.0 < high and low > 0  # covers the truth, excludes no difference
    noise = rng.normal(0.0, 0.5, 300)
    low, high = bootstrap_ci(a.tolist(), (a + 0.25 + noise).tolist(), paired=True)  # type: ignore[misc]
    assert low < 0.25 < high
    assert bootstrap_ci([1.0, 2.0], [1.5, 2.5], paired=True) == (0.5, 0.5)
    assert bootstrap_ci([1.0], [2.0, 3.0]) is None


def member(name: str, bpb: float, per_seq: list[float]) -> Member:
    return Member(
        Path(name),
        "synthetic",
        {"bits_per_byte": bpb, "accuracy": 1 - bpb / 10},
        per_sequence=per_seq,
        sequence_key="same-texts",
        sequence_unit="bits/byte",
        exact={"bits_per_byte": bpb},
    )


def test_compare_groups_finds_the_better_group_with_holm() -> None:
    rng = np.random.default_rng(2)
    texts = rng.normal(1.0, 0.2, 40)

    def group(label: str, shift: float, seeds: int = 4) -> Group:
        members = [
            member(f"{label}/seed{s}", 1.0 + shift + rng.normal(0, 0.01), (texts + shift).tolist())
            for s in range(seeds)
        ]
        return Group(label, members)

    base, better, same = group("ce_only", 0.0), group("kv", -0.1), group("twin", 0.0)
    same.members = [
        member(m.path.name, m.metrics["bits_per_byte"], list(texts)) for m in base.members
    ]
    result = compare_groups([base, better, same])
    rows = {(r["group"], r["metric"]): r for r in result["comparisons"]}
    kv = rows[("kv", "bits_per_byte")]
    assert kv["significant"] == "better" and kv["delta"] == pytest.approx(-0.1, abs=0.02)
    assert rows[("kv", "accuracy")]["significant"] == "better"  # higher is better there
    twin = rows[("twin", "bits_per_byte")]
    assert twin["significant"] == "no" and twin["p"] == pytest.approx(1.0)
    family = [r for r in result["comparisons"] if r["metric"] == "bits_per_byte"]
    assert [r["p_holm"] for r in family] == holm([r["p"] for r in family])
    paired = {r["group"]: r for r in result["paired"]}
    assert paired["kv"]["significant"] == "better" and paired["kv"]["texts"] == 40
    assert paired["twin"]["p"] == 1.0 and paired["twin"]["significant"] == "no"


def test_differences_respect_the_tolerance() -> None:
    a, b = member("a", 1.0, [1.0]), member("b", 1.0 + 1e-9, [1.0])
    assert differences([a, a]) == []
    assert differences([a, b]) and "bits_per_byte" in differences([a, b])[0]
    assert differences([a, b], tolerance=1e-6) == []
