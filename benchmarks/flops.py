"""Achieved FLOP/s of teacher forwards, the student step and the whole kvd step, as a fraction
of the matmul peak measured in the same process.

    python -m benchmarks.flops [--smoke] [--repeats N] [--device cuda]

FLOPs are counted by torch's FlopCounterMode (matmuls and attention, forward and backward) on
one batch; times are medians. The peak is a square matmul per dtype, so the fraction says how
much of what this device can do in matmuls the model passes get (small models on CPU spend a
large share outside matmuls: norms, softmax, the optimizer).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import (
    Bare,
    arguments,
    build_trainer,
    kvd_step,
    table,
    teacher_forward,
    timed,
    with_kvd_allocator,
    write_section,
)
from benchmarks.setups import SETUPS


def matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """FLOP/s of an n x n matmul (n = 2048 on CPU, 8192 on CUDA), median of `repeats`."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    return 2 * n**3 / statistics.median(timed(lambda: a @ b, device) for _ in range(repeats))


def counted(fn: Any) -> int:
    """FLOPs of one call of `fn`."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def median_time(fn: Any, device: torch.device, repeats: int) -> float:
    fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


Row = tuple[str, dict[torch.dtype, int], float]
"""(pass, FLOPs by dtype, median seconds)"""


def measure(name: str, device: torch.device, repeats: int) -> list[Row]:
    """Each teacher's forward, the bare student step, the bare step and the kvd step of setup
    `name`. A step's FLOPs are split by dtype: its teachers' forwards run in theirs."""
    trainer = build_trainer(SETUPS[name](), device.type)
    bare = Bare(trainer)
    batch = bare.next_batches()[0]
    out: list[Row] = []
    teacher_flops: dict[torch.dtype, int] = {}
    pairs = zip(trainer.teacher_side.teachers, bare.teachers, batch.teachers, strict=True)
    for t, (loaded, _, _), (ids, mask, rows) in pairs:

        def forward(m: Any = loaded.model, i: Any = ids, a: Any = mask, r: Any = rows) -> None:
            teacher_forward(m, i, a.bool(), r)

        dtype = next(loaded.model.parameters()).dtype
        flops = counted(forward)
        teacher_flops[dtype] = teacher_flops.get(dtype, 0) + flops
        out.append(
            (f"teacher {t.id} forward", {dtype: flops}, median_time(forward, device, repeats))
        )

    def student() -> None:
        bare.student_forward_backward(batch)
        bare.update()

    s_dtype = next(bare.student.parameters()).dtype
    s_flops = counted(student)
    out.append(("student forward+backward+update", {s_dtype: s_flops},
                median_time(student, device, repeats)))  # fmt: skip

    def by_dtype(total: int) -> dict[torch.dtype, int]:
        """`total` step FLOPs: the teachers' in their dtypes, the rest in the student's."""
        split = dict(teacher_flops)
        split[s_dtype] = split.get(s_dtype, 0) + total - sum(teacher_flops.values())
        return split

    bare_s = median_time(lambda: bare.step([batch]), device, repeats)
    out.append(("bare step (teachers + student)", by_dtype(sum(teacher_flops.values()) + s_flops),
                bare_s))  # fmt: skip
    flops = counted(lambda: kvd_step(trainer))
    seconds = statistics.median(timed(lambda: kvd_step(trainer), device) for _ in range(repeats))
    out.append(("kvd step (teachers + student + heads)", by_dtype(flops), seconds))
    return out


def main() -> None:
    with_kvd_allocator("benchmarks.flops")
    args = arguments(__doc__ or "")
    device = torch.device(args.device)
    peaks = {dt: matmul_peak(dt, device, args.repeats) for dt in (torch.float32, torch.bfloat16)}
    rows: list[list[Any]] = []
    for name in ["smoke"] if args.smoke else ["smollm2_gemma3", "tiny3"]:
        for what, flops, seconds in measure(name, device, args.repeats):
            total = sum(flops.values())
            at_peak = sum(f / peaks[dt] for dt, f in flops.items())  # seconds at matmul peak
            dtypes = "+".join(str(dt).removeprefix("torch.") for dt in flops)
            rows.append([name, what, dtypes, total / 1e9, seconds, total / seconds / 1e9,
                         f"{at_peak / seconds:.1%}"])  # fmt: skip
    header = ["setup", "pass", "dtype", "GFLOP", "median s", "GFLOP/s", "of peak"]
    print(table(header, rows))
    peak_text = ", ".join(
        f"{str(k).removeprefix('torch.')} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()
    )
    body = (
        f"Matmul peak measured in the same process: {peak_text}. Medians of {args.repeats} "
        "calls; FLOPs by torch.utils.flop_counter. 'of peak' is the time the pass's FLOPs "
        "would take at the matmul peak of their dtype over its measured time (a step mixes "
        "bf16 teachers and a float32 student).\n\n" + table(header, rows)
    )
    write_section(args.results, "flops", "Achieved FLOP/s against the matmul peak", body)


if __name__ == "__main__":
    main()
