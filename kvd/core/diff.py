"""Differences between two JSON-like values, as dotted keys (for spec and cache checks)."""

from __future__ import annotations

from typing import Any


def dotted_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where `a` and `b` differ (mappings are compared key by key)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += dotted_differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if a == b else [prefix or "(top level)"]
