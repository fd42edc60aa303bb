"""Linear CKA between layer features, and the best monotone layer assignment under it.

Linear CKA (Kornblith et al., 2019) of column-centred X [N, F1] and Y [N, F2]:
||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), in [0, 1], invariant to orthogonal transforms and
isotropic scaling of either side, so layers of different widths compare directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _centred(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().to(torch.float64).flatten(1)
    return x - x.mean(dim=0, keepdim=True)


def _self_norm(x: torch.Tensor) -> torch.Tensor:
    """||X^T X||_F = ||X X^T||_F, through the smaller Gram matrix."""
    gram = x.T @ x if x.shape[1] <= x.shape[0] else x @ x.T
    norm: torch.Tensor = torch.linalg.matrix_norm(gram)
    return norm


def _cross(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||Y^T X||_F^2."""
    return (y.T @ x).square().sum()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of features x [N, F1] and y [N, F2] (rows = the same N tokens); 0 when either
    side is constant."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: {x.shape[0]} rows vs {y.shape[0]} rows")
    x, y = _centred(x), _centred(y)
    denom = _self_norm(x) * _self_norm(y)
    return float(_cross(x, y) / denom) if denom > 0 else 0.0


def cka_matrix(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """[Lt, Ls] float64 linear CKA of every teacher layer [N, Ft] with every student layer
    [N, Fs]."""
    xs = [_centred(x) for x in teacher]
    ys = [_centred(y) for y in student]
    rows = {x.shape[0] for x in [*xs, *ys]}
    if len(rows) > 1:
        raise ValueError(f"cka_matrix: features have different row counts {sorted(rows)}")
    x_norm = torch.stack([_self_norm(x) for x in xs]) if xs else torch.zeros(0)
    y_norm = torch.stack([_self_norm(y) for y in ys]) if ys else torch.zeros(0)
    out = torch.zeros(len(xs), len(ys), dtype=torch.float64)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            denom = x_norm[i] * y_norm[j]
            if denom > 0:
                out[i, j] = _cross(x, y) / denom
    return out


def monotone_assignment(score: torch.Tensor) -> list[int]:
    """[Lt, Ls] scores -> for each of the Ls columns a row m(j), non-decreasing in j, maximising
    sum_j score[m(j), j] (dynamic programming, O(Lt * Ls); ties go to the lower row)."""
    table: list[list[float]] = score.to(torch.float64).T.tolist()  # table[j][t]
    if not table:
        return []
    if not table[0]:
        raise ValueError("monotone_assignment: no rows to assign")
    best = table[0]  # best[t]: the best total of columns 0..j with m(j) = t
    back: list[list[int]] = []  # back[j - 1][t]: m(j - 1) on the path to that total
    for column in table[1:]:
        prefix, where = _running_argmax(best)
        back.append(where)
        best = [p + c for p, c in zip(prefix, column, strict=True)]
    rows = [max(range(len(best)), key=best.__getitem__)]
    for where in reversed(back):
        rows.append(where[rows[-1]])
    return rows[::-1]


def _running_argmax(values: list[float]) -> tuple[list[float], list[int]]:
    """Running max of `values` and the first index attaining it."""
    top, arg = values[0], 0
    prefix, where = [], []
    for i, v in enumerate(values):
        if v > top:
            top, arg = v, i
        prefix.append(top)
        where.append(arg)
    return prefix, where
