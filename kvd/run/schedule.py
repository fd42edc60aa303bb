"""Learning-rate schedule: linear warmup, then cosine decay to `min_ratio` (or constant)."""

from __future__ import annotations

import math


def lr_factor(
    step: int, *, warmup: int, total: int, schedule: str = "cosine", min_ratio: float = 0.1
) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
