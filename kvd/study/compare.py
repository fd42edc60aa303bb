"""`kvd compare`: groups of runs side by side, each against the first group, with significance.

Per metric: mean ± std over a group's runs (seeds), the difference from the first group with a
95% bootstrap interval (resampling runs), and Welch's t-test across seeds. Per group, when both
sides were scored on the same texts: the paired Wilcoxon signed-rank test on per-sequence values
(bits per byte from `kvd eval`, else NLL from results.json; each side averaged over its seeds)
with a paired bootstrap interval. p-values are Holm-corrected over the groups compared with the
first, one family per metric and test.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kvd.study.runs import Group, Member
from kvd.study.stats import bootstrap_ci, holm, summarize, welch, wilcoxon


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    lower_is_better: bool
    digits: int


METRICS = (
    Metric("bits_per_byte", "bits/byte", True, 4),
    Metric("perplexity", "perplexity", True, 2),
    Metric("accuracy", "next-token acc", False, 4),
    Metric("cloze_accuracy", "cloze acc", False, 4),
    Metric("train_tokens_per_s", "train tok/s", False, 0),
    Metric("train_peak_mem_mb", "train peak MB", True, 0),
    Metric("eval_tokens_per_s", "eval tok/s", False, 0),
    Metric("eval_peak_mem_mb", "eval peak MB", True, 0),
)
BY_KEY = {m.key: m for m in METRICS}


def metrics_of(groups: list[Group]) -> list[Metric]:
    """METRICS, then the members' other metrics (lm-eval's `lm_eval/TASK/METRIC`, by name)."""
    extra: dict[str, bool] = {}
    for g in groups:
        for m in g.members:
            extra |= m.higher_is_better
    added = [Metric(k, k.removeprefix("lm_eval/"), not extra[k], 4) for k in sorted(extra)]
    return [*METRICS, *(m for m in added if m.key not in BY_KEY)]


def values(group: Group, key: str) -> list[float]:
    return [float(m.metrics[key]) for m in group.members if m.metrics.get(key) is not None]


def paired_values(group: Group) -> tuple[np.ndarray, str, str] | None:
    """The group's per-sequence values averaged over its members, their texts key and unit;
    None unless every member has them for the same texts."""
    keys = {(m.sequence_key, m.sequence_unit) for m in group.members}
    rows = [m.per_sequence for m in group.members]
    if len(keys) != 1 or any(r is None for r in rows):
        return None
    (key, unit), arrays = next(iter(keys)), [np.asarray(r, dtype=float) for r in rows]
    if key is None or len({a.shape for a in arrays}) != 1:
        return None
    return np.mean(arrays, axis=0), key, unit


def _verdict(delta: float, adjusted: float | None, alpha: float, lower_is_better: bool) -> str:
    if adjusted is None:
        return "n/a"
    if adjusted >= alpha:
        return "no"
    return "better" if (delta < 0) == lower_is_better else "worse"


def compare_groups(groups: list[Group], *, alpha: float = 0.05) -> dict[str, Any]:
    """The comparison as JSON-ready data: groups, per-metric and paired comparisons."""
    base = groups[0]
    metrics = metrics_of(groups)
    summary = []
    for g in groups:
        stats: dict[str, Any] = {}
        for metric in metrics:
            vals = values(g, metric.key)
            if vals:
                s = summarize(vals)
                stats[metric.key] = {"mean": s.mean, "std": s.std, "n": s.n, "values": vals}
        summary.append(
            {
                "label": g.label,
                "runs": [str(m.path) for m in g.members],
                "sources": sorted({m.source for m in g.members}),
                "metrics": stats,
            }
        )
    rows: list[dict[str, Any]] = []
    for g in groups[1:]:
        for metric in metrics:
            a, b = values(base, metric.key), values(g, metric.key)
            if not a or not b:
                continue
            delta = float(np.mean(b) - np.mean(a))
            rows.append(
                {
                    "group": g.label,
                    "metric": metric.key,
                    "baseline": float(np.mean(a)),
                    "mean": float(np.mean(b)),
                    "delta": delta,
                    "relative": delta / abs(float(np.mean(a))) if np.mean(a) else math.nan,
                    "ci95": bootstrap_ci(a, b),
                    "p": welch(a, b),
                }
            )
    for metric in metrics:
        family = [r for r in rows if r["metric"] == metric.key]
        for row, adjusted in zip(family, holm([r["p"] for r in family]), strict=True):
            row["p_holm"] = adjusted
            row["significant"] = _verdict(row["delta"], adjusted, alpha, metric.lower_is_better)
    paired = _paired(base, groups[1:], alpha)
    return {
        "baseline": base.label,
        "alpha": alpha,
        "metrics": [asdict(m) for m in metrics],
        "groups": summary,
        "comparisons": rows,
        "paired": paired,
    }


def _paired(base: Group, others: list[Group], alpha: float) -> list[dict[str, Any]]:
    """Per-sequence paired tests of each group against the baseline (see module docstring)."""
    ref = paired_values(base)
    out: list[dict[str, Any]] = []
    for g in others:
        mine = paired_values(g)
        if ref is None or mine is None or (ref[1], ref[2]) != (mine[1], mine[2]):
            out.append({"group": g.label, "texts": 0, "reason": "not scored on the same texts"})
            continue
        a, b = ref[0], mine[0]
        out.append(
            {
                "group": g.label,
                "texts": int(a.size),
                "unit": ref[2],
                "delta": float(np.mean(b - a)),
                "ci95": bootstrap_ci(a.tolist(), b.tolist(), paired=True),
                "p": wilcoxon(a.tolist(), b.tolist()),
            }
        )
    tested = [r for r in out if "p" in r]
    for row, adjusted in zip(tested, holm([r["p"] for r in tested]), strict=True):
        row["p_holm"] = adjusted
        row["significant"] = _verdict(row["delta"], adjusted, alpha, True)
    return out


# --- reproducibility -------------------------------------------------------------------------


def differences(members: list[Member], tolerance: float = 0.0) -> list[str]:
    """Where each member's metrics differ from the first one's (numbers within `tolerance`,
    absolute or relative, count as equal); empty when all are identical."""
    first = members[0]
    found: list[str] = []
    for m in members[1:]:
        found += [f"{m.path} vs {first.path}: {w}" for w in _diff(first.exact, m.exact, tolerance)]
    return found


def _diff(a: Any, b: Any, tol: float, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            here = f"{where}.{key}" if where else str(key)
            if key not in a or key not in b:
                out.append(f"{here}: only in one")
            else:
                out += _diff(a[key], b[key], tol, here)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} entries"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _diff(x, y, tol, f"{where}[{i}]")
        ]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        same = a == b or math.isclose(a, b, rel_tol=tol, abs_tol=tol)
        return [] if same else [f"{where}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]
