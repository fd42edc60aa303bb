"""Resuming a run: which checkpoint, and whether the spec still describes the same run."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from kvd.core.diff import dotted_differences
from kvd.core.errors import KvdError
from kvd.run.checkpoint import list_checkpoints, verify
from kvd.spec.runspec import RunSpec

HARMLESS_CHANGES = (
    "training.log_every",
    "training.checkpoint_every",
    "training.keep_checkpoints",
    "training.max_nonfinite",
    "training.device",
    "training.teacher_cache",
    "training.teacher_parallel",
    "evaluation",
)
"""Spec keys a resumed run may change: they alter logging and bookkeeping, not the result (a
teacher cache holds exactly the targets the live teachers give, checked by its fingerprint;
sharded teachers give bit-identical targets, tests/test_distributed.py)."""


def check_same_run(
    run_dir: Path, spec: RunSpec, world: int = 1, written: tuple[int, int | None] | None = None
) -> None:
    """A run resumes only with the spec it started with; harmless changes only warn.

    `world`: this job's processes; `written`: (processes, per-process batch) of the job that
    wrote the checkpoint resumed from (kvd.run.checkpoint.written_by), if any. A ddp run
    resumes on as many processes as it had; an fsdp run (sharded checkpoints) on any number,
    provided the global batch (training.batch_size x processes) stays the same, so it sees the
    same batches."""
    stored = run_dir / "spec.resolved.yaml"
    if not stored.exists():
        raise KvdError(f"output.dir {run_dir}: holds a run without spec.resolved.yaml")
    before = yaml.safe_load(stored.read_text(encoding="utf-8"))
    # as today's code reads it: a key added since then gets its default, as the run had; one
    # since renamed or removed fails validation and is compared as stored (and named)
    with contextlib.suppress(ValidationError):
        before = RunSpec.model_validate(before).model_dump(mode="json")
    # output.dir names where the run is, not what it computes (a run dir may be moved)
    changed = [
        k for k in dotted_differences(before, spec.model_dump(mode="json")) if k != "output.dir"
    ]
    harmless = [k for k in changed if k.startswith(HARMLESS_CHANGES)]
    altering = [k for k in changed if k not in harmless and k != BATCH]
    if not altering:
        was, batch = written or (world, None)
        batch = batch or before["training"]["batch_size"]  # a checkpoint that does not say
        _check_global_batch(run_dir, spec, (was, batch), world)
        harmless += [BATCH] if BATCH in changed else []
    if altering:
        raise KvdError(
            f"output.dir {run_dir}: holds a run of a different spec; changed: "
            + ", ".join(altering),
            hint="resume with the run's own spec (spec.yaml in the run dir), or pick another "
            "output.dir",
        )
    if harmless:
        print(f"kvd: warning: resuming with changed {', '.join(harmless)}", file=sys.stderr)


BATCH = "training.batch_size"


def _check_global_batch(run_dir: Path, spec: RunSpec, written: tuple[int, int], now: int) -> None:
    """The resumed job's global batch is the checkpoint's (see `check_same_run`)."""
    (was, before), after = written, spec.training.batch_size
    if was != now and spec.training.parallel == "ddp":
        raise KvdError(
            f"output.dir {run_dir}: its checkpoint was written by {was} process(es), and this "
            f"job has {now}",
            hint="resume ddp runs with the same number of processes (torchrun "
            "--nproc_per_node); fsdp runs' checkpoints load on any number",
        )
    if before * was == after * now:
        return
    fits = before * was % now == 0
    raise KvdError(
        f"{BATCH}: {after} per process x {now} process(es) is a global batch of {after * now}; "
        f"the run in {run_dir} trained with {before * was} ({before} x {was})",
        hint=f"resume with --set {BATCH}={before * was // now}"
        if fits
        else f"resume on a number of processes that divides {before * was}",
    )


def resume_point(run_dir: Path, resume: Path | None) -> Path | None:
    """The checkpoint to resume from: the given one, or the newest valid one in the run."""
    if resume is not None:
        problem = verify(resume)
        if problem:
            raise KvdError(f"--resume {resume}: not a usable checkpoint: {problem}")
        return resume
    valid, invalid = list_checkpoints(run_dir / "checkpoints")
    for path, problem in invalid:
        print(f"kvd: warning: ignoring checkpoint {path}: {problem}", file=sys.stderr)
    return valid[-1].path if valid else None
