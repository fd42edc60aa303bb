"""Run under `torchrun --nproc_per_node 2 -m tests.dist_targets SPEC OUT`: on each rank, the
teacher targets of the rank's first two batches from whole teachers, then from the same
teachers sharded (training.teacher_parallel: fsdp); writes OUT/rank{R}.json with whether
each tensor is bit-identical (tests/test_distributed.py reads it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kvd.core.runtime import setup_runtime
from kvd.run.assemble import assemble
from kvd.spec.runspec import load_spec
from kvd.step.targets import TeacherTargets


def tensors(targets: dict[str, TeacherTargets]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for tid, t in targets.items():
        out |= {f"{tid}/k{j}": k for j, k in t.keys.items()}
        out |= {f"{tid}/v{j}": v for j, v in t.values.items()}
        out[f"{tid}/mask"] = t.mask
        for name in ("logits", "ce"):
            value = getattr(t, name)
            if value is not None:
                out[f"{tid}/{name}"] = value
    return out


def main(spec_path: str, out: str) -> None:
    runs = {}
    for placement in ("replicate", "fsdp"):
        spec = load_spec(spec_path, [f"training.teacher_parallel={placement}"])
        runtime = setup_runtime("cpu")
        parts = assemble(spec, runtime, Path(spec_path).parent)
        stage = parts.curriculum.stage
        got: dict[str, torch.Tensor] = {}
        for step in range(2):
            texts, _, batch = parts.batches.next()
            targets = parts.teachers.targets(stage, texts, batch, step=step)
            got |= {f"{step}/{k}": v for k, v in tensors(targets).items()}
        runs[placement] = got
    whole, sharded = runs["replicate"], runs["fsdp"]
    report = {
        "names": sorted(whole),
        "equal": sorted(k for k in whole if k in sharded and torch.equal(whole[k], sharded[k])),
        "sharded_teacher_params": [
            type(p).__name__ for p in parts.teachers.teachers[0].loaded.model.parameters()
        ][:1],
    }
    Path(out, f"rank{runtime.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:3])
