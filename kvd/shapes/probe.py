"""`kvd check-shapes --probe`: run each model briefly and hold its KV cache to the geometry.

A model with real weights (hf, gguf, pypi) runs as it is; a preset runs as its tiny variant (same
heads, head_dim, RoPE and layer types, few small layers). A short forward with use_cache=True
gives `out.cache.layers[i].keys / .values` of shape [B, n_kv, T, head_dim]; every layer is
compared with what the geometry predicts, so a geometry that read num_attention_heads where
num_key_value_heads was meant is caught before any training.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvd.spec.geometry import SLIDING, ModelGeometry
from kvd.spec.models import ModelSource

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeMismatch:
    """One cached tensor whose shape differs from the prediction (layer -1: the layer count)."""

    model: str
    layer: int
    tensor: str
    expected: Shape
    actual: Shape

    def __str__(self) -> str:
        if self.layer < 0:
            return (
                f"{self.model}: geometry predicts {self.expected[0]} cached layers, "
                f"the cache has {self.actual[0]}"
            )
        return (
            f"{self.model}: layer {self.layer} {self.tensor}: geometry predicts "
            f"{list(self.expected)}, the cache has {list(self.actual)}"
        )


@dataclass(frozen=True)
class ProbeResult:
    """What one probe ran (`weights`: real or tiny random), how many layers it checked, and how."""

    model: str
    weights: str
    layers_checked: int
    mismatches: list[ShapeMismatch]
    seconds: float


def expected_shape(geometry: ModelGeometry, layer: int, batch: int, seq_len: int) -> Shape:
    """[B, n_kv, T, head_dim] of layer `layer`'s cached K (and V) after one forward of T tokens.

    A sliding-window layer keeps only the last window - 1 tokens (transformers 5's
    DynamicSlidingWindowLayer).
    """
    cached = seq_len
    if geometry.layer_types[layer] == SLIDING and geometry.sliding_window:
        cached = min(seq_len, geometry.sliding_window - 1)
    return (batch, geometry.num_kv_heads, cached, geometry.head_dim)


def compare_cache(
    model: str,
    cache: Any,
    geometry: ModelGeometry,
    *,
    layers: Sequence[int],
    batch: int,
    seq_len: int,
) -> list[ShapeMismatch]:
    """Mismatches between `cache.layers[j]` and `geometry`'s layer `layers[j]`, for every j."""
    cached = list(cache.layers)
    if len(cached) != len(layers):
        return [ShapeMismatch(model, -1, "layers", (len(layers),), (len(cached),))]
    mismatches = []
    for entry, layer in zip(cached, layers, strict=True):
        want = expected_shape(geometry, layer, batch, seq_len)
        for name in ("keys", "values"):
            got = tuple(getattr(entry, name).shape)
            if got != want:
                mismatches.append(ShapeMismatch(model, layer, name, want, got))
    return mismatches


def probe_model(
    model: str,
    source: ModelSource,
    geometry: ModelGeometry,
    *,
    batch: int = 1,
    seq_len: int = 8,
) -> ProbeResult:
    """Load `source` (a preset as its tiny variant), run `seq_len` random token ids, compare."""
    from kvd.sources.preset import PresetSource
    from kvd.sources.tiny import TinySource

    start = time.perf_counter()
    runnable: ModelSource = source
    layers: list[int] = list(range(geometry.num_layers))
    weights = "random weights" if isinstance(source, TinySource) else "real weights"
    if isinstance(source, PresetSource):
        runnable, layers = source.tiny_variant()
        weights = f"tiny random, layers {layers} of {geometry.num_layers}"
    loaded = runnable.load(device=torch.device("cpu"), dtype=torch.float32)
    vocab = int(loaded.model.get_input_embeddings().num_embeddings)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    with torch.no_grad():
        out = loaded.model(input_ids=ids, use_cache=True)
    mismatches = compare_cache(
        model, out.cache, geometry, layers=layers, batch=batch, seq_len=seq_len
    )
    return ProbeResult(model, weights, len(layers), mismatches, time.perf_counter() - start)
