"""Step time and peak memory of `kvd train` against the bare model passes (targets: <= 1.10 and
<= 1.15).

    python -m benchmarks.step_overhead [--smoke] [--repeats N] [--device cuda]

For the quickstart (two real PyPI teachers) and a 3-teacher random setup: kvd steps and bare
steps (teacher forwards + student forward/backward/update, see benchmarks/harness.py) alternate
on the same batches in one process; each process's peak memory over a few steps is measured
in a fresh process per side.

kvd runs the student's LM head on the real tokens only, where the bare forward maps every
position, padding included; the run is repeated with kvd's head on every position too, so that
the ratio of what kvd adds is shown apart from what it saves there.
"""

from __future__ import annotations

from benchmarks.harness import (
    arguments,
    build_trainer,
    peak_memory,
    step_overhead,
    table,
    with_kvd_allocator,
    write_section,
)
from benchmarks.setups import SETUPS

STEP_TARGET = 1.10
MEMORY_TARGET = 1.15


def main() -> None:
    with_kvd_allocator("benchmarks.step_overhead")
    args = arguments(__doc__ or "", repeats=16)  # ratios near the target: the noise matters
    names = ["smoke"] if args.smoke else ["quickstart", "tiny3"]
    rows = []
    for name in names:
        trainer = build_trainer(SETUPS[name](), args.device)
        o = step_overhead(trainer, args.repeats)
        trainer.model.real_token_head = False
        padded = step_overhead(trainer, args.repeats)
        del trainer
        mem_steps = 2 if args.smoke else 4
        kvd_mb = peak_memory(name, "kvd", mem_steps, args.device)
        bare_mb = peak_memory(name, "bare", mem_steps, args.device)
        rows.append(
            [
                name,
                o.tokens,
                o.teachers_s,
                o.student_s,
                o.bare_s,
                o.kvd_s,
                f"**{o.ratio:.3f}**" + ("" if o.ratio <= STEP_TARGET else " (missed)"),
                f"{padded.ratio:.3f}",
                bare_mb,
                kvd_mb,
                f"**{kvd_mb / bare_mb:.3f}**"
                + ("" if kvd_mb / bare_mb <= MEMORY_TARGET else " (missed)"),
            ]
        )
        print(
            f"{name}: step {o.ratio:.3f} ({o.kvd_s:.3f}s / {o.bare_s:.3f}s; LM head on every "
            f"position {padded.ratio:.3f}), "
            f"memory {kvd_mb / bare_mb:.3f} ({kvd_mb:.0f} / {bare_mb:.0f} MiB)"
        )
    body = (
        f"Targets: step time ratio <= {STEP_TARGET}, peak memory ratio <= {MEMORY_TARGET}. "
        f"Medians of {args.repeats} steps per side; kvd and bare steps run in alternating blocks "
        "of 3 on the same batch sequence, the first step of each block and one warm-up round "
        "uncounted (benchmarks/harness.py); "
        "peak memory is the resident set (CPU) or allocated bytes (CUDA) over the steps, after "
        "loading, each side in a fresh process.\n\n"
        + table(
            [
                "setup",
                "student tokens/step",
                "bare teachers s",
                "bare student s",
                "bare step s",
                "kvd step s",
                "step ratio",
                "step ratio, kvd's LM head on padding too",
                "bare peak MiB",
                "kvd peak MiB",
                "memory ratio",
            ],
            rows,
        )
    )
    write_section(args.results, "step_overhead", "Step overhead and memory", body)


if __name__ == "__main__":
    main()
