"""Rotary position embedding (RoPE): cos/sin tables from a model's own rotary module, and rotation.

Convention (Llama family, `rotate_half`): of a head's D dims the first `rot_dim` rotate, dim i
paired with dim i + rot_dim/2; dims from `rot_dim` on pass through unchanged (partial rotary:
GPT-NeoX `rotary_pct`, Phi `partial_rotary_factor`). Tables are [B, T, rot_dim], so
`rot_dim = cos.shape[-1]`. Scaling rules (linear, NTK, YaRN, longrope, ...) live in the model's
own rotary module, which is asked for the tables; nothing here re-derives them.

Positions: sequences are right-padded, so position_ids are arange(T) in every row.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

Tables = tuple[torch.Tensor, torch.Tensor]
"""(cos, sin), each [B, T, rot_dim]."""


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions of right-padded rows: mask [B, T] -> arange(T) per row, [B, T] long."""
    b, t = mask.shape
    return torch.arange(t, device=mask.device).expand(b, t)


def rotary_module(model: Any) -> nn.Module:
    """The rotary embedding module of a transformers causal LM (`<base model>.rotary_emb`)."""
    module = getattr(model.base_model, "rotary_emb", None)
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no rotary embedding at "
            f"{model.base_model_prefix}.rotary_emb to un-rotate keys with; for a model without "
            "RoPE set alignment.rope.name: none"
        )
    return module


def layer_type(model: Any, layer: int) -> str | None:
    """The layer's RoPE kind when the rotary module takes one (Gemma3: sliding/full), else None."""
    config = model.config.get_text_config()
    if not 0 <= layer < config.num_hidden_layers:
        raise ValueError(f"layer {layer} out of range [0, {config.num_hidden_layers})")
    if "layer_type" not in inspect.signature(rotary_module(model).forward).parameters:
        return None
    return str(config.layer_types[layer])


def rotary_tables(model: Any, position_ids: torch.Tensor, layer: int) -> Tables:
    """(cos, sin) [B, T, rot_dim] that `layer` of `model` uses at position_ids [B, T].

    Tables come in the model's dtype promoted to at least float32, so that un-rotating bf16 keys
    loses nothing beyond their own rounding.
    """
    module = rotary_module(model)
    kind = layer_type(model, layer)
    dtype = torch.promote_types(model.dtype, torch.float32)
    probe = torch.empty(0, dtype=dtype, device=position_ids.device)
    args = (probe, position_ids) if kind is None else (probe, position_ids, kind)
    with torch.no_grad():
        cos, sin = module(*args)
    return cos, sin


def layer_tables(
    model: Any, position_ids: torch.Tensor, layers: Iterable[int]
) -> dict[int, Tables]:
    """rotary_tables for each of `layers`, computed once per layer type and shared."""
    by_kind: dict[str | None, Tables] = {}
    out: dict[int, Tables] = {}
    for layer in layers:
        kind = layer_type(model, layer)
        if kind not in by_kind:
            by_kind[kind] = rotary_tables(model, position_ids, layer)
        out[layer] = by_kind[kind]
    return out


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE: x [B, H, T, D] with tables [B, T, rot_dim] -> [B, H, T, D] in x's dtype."""
    return _turn(x, cos, sin, inverse=False)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Invert `rotate` exactly: unrotate(rotate(x, cos, sin), cos, sin) == x.

    Each pair is divided by cos² + sin², so tables scaled by an attention factor (YaRN) are undone
    too and the result is the key before RoPE, not a rescaled one.
    """
    return _turn(x, cos, sin, inverse=True)


def _turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inverse: bool) -> torch.Tensor:
    rot = cos.shape[-1]
    if sin.shape != cos.shape or rot % 2 or rot > x.shape[-1]:
        raise ValueError(f"rotary tables {tuple(cos.shape)} do not fit x {tuple(x.shape)}")
    work = torch.promote_types(x.dtype, torch.float32)
    c = cos.unsqueeze(1).to(work)
    s = sin.unsqueeze(1).to(work)
    if inverse:
        norm = c * c + s * s
        c, s = c / norm, -s / norm
    head = x[..., :rot].to(work)
    half = rot // 2
    turned = (head * c + torch.cat((-head[..., half:], head[..., :half]), dim=-1) * s).to(x.dtype)
    if rot == x.shape[-1]:
        return turned
    return torch.cat((turned, x[..., rot:]), dim=-1)
