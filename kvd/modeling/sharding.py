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
    # a sharded layer's class is FSDP's subclass of the layer's (FSDPLlamaDecoderLayer)
    return [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]


def process_mesh(device_type: str, world: int) -> DeviceMesh:
    """A one-dimensional mesh over all `world` processes."""
    return init_device_mesh(device_type, (world,))


def untied_embeddings(model: Any) -> list[nn.Module]:
    """The input embeddings and the LM head of a transformers model (those it has) when they
    share no parameter, else [] (tied: one weight, which cannot be in two FSDP groups)."""
    found = [model.get_input_embeddings(), model.get_output_embeddings()]
    modules = [m for m in found if isinstance(m, nn.Module)]
    params = [{id(p) for p in m.parameters()} for m in modules]
    return [] if len(params) == 2 and params[0] & params[1] else modules


def shard_frozen(model: Any, mesh: DeviceMesh) -> None:
    """Shard a frozen (inference-only) model in place, each process keeping 1/world of every
    weight: each decoder layer a group, the input embeddings and the LM head a group each when
    untied (`untied_embeddings`), the rest (final norm; tied embeddings) the root group. A
    forward gathers each group around its module's call only (reshard_after_forward), the
    root's call being the whole forward: a process holds its shards, the root group and the
    group running, twice (FSDP frees the all-gather buffer a group is copied out of at the next
    group's gather). A tied pair stays in the root: `fully_shard([embeddings, head])` would gather
    at the first call and free after the last, i.e. also for the whole forward. Buffers (RoPE's
    inv_freq) stay whole. Every process must run the same forwards in the same order (each
    gather is a collective)."""
    for module in [*decoder_layers(model), *untied_embeddings(model)]:
        fully_shard(module, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
