"""How the learned parts are spread over the processes of a torchrun job (`training.parallel`).

- `ddp`: every process holds the whole DistillModel (student, projectors, fusion, losses);
  DistributedDataParallel all-reduces the gradients.
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`): each of the student's decoder layers
  (the classes transformers lists in `_no_split_modules`) is a group of its own, the rest of
  the student (embeddings, final norm, head) another, and projectors, fusion and losses the
  root group; parameters, gradients and AdamW's state are each 1/world per process, gathered
  a group at a time for forward and backward. With `training.precision: bf16` the student's
  gathered weights are bf16 and its gradients are reduced in fp32 (the sharded weights and
  AdamW stay fp32); `training.cpu_offload` keeps the shards in CPU memory.

Checkpoints of a `ddp` run hold whole tensors (written by rank 0). A sharded run writes
torch.distributed.checkpoint (DCP) files: each rank writes its own shards, nothing is gathered,
and a later job with another number of processes reshards them as it loads (`load_sharded`;
one process loads them into a whole model). A run resumes with the parallelism it was written
with.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from kvd.core.runtime import Runtime
from kvd.modeling.sharding import decoder_layers, process_mesh
from kvd.spec.runspec import TrainingSpec

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Whole tensors on the CPU, gathered from every rank's shards (a collective: all ranks call)."""


def distribute(
    model: nn.Module,
    runtime: Runtime,
    training: TrainingSpec,
    *,
    multi_stage: bool,
) -> Any:
    """The module the step calls: `model` itself on one process, else wrapped for
    `training.parallel` (`fsdp` shards `model` in place and returns it). `multi_stage`: some
    parameters sit out some stages (DDP must look for unused parameters)."""
    if runtime.world == 1:
        return model
    dev = runtime.device
    if training.parallel == "fsdp":
        mesh = process_mesh(dev.type, runtime.world)
        offload = OffloadPolicy()
        if training.cpu_offload:
            offload = CPUOffloadPolicy(pin_memory=dev.type == "cuda")
        mixed = MixedPrecisionPolicy()
        if training.precision == "bf16":  # bf16 compute weights, fp32 gradient reduction
            mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        student = getattr(model, "student", model)
        for layer in decoder_layers(student):
            fully_shard(layer, mesh=mesh, mp_policy=mixed, offload_policy=offload)
        # the student is a group of its own: validation calls it directly
        fully_shard(student, mesh=mesh, mp_policy=mixed, offload_policy=offload)
        fully_shard(model, mesh=mesh, offload_policy=offload)  # projectors, fusion, losses: fp32
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


@contextmanager
def _one_process_ok() -> Iterator[None]:
    """Silence DCP's warning that it runs in a single process: kvd means it (no_dist)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Write the model's and optimizer's states to `folder` in DCP format: each rank its own
    shards (every rank must call; `folder` is on a file system all ranks share)."""
    state = {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }
    with _one_process_ok():
        dcp_save(state, checkpoint_id=folder, no_dist=not dist.is_initialized())


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load DCP states written by `save_sharded` with any number of processes: each rank reads
    the parts of each tensor it holds (a whole model on one process reads whole tensors)."""
    model_state = get_model_state_dict(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer)
    states = {"model": model_state, "optimizer": optimizer_state}
    with _one_process_ok():
        dcp_load(states, checkpoint_id=folder, no_dist=not dist.is_initialized())
    set_model_state_dict(model, model_state)
    set_optimizer_state_dict(model, optimizer, optimizer_state)


def read_sharded_weights(folder: Path, into: dict[str, torch.Tensor]) -> None:
    """Fill the tensors of `into` (named as in the run's model state, e.g.
    `student.lm_head.weight`) in place from the sharded checkpoint in `folder`, in one process."""
    with _one_process_ok():
        dcp_load({"model": into}, checkpoint_id=folder, no_dist=True)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of a DTensor, else the tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def whole(t: torch.Tensor) -> torch.Tensor:
    """A reduced DTensor (a sharded model's gradient norm) as a plain tensor on every rank."""
    return t.full_tensor() if isinstance(t, DTensor) else t
