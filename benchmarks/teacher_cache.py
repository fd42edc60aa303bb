"""The offline teacher cache: building it against the bare teacher forwards (target <= 1.2x),
and a training step that reads it against the bare student step (target <= 1.5x).

    python -m benchmarks.teacher_cache [--smoke] [--repeats N] [--device cuda]

Building = `kvd cache-teachers`' loop (tokenise, teacher forwards, alignment, write one
safetensors file per step); its per-step median is set against the same teachers' plain
forwards on the same batches. The cached step is `kvd train`'s step with the teachers' work
read from disk, interleaved with the bare student forward/backward/update on the same batches.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    Bare,
    arguments,
    build_trainer,
    kvd_step,
    table,
    timed,
    with_kvd_allocator,
    write_section,
)
from benchmarks.setups import SETUPS
from kvd.core.progress import Progress
from kvd.step.teacher_cache import CacheWriter

BUILD_TARGET = 1.2
STEP_TARGET = 1.5
WARMUP = 2


def build_times(spec: dict[str, Any], root: Path, device: str) -> tuple[float, float, int]:
    """Median seconds per step of building the cache at `root`, of the bare teacher forwards
    on the same batches (timed before and after the build), and the cache's size in bytes."""
    trainer = build_trainer(spec, device)
    bare = Bare(trainer)
    steps = spec["training"]["max_steps"]
    batches = [bare.next_batches() for _ in range(steps)]

    def teachers(i: int) -> float:
        return timed(lambda: [bare.teacher_forwards(b) for b in batches[i]], trainer.rt.device)

    before = [teachers(i) for i in range(steps)]
    writer = CacheWriter(root, trainer.teacher_side.fingerprint())
    stamps: list[float] = []
    put = writer.put

    def stamped_put(step: int, tensors: Any) -> None:
        put(step, tensors)
        stamps.append(time.perf_counter())

    writer.put = stamped_put  # type: ignore[method-assign]
    start = time.perf_counter()
    trainer.teacher_side.build_cache(
        writer, Progress(enabled=False), trainer.curriculum, trainer.batches
    )
    per_step = [b - a for a, b in zip([start, *stamps], stamps, strict=False)]
    after = [teachers(i) for i in range(steps)]
    bare_s = statistics.median(before[WARMUP:] + after[WARMUP:])
    return statistics.median(per_step[WARMUP:]), bare_s, writer.bytes


def cached_step_times(spec: dict[str, Any], device: str) -> tuple[float, float]:
    """Median seconds of the cached kvd step and of the bare student step, interleaved."""
    trainer = build_trainer(spec, device)
    side = trainer.teacher_side
    assert side.cache is not None and not any(t.loaded for t in side.teachers)
    bare = Bare(trainer)
    kvd, student = [], []
    for i in range(spec["training"]["max_steps"]):
        batches = bare.next_batches()
        k = timed(lambda: kvd_step(trainer), trainer.rt.device)
        s = bare.step(batches)["student_s"]
        if i >= WARMUP:
            kvd.append(k)
            student.append(s)
    return statistics.median(kvd), statistics.median(student)


def main() -> None:
    with_kvd_allocator("benchmarks.teacher_cache")
    args = arguments(__doc__ or "")
    names = ["smoke"] if args.smoke else ["smollm2_gemma3", "smollm2_gemma3_kv", "tiny3"]
    rows = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix="kvd-bench-cache-") as tmp:
            spec = SETUPS[name]()
            spec["training"]["max_steps"] = WARMUP + args.repeats
            spec["training"]["teacher_cache"] = str(Path(tmp) / "cache")
            build_s, teachers_s, size = build_times(spec, Path(tmp) / "cache", args.device)
            step_s, student_s = cached_step_times(spec, args.device)
        build_ratio, step_ratio = build_s / teachers_s, step_s / student_s
        rows.append(
            [
                name,
                teachers_s,
                build_s,
                _verdict(build_ratio, BUILD_TARGET),
                f"{size / 2**20 / spec['training']['max_steps']:.1f}",
                student_s,
                step_s,
                _verdict(step_ratio, STEP_TARGET),
            ]
        )
        print(f"{name}: build {build_ratio:.3f}x teacher forwards, cached step {step_ratio:.3f}x")
    body = (
        f"Targets: cache build per step <= {BUILD_TARGET}x the bare teacher forwards; a cached "
        f"step <= {STEP_TARGET}x the bare student step. Medians of {args.repeats} steps after "
        f"{WARMUP} warm-up steps.\n\n"
        + table(
            [
                "setup",
                "bare teacher fwd s/step",
                "cache build s/step",
                "build ratio",
                "cache MiB/step",
                "bare student s/step",
                "cached kvd step s",
                "cached step ratio",
            ],
            rows,
        )
    )
    write_section(args.results, "teacher_cache", "Offline teacher cache", body)


def _verdict(ratio: float, target: float) -> str:
    return f"**{ratio:.3f}**" + ("" if ratio <= target else " (missed)")


if __name__ == "__main__":
    main()
