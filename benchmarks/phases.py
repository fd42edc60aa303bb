"""Where a kvd step's time goes: the step's phases (kvd/core/phases.py) under torch.profiler.

    python -m benchmarks.phases [--smoke] [--repeats N] [--device cuda] [--setups a,b]

For each setup (default: smollm2_gemma3, two real teachers, and tiny3's three random ones) it
runs one warm-up step, times `--repeats` steps without the profiler, then profiles as many and
prints, per phase, milliseconds per step (host wall time inside the range; on CUDA also the
device time of its kernels), the share of the profiled step, and the torch operators the phase
dispatched per step (on a GPU each is at least one kernel launch: what a launch-bound step pays
for). Nested phases are indented under their parent; a parent's time includes its children's.
The profiler adds a little to every operator: the profiled step beside the plain one says how
much.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any

from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import (
    arguments,
    build_trainer,
    kvd_step,
    sync,
    table,
    with_kvd_allocator,
    write_section,
)
from benchmarks.setups import SETUPS
from kvd.core.phases import PREFIX


def tree(events: list[FunctionEvent]) -> list[tuple[int, str]]:
    """The phases as (depth, name), each under the phase it ran in, in the order they first
    ran."""
    parent: dict[str, str | None] = {}
    first: dict[str, float] = {}
    for ev in events:
        if not ev.name.startswith(PREFIX):
            continue
        name = ev.name[len(PREFIX) :]
        up = ev.cpu_parent
        while up is not None and not up.name.startswith(PREFIX):
            up = up.cpu_parent
        parent.setdefault(name, None if up is None else up.name[len(PREFIX) :])
        first[name] = min(first.get(name, float("inf")), ev.time_range.start)
    out: list[tuple[int, str]] = []

    def visit(node: str | None, level: int) -> None:
        for child in sorted((n for n, p in parent.items() if p == node), key=first.__getitem__):
            out.append((level, child))
            visit(child, level + 1)

    visit(None, 0)
    return out


def operators(events: list[FunctionEvent]) -> dict[str, int]:
    """Per phase: torch operators it dispatched (aten ops not called by another aten op)."""
    counts: dict[str, int] = defaultdict(int)
    for ev in events:
        if not ev.name.startswith("aten::"):
            continue
        parent = ev.cpu_parent
        if parent is not None and parent.name.startswith("aten::"):
            continue
        while parent is not None:
            if parent.name.startswith(PREFIX):
                counts[parent.name[len(PREFIX) :]] += 1
            parent = parent.cpu_parent
    return counts


def breakdown(setup: str, device: str, steps: int) -> dict[str, Any]:
    trainer = build_trainer(SETUPS[setup](), device)
    dev = trainer.rt.device
    kvd_step(trainer)  # warm-up
    plain = []
    for _ in range(steps):
        sync(dev)
        t = time.perf_counter()
        kvd_step(trainer)
        sync(dev)
        plain.append(time.perf_counter() - t)
    activities = [ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        sync(dev)
        t = time.perf_counter()
        for _ in range(steps):
            kvd_step(trainer)
        sync(dev)
        profiled = (time.perf_counter() - t) / steps
    host: dict[str, float] = defaultdict(float)
    device_time: dict[str, float] = defaultdict(float)
    for avg in prof.key_averages():
        if avg.key.startswith(PREFIX):
            name = avg.key[len(PREFIX) :]
            host[name] += avg.cpu_time_total / 1e3 / steps
            device_time[name] += getattr(avg, "device_time_total", 0.0) / 1e3 / steps
    events = list(prof.events())
    ops = operators(events)
    return {
        "tree": tree(events),
        "plain_s": statistics.median(plain),
        "profiled_s": profiled,
        "host_ms": host,
        "device_ms": device_time,
        "ops": {k: v / steps for k, v in ops.items()},
    }


def main() -> None:
    with_kvd_allocator("benchmarks.phases")
    args = arguments(__doc__ or "", repeats=4)
    names = args.setups or (["smoke"] if args.smoke else ["smollm2_gemma3", "tiny3"])
    cuda = args.device.startswith("cuda")
    parts = []
    for name in names:
        r = breakdown(name, args.device, args.repeats)
        step_ms = r["profiled_s"] * 1e3
        rows = []
        for level, phase in r["tree"]:
            row = [
                "&nbsp;" * 4 * level + phase,
                r["host_ms"][phase],
                f"{100 * r['host_ms'][phase] / step_ms:.1f}%",
                round(r["ops"].get(phase, 0.0)),
            ]
            if cuda:
                row.insert(2, r["device_ms"][phase])
            rows.append(row)
        header = ["phase", "host ms/step", "% of step", "operators/step"]
        if cuda:
            header.insert(2, "device ms/step")
        parts.append(
            f"### {name}\n\nstep: {r['plain_s'] * 1e3:.1f} ms plain, {step_ms:.1f} ms profiled "
            f"(median of {args.repeats}; mean of {args.repeats} profiled)\n\n" + table(header, rows)
        )
        inner = [p for level, p in r["tree"] if level > 0]
        top = max(inner, key=lambda p: r["host_ms"][p])
        print(f"{name}: step {step_ms:.0f} ms profiled; largest inner phase {top}")
    body = (
        "Per phase of the kvd step (kvd/core/phases.py), under torch.profiler: host wall time in "
        "the range per step (on CUDA also its kernels' device time), its share of the profiled "
        "step, and the torch operators it dispatched per step. Nested phases are indented; a "
        "parent's time includes its children's; backward is one phase (autograd runs outside "
        "the forward ranges).\n\n" + "\n\n".join(parts)
    )
    write_section(args.results, "phases", "Phase breakdown of a step", body)


if __name__ == "__main__":
    main()
