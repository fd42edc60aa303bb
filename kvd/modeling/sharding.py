"""Sharding a transformers model over the processes of a torchrun job with FSDP2, one decoder
layer per group: the student when `training.parallel: fsdp` (kvd.run.parallel), a frozen
teacher when `training.teacher_parallel: fsdp`."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of a transformers model that transformers itself never splits across devices
    (`_no_split_modules`: its decoder layers), in order."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def process_mesh(device_type: str, world: int) -> DeviceMesh:
    """A one-dimensional mesh over all `world` processes."""
    return init_device_mesh(device_type, (world,))


def shard_frozen(model: Any, mesh: DeviceMesh) -> None:
    """Shard a frozen (inference-only) model in place: each decoder layer a group, the rest
    (embeddings, final norm, LM head) another. Each process keeps 1/world of every weight; a
    forward gathers one group at a time and frees it right after (reshard_after_forward), so a
    process holds its shards plus one gathered group. Buffers (RoPE's inv_freq) stay whole.
    Every process must run the same forwards in the same order (each gather is a collective)."""
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
