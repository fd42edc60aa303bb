"""Step time and memory of `kvd train` against an efficient bare baseline (targets: <= 1.10 and
<= 1.15).

    python -m benchmarks.step_overhead [--smoke] [--repeats N] [--device cuda]

For smollm2_gemma3 (two real PyPI teachers) and a 3-teacher random setup: kvd steps, efficient
bare steps (teacher forwards + kvd's own CE-only student step), HF bare steps (teacher forwards
+ plain transformers student step, LM head and loss on padding too) and packed bare steps (the
HF bare's student step on the same real tokens packed into one row without padding) alternate
in blocks on the same batches in one process (benchmarks/harness.py). Memory: kvd and the
efficient bare, each in a fresh process; the target is on the steps' own memory, the peak above
the loaded models, read two ways: the resident set (the OS's view, allocator included) and the
tensor peak of one step (the allocations themselves, as a GPU would count them).

Under `KVD_ALLOCATOR=system` (glibc's malloc instead of kvd's mimalloc) the results go to their
own section, so both allocators' ratios stand side by side.

A run is marked unreliable when the machine's 1-minute load average at its end was above 1.25x
its cores: someone else's work was in the timings.
"""

from __future__ import annotations

import os

from benchmarks.harness import (
    arguments,
    build_trainer,
    ce_only,
    peak_memory,
    step_overhead,
    table,
    with_kvd_allocator,
    write_section,
)
from benchmarks.setups import SETUPS
from kvd.core.allocator import ENV as ALLOCATOR_ENV

STEP_TARGET = 1.10
MEMORY_TARGET = 1.15


def mark(ratio: float, target: float) -> str:
    return f"**{ratio:.3f}**" + ("" if ratio <= target else " (missed)")


def main() -> None:
    with_kvd_allocator("benchmarks.step_overhead")
    args = arguments(__doc__ or "", repeats=16)  # ratios near the target: the noise matters
    names = args.setups or (["smoke"] if args.smoke else ["smollm2_gemma3", "tiny3"])
    rows = []
    for name in names:
        data = SETUPS[name]()
        trainer = build_trainer(data, args.device)
        ce = build_trainer(ce_only(data), args.device)
        o = step_overhead(trainer, args.repeats, ce=ce, packed=True)
        assert o.hf is not None and o.packed is not None
        del trainer, ce
        mem_steps = 2 if args.smoke else 4
        kvd = peak_memory(name, "kvd", mem_steps, args.device)
        bare = peak_memory(name, "efficient", mem_steps, args.device)
        memory = kvd.steps_mb / bare.steps_mb
        tensors = kvd.tensor_mb / bare.tensor_mb
        rows.append(
            [
                name,
                o.tokens,
                o.teachers_s,
                o.student_s,
                o.bare.median,
                o.kvd.median,
                mark(o.ratio, STEP_TARGET),
                f"{o.kvd.mean / o.bare.mean:.3f}",
                f"{o.kvd.p90 / o.bare.p90:.3f}",
                o.hf.median,
                f"{o.kvd_s / o.hf.median:.3f}",
                o.packed.median,
                f"{o.kvd_s / o.packed.median:.3f}",
                bare.peak_mb,
                kvd.peak_mb,
                bare.steps_mb,
                kvd.steps_mb,
                mark(memory, MEMORY_TARGET),
                bare.tensor_mb,
                kvd.tensor_mb,
                mark(tensors, MEMORY_TARGET),
                f"{o.load:.1f} / {o.cores}",
                f"{o.cpu_per_wall:.2f}",
                "yes" if o.reliable else "**no**",
            ]
        )
        print(
            f"{name}: step {o.ratio:.3f} ({o.kvd_s:.3f}s / {o.bare_s:.3f}s efficient bare; "
            f"{o.kvd_s / o.hf.median:.3f} of the HF bare, {o.kvd_s / o.packed.median:.3f} of "
            f"the packed bare), steps' own memory {memory:.3f} "
            f"({kvd.steps_mb:.0f} / {bare.steps_mb:.0f} MiB), tensor peak {tensors:.3f} "
            f"({kvd.tensor_mb:.0f} / {bare.tensor_mb:.0f} MiB), load {o.load:.1f} on {o.cores} "
            f"cores{'' if o.reliable else ': UNRELIABLE'}"
        )
    body = (
        f"Targets: step time ratio <= {STEP_TARGET}, steps' own memory ratio <= {MEMORY_TARGET}, "
        "both against the efficient bare (teacher forwards, each teacher's LM head on its real "
        "tokens where kvd reads its logits, else on the last position; + kvd's CE-only student "
        "step: head on real tokens, the same CE kernel, clipping and optimizer). "
        "The HF bare: a plain transformers student step (head and loss on padding too, AdamW); "
        "the packed bare: the same on the batch's real tokens packed into one row (position_ids "
        "restarting per text, a block-diagonal causal mask, no padding). "
        f"{args.repeats} steps per side; kvd, efficient, HF and packed bare steps run in "
        "alternating blocks of 3 on the same batch sequence (checked: equal student tokens at "
        "every step), the first step of each block and one warm-up round uncounted "
        "(benchmarks/harness.py). 'step ratio' is of medians; means and 90th percentiles beside "
        "it. Memory: kvd and the efficient bare, each in a fresh process, peak = resident set "
        "(CPU) or allocated bytes (CUDA) over the steps; "
        "'steps' own' = the peak minus what was in use after loading. 'tensor peak': the most "
        "memory one more step's own allocations hold at once, from the profiler's record of "
        "every allocation and free (what a GPU's caching allocator would "
        "have to provide; the resident set also counts what the CPU allocator keeps and "
        "reuses, so the two can differ a lot; on CUDA both are allocated bytes). "
        "'load / cores': the 1-minute load average at the end; CPU/wall: this process's CPU "
        "seconds per second; "
        "reliable: load <= 1.25x cores.\n\n"
        + table(
            [
                "setup",
                "student tokens/step",
                "bare teachers s",
                "bare student s",
                "bare step s",
                "kvd step s",
                "step ratio",
                "ratio of means",
                "ratio of p90",
                "HF bare step s",
                "ratio vs HF bare",
                "packed bare step s",
                "ratio vs packed bare",
                "bare peak MiB",
                "kvd peak MiB",
                "bare steps' own MiB",
                "kvd steps' own MiB",
                "memory ratio (steps' own)",
                "bare tensor peak MiB",
                "kvd tensor peak MiB",
                "memory ratio (tensor peak)",
                "load / cores",
                "CPU/wall",
                "reliable",
            ],
            rows,
        )
    )
    if os.environ.get(ALLOCATOR_ENV) == "system":
        write_section(
            args.results, "step_overhead_glibc", "Step overhead and memory, glibc malloc", body
        )
    else:
        write_section(args.results, "step_overhead", "Step overhead and memory", body)


if __name__ == "__main__":
    main()
