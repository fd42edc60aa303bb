"""The statistics of `kvd compare`: summaries, tests and intervals, all from scipy.

- across seeds: Welch's t-test (unequal variances) on a metric's per-seed values;
- on the same texts: the Wilcoxon signed-rank test on paired per-sequence values (each side's
  values averaged over its seeds first);
- bootstrap percentile intervals of a mean difference (scipy.stats.bootstrap, fixed seed);
- Holm's step-down correction of a family of p-values.

Degenerate inputs give defined answers instead of NaN: two identical constant samples (or all
paired differences 0) have p = 1; a test that needs more data than there is gives None.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (ddof 1; 0 for one value) and count."""

    mean: float
    std: float
    n: int


def summarize(values: Sequence[float]) -> Summary:
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return Summary(math.nan, math.nan, 0)
    return Summary(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0, int(x.size))


def welch(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test of mean(a) == mean(b); None with fewer than 2 values
    on a side."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size < 2 or y.size < 2:
        return None
    if np.ptp(x) == 0 and np.ptp(y) == 0 and x[0] == y[0]:
        return 1.0
    with warnings.catch_warnings():  # nearly equal samples: scipy warns, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(x, y, equal_var=False).pvalue)


def wilcoxon(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of the Wilcoxon signed-rank test of paired a[i] - b[i] around 0; None
    with fewer than 2 pairs."""
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if diff.size < 2:
        return None
    if not diff.any():
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.wilcoxon(diff).pvalue)


def _mean(d: np.ndarray, axis: int) -> np.ndarray:
    return np.asarray(np.mean(d, axis=axis))


def _mean_difference(u: np.ndarray, v: np.ndarray, axis: int) -> np.ndarray:
    return np.asarray(np.mean(v, axis=axis) - np.mean(u, axis=axis))


def bootstrap_ci(
    a: Sequence[float], b: Sequence[float], *, paired: bool = False, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of mean(b) - mean(a) (of mean(b[i] - a[i]) when paired);
    None with fewer than 2 values on a side; a constant difference gives a zero-width one."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size < 2 or y.size < 2:
        return None
    samples = (y - x,) if paired else (x, y)
    if all(np.ptp(s) == 0 for s in samples):
        constant = float(samples[0][0]) if paired else float(y[0] - x[0])
        return constant, constant
    result = stats.bootstrap(
        samples,
        _mean if paired else _mean_difference,
        confidence_level=level,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(BOOTSTRAP_SEED),
    )
    low, high = result.confidence_interval
    return float(low), float(high)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values of one family (None entries are left out of the family)."""
    present = [(p, i) for i, p in enumerate(pvalues) if p is not None]
    adjusted: list[float | None] = [None] * len(pvalues)
    m = len(present)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted
