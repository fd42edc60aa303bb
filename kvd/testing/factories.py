"""Small, deterministic inputs for plugin tests: tiny random causal LMs and synthetic KV.

Shapes: N teachers, B batch, H KV heads, T positions, D head_dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvd.core.types import KVBundle
from kvd.fusion import FusionInput
from kvd.sources.tiny import TinySource
from kvd.spec.models import LoadedModel


def tiny_lm_config(
    model_type: str = "llama",
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    **extra: Any,
) -> dict[str, Any]:
    """An inline HF config, as `source: tiny` takes it under `config:` in a spec.

    hidden_size is heads * head_dim and intermediate_size twice that; `extra` adds or overrides
    keys (e.g. `rope_theta`). Suits model types whose config takes num_key_value_heads and
    head_dim: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, olmo2, ...
    """
    hidden = heads * head_dim
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        **extra,
    }


def tiny_causal_lm(
    model_type: str = "llama",
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **extra: Any,
) -> LoadedModel:
    """A random-weight causal LM (eval mode, CPU) with kvd's byte-level tokenizer and geometry.

    Its K and V are [B, kv_heads, T, head_dim] at each of `layers` layers; the same arguments
    give the same weights. Save it as an HF directory with `loaded.model.save_pretrained(dir)`
    and `loaded.tokenizer.save_pretrained(dir)`.
    """
    config = tiny_lm_config(
        model_type, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim, **extra
    )
    source = TinySource(TinySource.Config(config=config, seed=seed, name=f"tiny {model_type}"))
    loaded = source.load(device=torch.device("cpu"), dtype=dtype)
    g = loaded.geometry
    got = (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim)
    if got != (layers, heads, kv_heads, head_dim):
        raise ValueError(
            f"model_type {model_type!r} ignores part of layers/heads/kv_heads/head_dim "
            f"{(layers, heads, kv_heads, head_dim)}: its geometry is {got}"
        )
    return loaded


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kv_bundle(
    *,
    batch: int = 2,
    heads: int = 2,
    seq: int = 6,
    head_dim: int = 8,
    layers: Sequence[int] = (0, 1),
    pad: int = 1,
    pre_rope: bool = False,
    seed: int = 0,
) -> KVBundle:
    """Random keys and values [B, H, T, D] for each of `layers`; the last row of the batch is
    right-padded by `pad` positions (mask False there, K/V 0 there)."""
    gen = _generator(seed)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    if pad:
        mask[-1, seq - pad :] = False
    keep = mask[:, None, :, None]

    def tensor() -> torch.Tensor:
        return torch.randn(batch, heads, seq, head_dim, generator=gen) * keep

    keys = [tensor() for _ in layers]
    values = [tensor() for _ in layers]
    return KVBundle(keys, values, list(layers), mask, pre_rope=pre_rope)


def fusion_input(
    *,
    teachers: int = 3,
    batch: int = 2,
    heads: int = 2,
    seq: int = 6,
    head_dim: int = 8,
    layer: int = 0,
    n_tasks: int = 2,
    teacher_ce: bool = False,
    seed: int = 0,
) -> FusionInput:
    """A FusionInput of random teacher KV [N, B, H, T, D] and student KV [B, H, T, D].

    The mask [N, B, T] has the gaps a real batch has: the last teacher (when N > 1) has no
    aligned token at the first two positions, and no teacher is valid at the last position of
    the last row (padding); invalid teacher KV is 0, as the trainer passes it. Task ids [B] are
    drawn from [0, n_tasks) (None when n_tasks is 0); `teacher_ce` adds a random per-sequence CE
    [N, B].
    """
    gen = _generator(seed)
    mask = torch.ones(teachers, batch, seq, dtype=torch.bool)
    if teachers > 1:
        mask[-1, :, : min(2, seq)] = False
    mask[:, -1, -1] = False
    teacher = torch.randn(teachers, batch, heads, seq, head_dim, generator=gen)
    teacher = teacher * mask[:, :, None, :, None]
    student = torch.randn(batch, heads, seq, head_dim, generator=gen)
    task = torch.randint(0, n_tasks, (batch,), generator=gen) if n_tasks else None
    ce = torch.rand(teachers, batch, generator=gen) * 5 if teacher_ce else None
    return FusionInput(teacher, student, mask, layer, task=task, teacher_ce=ce)


class KVFactory:
    """The `kv_bundle` fixture: `kv_bundle(...)` gives a `KVBundle` (see `kv_bundle`),
    `kv_bundle.fusion_input(...)` a `FusionInput` (see `fusion_input`)."""

    def __call__(self, **shape: Any) -> KVBundle:
        return kv_bundle(**shape)

    def fusion_input(self, **shape: Any) -> FusionInput:
        return fusion_input(**shape)
