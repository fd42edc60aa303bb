"""training.compile: kvd's step with each student decoder layer through torch.compile against the
same step eager, in the same process, on the same batches.

    python -m benchmarks.compile [--smoke] [--repeats N] [--setups a,b]

Two trainers of the same spec (one with training.compile) step in turn on the same batch
sequence; the first `WARMUP` steps of each are apart (the compiled side compiles there, with
dynamic shapes, and recompiles at most once), then the medians of --repeats steps. The verdict
says whether compiling pays on this device: kvd keeps it off by default either way.
"""

from __future__ import annotations

import copy
import statistics
import time

from benchmarks.harness import arguments, build_trainer, kvd_step, table, timed, write_section
from benchmarks.setups import SETUPS

WARMUP = 4


def main() -> None:
    args = arguments(__doc__ or "", repeats=12)
    setups = args.setups or (["smoke"] if args.smoke else ["smollm2_gemma3", "tiny3"])
    rows = []
    for name in setups:
        data = SETUPS[name]()
        compiled_data = copy.deepcopy(data)
        compiled_data["training"]["compile"] = True
        eager, compiled = (
            build_trainer(data, args.device),
            build_trainer(compiled_data, args.device),
        )
        device = eager.rt.device
        start = time.perf_counter()
        for _ in range(WARMUP):
            kvd_step(compiled)
        warm = time.perf_counter() - start
        for _ in range(WARMUP):
            kvd_step(eager)
        seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
        losses: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(args.repeats):
            for side, trainer in (("eager", eager), ("compiled", compiled)):
                record: dict[str, float] = {}
                seconds[side].append(
                    timed(lambda t=trainer, r=record: r.update(kvd_step(t)), device)
                )
                losses[side].append(record["loss/total"])
        e, c = statistics.median(seconds["eager"]), statistics.median(seconds["compiled"])
        drift = max(
            abs(a - b) / abs(a) for a, b in zip(losses["eager"], losses["compiled"], strict=True)
        )
        print(
            f"compile {name}: eager {e:.3f} s, compiled {c:.3f} s ({c / e:.3f}x), "
            f"warm-up {warm:.1f} s"
        )
        rows.append([name, e, c, f"**{c / e:.3f}**", f"{warm:.1f}", f"{drift:.1e}"])
    body = (
        f"{WARMUP} warm-up steps per side apart (the compiled side's include compiling), then the "
        f"median of {args.repeats} steps, the sides alternating on the same batches "
        "(benchmarks/compile.py). Below 1.0 the compiled step is faster. 'loss drift': the largest "
        "relative difference of a step's loss between the sides.\n\n"
        + table(
            [
                "setup",
                "eager step s",
                "compiled step s",
                "compiled / eager",
                "compiled warm-up s",
                "loss drift",
            ],
            rows,
        )
    )
    write_section(args.results, "compile", "torch.compile of the student's layers", body)


if __name__ == "__main__":
    main()
