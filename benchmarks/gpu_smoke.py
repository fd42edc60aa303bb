"""The check to run first on a GPU: a few kvd steps on the device, their host syncs, speed and
peak memory against the memory plan. Runs on CPU too (what CI checks here).

    python -m benchmarks.gpu_smoke [--device cuda] [--smoke] [--repeats N] [--results PATH]

For each precision (fp32; on CUDA also bf16 autocast with bf16 teachers) it builds the run as
`kvd train` does (smollm2_gemma3: its two real teachers; --smoke: tiny random ones), runs one
warm-up step and --repeats timed steps, and reports:

- whether every loss and grad norm is finite;
- host reads per step by the function that made them: every read of a scalar on the device
  (aten._local_scalar_dense: .item(), float(), bool(), .tolist()) counted by a dispatch mode
  (on CPU every read counts, e.g. AdamW's step counters, which stay on the host on a GPU),
  and on CUDA every synchronising call torch.cuda.set_sync_debug_mode("warn") reports (it also
  sees nonzero() and blocking copies);
- tokens/s (median step) and the steps' peak memory above the built run against the plan's
  (`kvd check-shapes SPEC --gpus 1`, tensors only; CUDA: max_memory_allocated).
"""

from __future__ import annotations

import statistics
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.harness import (
    ROOT,
    arguments,
    build_trainer,
    kvd_step,
    table,
    with_kvd_allocator,
    write_section,
)
from benchmarks.memory_plan import WEIGHT_LINES, step_peak_mb
from benchmarks.setups import SETUPS

MiB = 2**20
MACHINERY = ("_python_dispatch", "_dynamo", "_compile.py", "eval_frame.py", "gpu_smoke.py")


def caller() -> str:
    """file:function of the innermost frame outside torch's dispatch machinery, the file
    relative to kvd's package or to the folder holding torch."""
    frames = reversed(traceback.extract_stack())
    frame = next(f for f in frames if not any(m in f.filename for m in MACHINERY))
    path = Path(frame.filename)
    for root in (Path(torch.__file__).parent.parent, ROOT):
        if path.is_relative_to(root):
            path = path.relative_to(root)
            break
    return f"{path}:{frame.name}"


class ScalarReads(TorchDispatchMode):
    """Counts aten._local_scalar_dense calls by caller: reads of a scalar on `device` (on CUDA
    a sync each; on CPU every read, since there the host is the device)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device.type
        self.reads: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        scalar_read = func is torch.ops.aten._local_scalar_dense.default
        if scalar_read and args[0].device.type == self.device:
            self.reads[caller()] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def cuda_syncs(device: torch.device) -> Iterator[Counter[str]]:
    """On CUDA, every synchronising call while active, by kvd caller; nothing on CPU."""
    found: Counter[str] = Counter()
    if device.type != "cuda":
        yield found
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            found[f"{Path(w.filename).name}:{w.lineno}"] += 1


def smoke_setup(name: str, device: torch.device, precision: str) -> dict[str, Any]:
    data = SETUPS[name]()
    data["training"] = dict(data["training"], precision=precision)
    if precision == "bf16":
        data["teachers"] = [dict(t, dtype="bfloat16") for t in data["teachers"]]
    return data


def plan_step_mb(data: dict[str, Any]) -> float:
    """The plan's step bytes over the built run (tensors, no CUDA line), MiB."""
    from kvd.shapes.memory_plan import memory_plans
    from kvd.shapes.plan import Choices, spec_plan, spec_sources
    from kvd.spec.runspec import parse_spec

    spec = parse_spec(data, base_dir=ROOT)
    plan = spec_plan(spec_sources(spec, "setup"), Choices.from_spec(spec))
    ddp = memory_plans(spec, plan, ranks=1, budget=None, cuda_runtime=False)[0]
    weights = sum(i.bytes for i in ddp.items if i.name in WEIGHT_LINES)
    return (ddp.total - weights) / MiB


def check(name: str, device: str, precision: str, steps: int) -> dict[str, Any]:
    data = smoke_setup(name, torch.device(device), precision)
    trainer = build_trainer(data, device)
    dev = trainer.rt.device
    kvd_step(trainer)  # warm-up: kernels, allocator, optimizer state
    reads, speeds, finite = ScalarReads(dev), [], True
    with cuda_syncs(dev) as syncs:
        for _ in range(steps):
            with reads:
                record = kvd_step(trainer)
            speeds.append(record["tokens_per_s"])
            finite &= all(
                v == v and abs(v) != float("inf")
                for k, v in record.items()
                if k.startswith("loss/") or k == "grad_norm"
            )
    return {
        "finite": finite,
        "reads": {k: n / steps for k, n in reads.reads.items()},
        "syncs": {k: n / steps for k, n in syncs.items()},
        "tokens_per_s": statistics.median(speeds),
        "peak_mb": step_peak_mb(trainer, 1),
        "plan_mb": plan_step_mb(data),
    }


def main() -> None:
    with_kvd_allocator("benchmarks.gpu_smoke")
    args = arguments(__doc__ or "", repeats=3)
    setups = args.setups or ["smoke" if args.smoke else "smollm2_gemma3"]
    precisions = ["fp32", "bf16"] if args.device.startswith("cuda") else ["fp32"]
    rows, notes = [], []
    for setup, precision in ((s, p) for s in setups for p in precisions):
        r = check(setup, args.device, precision, args.repeats)
        reads = ", ".join(f"{k} {n:.3g}" for k, n in sorted(r["reads"].items())) or "none"
        syncs = ", ".join(f"{k} {n:.3g}" for k, n in sorted(r["syncs"].items()))
        rows.append(
            [
                setup,
                precision,
                "yes" if r["finite"] else "NO",
                sum(r["reads"].values()),
                sum(r["syncs"].values()) if args.device.startswith("cuda") else "n/a",
                r["tokens_per_s"],
                r["peak_mb"],
                r["plan_mb"],
            ]
        )
        notes.append(f"- {setup}, {precision}: scalar reads per step by caller: {reads}")
        if syncs:
            notes.append(f"- {setup}, {precision}: CUDA syncs per step by place: {syncs}")
    body = (
        f"`kvd` steps on {args.device} ({', '.join(setups)}; 1 warm-up + {args.repeats} steps). "
        "Reads: "
        "host reads of device scalars per step (aten._local_scalar_dense); CUDA syncs: what "
        "torch.cuda.set_sync_debug_mode reports per step (CUDA only). Peak: tensor MiB one "
        "step adds to the built run, against the memory plan's.\n\n"
        + table(
            [
                "setup",
                "precision",
                "finite",
                "reads/step",
                "CUDA syncs/step",
                "tokens/s",
                "step peak MiB",
                "plan MiB",
            ],
            rows,
        )
        + "\n\n"
        + "\n".join(notes)
    )
    print(body)
    write_section(args.results, "gpu_smoke", "GPU smoke (runs on CPU too)", body)


if __name__ == "__main__":
    main()
