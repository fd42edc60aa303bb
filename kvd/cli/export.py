"""`kvd export RUN --step N --out DIR [--format onnx]`: a checkpoint's student as an HF model
dir (and an ONNX decoder with its KV cache).

The finished student is already in RUN/student; this writes the student of any kept checkpoint
the same way (portable configs, a model card), never over an existing path.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import torch
import typer
import yaml

from kvd.cli.errors import stdout
from kvd.core.errors import KvdError
from kvd.eval.eval_texts import is_run_dir, run_spec
from kvd.run.checkpoint import (
    is_sharded_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_run_state,
)
from kvd.run.export import write_student
from kvd.run.onnx_export import require_onnx
from kvd.run.parallel import read_sharded_weights
from kvd.sources.build import load_model


class Format(StrEnum):
    """What `kvd export` writes."""

    hf = "hf"
    onnx = "onnx"


PREFIX = "student."
"""The student's weights in a checkpoint (the DistillModel's state dict)."""


def export_command(
    run: Path = typer.Argument(..., metavar="RUN", help="A run dir with checkpoints."),
    out: Path = typer.Option(..., "--out", help="The HF model dir to write (must not exist)."),
    step: int | None = typer.Option(
        None, "--step", min=1, help="The checkpoint's step (default: the newest)."
    ),
    fmt: Format = typer.Option(
        Format.hf,
        "--format",
        help="hf: an HF model dir; onnx: the same plus model.onnx (needs `pip install "
        "'kvd[onnx]'`), checked against torch with onnxruntime.",
    ),
    base_dir: Path = typer.Option(
        Path("."),
        "--base-dir",
        help="Folder that relative paths in the run's spec.yaml start from.",
    ),
) -> None:
    """Write the student of one of a run's checkpoints as an HF model dir with a model card
    (and as ONNX with --format onnx)."""
    if not is_run_dir(run):
        raise KvdError(f"{run}: not a kvd run directory", hint="give the output.dir of a run")
    if out.exists():
        raise KvdError(
            f"--out {out}: already exists; kvd never overwrites it", hint="pick a new path"
        )
    if fmt is Format.onnx:
        require_onnx()
    found, _ = list_checkpoints(run / "checkpoints")
    if not found:
        raise KvdError(f"{run}: has no valid checkpoint to export")
    by_step = {c.step: c for c in found}
    chosen = found[-1] if step is None else by_step.get(step)
    if chosen is None:
        raise KvdError(
            f"--step {step}: {run} has no valid checkpoint of that step",
            hint=f"its checkpoints: steps {', '.join(str(s) for s in by_step)}",
        )
    spec = run_spec(run, base_dir)
    student = load_model(spec.student, torch.device("cpu"), "student", spec.seed)
    if is_sharded_checkpoint(chosen.path):  # read in place into the student's own tensors
        into = {PREFIX + k: v for k, v in student.model.state_dict().items()}
        read_sharded_weights(chosen.path, into)
    else:
        saved = load_checkpoint(chosen.path)["model"]
        weights = {k[len(PREFIX) :]: v for k, v in saved.items() if k.startswith(PREFIX)}
        student.model.load_state_dict(weights, strict=True)
    state = load_run_state(chosen.path)["state"]
    results = {"step": chosen.step, "tokens": state.get("tokens")}
    resolved = yaml.safe_load((run / "spec.resolved.yaml").read_text())
    diff = write_student(out, student, spec, resolved, results, onnx=fmt is Format.onnx)
    stdout().print(
        f"wrote the student of {chosen.path.name} ({json.dumps(results)}) to {out}", markup=False
    )
    if diff is not None:
        stdout().print(
            f"model.onnx: onnxruntime matches torch within {diff:.1e} (largest |logit "
            f"difference| on real text, through the KV cache)",
            markup=False,
        )


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
