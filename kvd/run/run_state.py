"""What a run carries from step to step, and the checkpoints that save and restore it.

`CheckpointManager` owns save/restore the way torchtitan's does: it is given the stateful
parts once (the trained model, the optimizer, the run state) and saves or restores all of them
together with every rank's RNG, keeping the best checkpoint by validation bits/byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from kvd.core.errors import KvdError
from kvd.core.files import json_text, write_atomic
from kvd.core.runtime import Runtime
from kvd.data.batches import StudentBatches
from kvd.data.packing import DataState
from kvd.run.checkpoint import (
    finish,
    is_sharded_checkpoint,
    load_checkpoint,
    load_run_state,
    prune,
    rng_state,
    set_rng_state,
    staging,
    write_whole,
)
from kvd.run.evaluate import LMMetrics
from kvd.run.parallel import load_sharded, save_sharded
from kvd.step.curriculum import Curriculum


@dataclass
class RunState:
    """The loop's counters and positions: optimizer steps and tokens done, non-finite steps in
    a row, the latest validation (step, metrics); with the data position and the curriculum
    stage, what `state_dict` saves."""

    batches: StudentBatches
    curriculum: Curriculum
    step: int = 0
    tokens: int = 0
    nonfinite: int = 0
    validated: tuple[int, LMMetrics] | None = None

    def state_dict(self) -> dict[str, Any]:
        data = self.batches.state
        return {
            "tokens": self.tokens,
            "data": {"epoch": data.epoch, "position": data.position},
            "stage": self.curriculum.index,
            "batch_size": self.batches.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.batches.restore(DataState(**state["data"]))
        self.curriculum.set_step(self.step)


class CheckpointManager:
    """Atomic checkpoints of `model`, `optimizer` and `state` in RUN/checkpoints, with every
    rank's RNG, the newest `keep` kept besides the best, recorded in RUN/best.json.

    `sharded`: write torch.distributed.checkpoint files (each rank its own shards; loadable by
    any number of processes), as `training.parallel: fsdp` does; else whole tensors, which
    rank 0 writes. Rank 0 writes the rest and completes the checkpoint."""

    def __init__(
        self,
        run_dir: Path,
        runtime: Runtime,
        *,
        model: nn.Module,
        optimizer: Optimizer,
        state: RunState,
        keep: int,
        sharded: bool,
    ) -> None:
        self.run_dir = run_dir
        self.root = run_dir / "checkpoints"
        self.rt = runtime
        self.model = model
        self.optimizer = optimizer
        self.state = state
        self.keep = keep
        self.sharded = sharded
        self.best: tuple[float, Path] | None = None

    def save(self, val_bpb: float | None) -> None:
        """Save the state at the current step; `val_bpb` is its validation bits/byte, if any."""
        step = self.state.step
        rngs: list[Any] = [rng_state()]
        if self.rt.world > 1:
            rngs = [None] * self.rt.world
            dist.all_gather_object(rngs, rng_state())
        try:
            paths = self._tensors(step)
            if paths is None:  # not rank 0
                return
            state = {
                **self.state.state_dict(),
                "val_bits_per_byte": val_bpb,
                "world": self.rt.world,
            }
            info = finish(*paths, state=state, rng=rngs)
        except OSError as exc:
            raise KvdError(
                f"could not write the step-{step} checkpoint in {self.root}: {exc}; the previous "
                "checkpoints are intact",
                hint="free disk space, then run the same command again to resume",
            ) from None
        if val_bpb is not None and (self.best is None or val_bpb < self.best[0]):
            self.best = (val_bpb, info.path)
            write_atomic(
                self.run_dir / "best.json",
                json_text({"step": step, "val_bits_per_byte": val_bpb, "path": info.path.name}),
            )
        prune(self.root, self.keep, {self.best[1]} if self.best else set())

    def _tensors(self, step: int) -> tuple[Path, Path] | None:
        """Write the model's and optimizer's tensors into the step's temporary folder (a
        collective when sharded); on rank 0 (temporary folder, final path), else None."""
        paths = [staging(self.root, step) if self.rt.main else None]
        if self.sharded:
            if self.rt.world > 1:  # every rank writes into the folder rank 0 made
                dist.broadcast_object_list(paths, src=0)
            assert paths[0] is not None
            save_sharded(self.model, self.optimizer, paths[0][0])
        elif paths[0] is not None:
            write_whole(paths[0][0], self.model.state_dict(), self.optimizer.state_dict())
        return paths[0] if self.rt.main else None

    def restore(self, path: Path) -> None:
        """Load the checkpoint at `path` into the model, optimizer, state and RNG. A sharded
        checkpoint loads on any number of processes; rank r takes the RNG rank r saved (a rank
        the checkpoint did not have keeps its own)."""
        if is_sharded_checkpoint(path) != self.sharded:
            kinds = ("whole-tensor", "sharded (DCP)")
            raise KvdError(
                f"{path}: a {kinds[is_sharded_checkpoint(path)]} checkpoint, and this run "
                f"writes {kinds[self.sharded]} ones",
                hint="resume with the run's own training.parallel",
            )
        saved = load_run_state(path)
        if self.sharded:
            load_sharded(self.model, self.optimizer, path)
        else:
            whole = load_checkpoint(path)
            self.model.load_state_dict(whole["model"])
            self.optimizer.load_state_dict(whole["optimizer"])
        self.state.load_state_dict(saved["state"])
        if self.rt.rank < len(saved["rng"]):
            set_rng_state(saved["rng"][self.rt.rank])
        best = self.run_dir / "best.json"
        if best.exists():
            info = json.loads(best.read_text())
            self.best = (float(info["val_bits_per_byte"]), path.parent / info["path"])
