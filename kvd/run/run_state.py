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
from kvd.run.checkpoint import load_checkpoint, prune, rng_state, save_checkpoint, set_rng_state
from kvd.run.evaluate import LMMetrics
from kvd.run.parallel import (
    full_model_state,
    full_optimizer_state,
    is_sharded,
    load_full_state,
)
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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.batches.restore(DataState(**state["data"]))
        self.curriculum.set_step(self.step)


class CheckpointManager:
    """Atomic checkpoints of `model`, `optimizer` and `state` in RUN/checkpoints (rank 0
    writes; every rank's RNG goes in), the newest `keep` kept besides the best, recorded in
    RUN/best.json."""

    def __init__(
        self,
        run_dir: Path,
        runtime: Runtime,
        *,
        model: nn.Module,
        optimizer: Optimizer,
        state: RunState,
        keep: int,
    ) -> None:
        self.run_dir = run_dir
        self.root = run_dir / "checkpoints"
        self.rt = runtime
        self.model = model
        self.optimizer = optimizer
        self.state = state
        self.keep = keep
        self.best: tuple[float, Path] | None = None

    def save(self, val_bpb: float | None) -> None:
        """Save the state at the current step; `val_bpb` is its validation bits/byte, if any."""
        rngs: list[Any] = [rng_state()]
        if self.rt.world > 1:
            rngs = [None] * self.rt.world
            dist.all_gather_object(rngs, rng_state())
        if not (self.rt.main or is_sharded(self.model)):
            return
        model = full_model_state(self.model)  # a sharded model's: every rank gathers
        optimizer = full_optimizer_state(self.model, self.optimizer)
        if not self.rt.main:
            return
        step = self.state.step
        state = {**self.state.state_dict(), "val_bits_per_byte": val_bpb, "world": self.rt.world}
        try:
            info = save_checkpoint(
                self.root,
                step,
                model=model,
                optimizer=optimizer,
                state=state,
                rng=rngs,
            )
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

    def restore(self, path: Path) -> None:
        """Load the checkpoint at `path` into the model, optimizer, state and this rank's RNG."""
        saved = load_checkpoint(path)
        load_full_state(self.model, self.optimizer, saved["model"], saved["optimizer"])
        self.state.load_state_dict(saved["state"])
        if len(saved["rng"]) != self.rt.world:
            raise KvdError(
                f"{path}: written by {len(saved['rng'])} process(es), resumed with {self.rt.world}",
                hint="resume with the same number of processes (torchrun --nproc_per_node)",
            )
        set_rng_state(saved["rng"][self.rt.rank])
        best = self.run_dir / "best.json"
        if best.exists():
            info = json.loads(best.read_text())
            self.best = (float(info["val_bits_per_byte"]), path.parent / info["path"])
