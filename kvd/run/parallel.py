"""How the learned parts are spread over the processes of a torchrun job (`training.parallel`).

- `ddp`: every process holds the whole DistillModel (student, projectors, fusion, losses);
  DistributedDataParallel all-reduces the gradients.
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`): each of the student's decoder layers
  (the classes transformers lists in `_no_split_modules`) is a group of its own, the rest of
  the student (embeddings, final norm, head) another, and projectors, fusion and losses the
  root group; parameters, gradients and AdamW's
  state are each 1/world per process, gathered a group at a time for forward and backward.

Checkpoints hold full tensors in both (gathered by every rank, written by rank 0), so the files
of an `fsdp` run look like those of a `ddp` one apart from the optimizer state, which is keyed
by parameter name; a run resumes with the parallelism it was written with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from kvd.core.runtime import Runtime

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Whole tensors on the CPU, gathered from every rank's shards (a collective: all ranks call)."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of a transformers model that transformers itself never splits across devices
    (`_no_split_modules`: its decoder layers), in order."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def distribute(model: nn.Module, runtime: Runtime, parallel: str, *, multi_stage: bool) -> Any:
    """The module the step calls: `model` itself on one process, else wrapped for `parallel`
    (`fsdp` shards `model` in place and returns it). `multi_stage`: some parameters sit out
    some stages (DDP must look for unused parameters)."""
    if runtime.world == 1:
        return model
    dev = runtime.device
    if parallel == "fsdp":
        mesh = init_device_mesh(dev.type, (runtime.world,))
        student = getattr(model, "student", model)
        for layer in decoder_layers(student):
            fully_shard(layer, mesh=mesh)
        fully_shard(student, mesh=mesh)  # a group of its own: validation calls it directly
        fully_shard(model, mesh=mesh)
        return model
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[dev.index] if dev.type == "cuda" else None,
        find_unused_parameters=multi_stage,
    )


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_model_state(model: nn.Module) -> dict[str, Any]:
    """The model's state with whole tensors; for a sharded model every rank must call it."""
    if is_sharded(model):
        return dict(get_model_state_dict(model, options=FULL))
    return model.state_dict()


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state: as `optimizer.state_dict()` for a whole model, keyed by parameter
    name with whole tensors for a sharded one (every rank must call it then)."""
    if is_sharded(model):
        return get_optimizer_state_dict(model, optimizer, options=FULL)
    return optimizer.state_dict()


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
) -> None:
    """Load whole-tensor states (from `full_model_state`, `full_optimizer_state`); each rank of
    a sharded model keeps its own shard of each tensor."""
    if is_sharded(model):
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=options)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
        return
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of a DTensor, else the tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def whole(t: torch.Tensor) -> torch.Tensor:
    """A reduced DTensor (a sharded model's gradient norm) as a plain tensor on every rank."""
    return t.full_tensor() if isinstance(t, DTensor) else t
