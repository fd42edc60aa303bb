"""Where a run executes: device and process group (torchrun), and preemption by signal."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kvd.core.errors import KvdError
from kvd.core.types import TokenBatch


@dataclass
class Runtime:
    """Where this process runs: device and its rank among `world` processes."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


class Preempted(KvdError):
    """The run was asked to stop (SIGTERM, SIGUSR1) and saved a checkpoint first."""

    exit_code = 143


class PreemptionFlag:
    """Within the block, SIGTERM and SIGUSR1 (SLURM's warning) only record themselves, so the
    loop can save at the next step boundary; the previous handlers come back afterwards."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextmanager
def oom_guard(what: str, batch: TokenBatch, device: torch.device, step: int) -> Iterator[None]:
    """Out of memory becomes an error naming the model and the batch (input_ids [B, T]) at
    optimizer step `step` (0-based), not a traceback."""
    try:
        yield
    except torch.OutOfMemoryError:
        b, t = batch.input_ids.shape
        raise KvdError(
            f"out of memory in {what} on {device} with a batch of {b} x {t} tokens "
            f"(step {step + 1})",
            hint="lower training.batch_size (raise grad_accum to keep the batch), "
            "data.seq_len, use dtype: bfloat16 for teachers, or activation_checkpointing",
        ) from None


def resolve_device(device: str, local_rank: int) -> torch.device:
    """`auto`: this process's GPU (cuda:LOCAL_RANK) if there is one, else the CPU; `cuda`
    without an index: cuda:LOCAL_RANK (torch.cuda.set_device needs the index)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


_OPENED: set[Any] = set()  # the process group setup_runtime opened, if it did


def setup_runtime(device: str) -> Runtime:
    """Device and process group: under torchrun (WORLD_SIZE > 1) NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        _OPENED.add(dist.group.WORLD)
    return Runtime(dev, rank, world)


def node_first(rt: Runtime, action: Callable[[], None]) -> None:
    """Run `action` in every process, in the node's first process (LOCAL_RANK 0) before the
    others: what it puts in kvd's cache (a converted teacher) is then there for them, so a node
    converts once, not once per process at the same time. An error in the first process ends it
    before the barrier, and torchrun then stops the others."""
    if rt.world == 1 or not dist.is_initialized():
        action()
        return
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if first:
        action()
    dist.barrier()
    if not first:
        action()


def close_process_group(clean: bool) -> None:
    """Close the process group setup_runtime opened (a caller's own is left alone), before the
    process exits: a gloo group left to interpreter exit can abort the process (SIGABRT,
    `terminate called without an active exception`) while its worker threads still hold work.
    `clean` (every rank ends its command): wait for all ranks first, so no peer's last messages
    are in flight; else (an error on this rank) close this rank's side at once."""
    if not dist.is_initialized() or dist.group.WORLD not in _OPENED:
        return
    if clean:
        dist.barrier()
    _OPENED.clear()
    dist.destroy_process_group()


# --- building the run ---------------------------------------------------------------------------
