"""A whole `kvd train` run against a bare run with the same cadence: validation, checkpoints and
the final outputs included, not only the steps.

    python -m benchmarks.whole_run [--smoke] [--repeats N] [--setups a,b]

Both sides go through kvd's own training loop (`Trainer.run`: step records in metrics.jsonl,
validation every `evaluation.every` steps on the same windows, atomic checkpoints every
`training.checkpoint_every` steps, the student, its heads and results.json at the end), each in
a fresh run dir:

- kvd: the setup's spec as `kvd train` runs it;
- bare: the efficient bare of benchmarks/harness.py run as a whole run: a CE-only Trainer of the
  same spec (kvd's CE kernel on real tokens, clipping, AdamW) whose every step first runs the
  teachers' plain forwards on the same texts (tokenised inside the step, as kvd does).

The sides alternate (kvd, bare, kvd, bare, ...) so both see the same drift of a shared machine;
the ratio is of the median run times. Loading (not part of a run's loop) is timed apart. The
cadence is the quickstart's, scaled to 30-step runs: validation at steps/3 and at the end, a
checkpoint at steps/2 and at the end (the quickstart trains 150 steps, validates every 50 and
checkpoints at 100 and 150).
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    ROOT,
    Bare,
    arguments,
    ce_only,
    sync,
    table,
    with_kvd_allocator,
    write_section,
)
from benchmarks.setups import SETUPS
from kvd.core.progress import Progress
from kvd.core.runtime import setup_runtime
from kvd.run.rundir import MetricsLog, create_run_dir, write_spec
from kvd.run.train import StepLog, Trainer
from kvd.spec.runspec import parse_spec

TARGET = 1.15


class BareTrainer(Trainer):
    """The efficient bare as a whole run: a CE-only Trainer whose step first runs the teachers'
    plain forwards on the texts of the step (`bare`, a stream of the same seed)."""

    bare: Bare

    def train_step(self) -> StepLog:
        for batch in self.bare.next_batches():
            self.bare.teacher_forwards(batch)
        return super().train_step()


def with_cadence(data: dict[str, Any], steps: int, root: Path) -> dict[str, Any]:
    """`data` trained for `steps` with validation at steps/3 and a checkpoint at steps/2 (and
    both at the end), into `root`."""
    data = copy.deepcopy(data)
    data["training"] |= {
        "max_steps": steps,
        "checkpoint_every": max(1, steps // 2),
        "keep_checkpoints": 2,
        "log_every": 1,
        "warmup_steps": min(data["training"].get("warmup_steps", 10), steps // 4),
    }
    data["evaluation"] = {"every": max(1, steps // 3), "batches": 8}
    data["output"] = {"dir": str(root), "trackers": []}
    return data


def build(data: dict[str, Any], device: str, cls: type[Trainer] = Trainer) -> Trainer:
    """A Trainer of `data` with its run dir created as `kvd train` creates it."""
    spec = parse_spec(data, base_dir=ROOT)
    run_dir = spec.output_dir()
    create_run_dir(run_dir)
    write_spec(run_dir, data, spec.model_dump(mode="json"))
    return cls(spec, run_dir, setup_runtime(device), ROOT, use_cache=True)


def timed_run(trainer: Trainer) -> float:
    """Seconds of the whole run: every step, validation, checkpoint and the final outputs."""
    log = MetricsLog(trainer.run_dir / "metrics.jsonl", [])
    sync(trainer.rt.device)
    start = time.perf_counter()
    try:
        trainer.run(log, Progress(enabled=False))
    finally:
        log.close()
    sync(trainer.rt.device)
    return time.perf_counter() - start


def measure(name: str, steps: int, repeats: int, device: str, tmp: Path) -> dict[str, Any]:
    """`repeats` whole runs per side, alternating; run seconds, load seconds, tokens."""
    base = SETUPS[name]()
    runs: dict[str, list[float]] = {"kvd": [], "bare": []}
    loads: dict[str, list[float]] = {"kvd": [], "bare": []}
    tokens: dict[str, int] = {}
    for i in range(repeats):
        t0 = time.perf_counter()
        kvd = build(with_cadence(base, steps, tmp / f"kvd{i}"), device)
        loads["kvd"].append(time.perf_counter() - t0)
        runs["kvd"].append(timed_run(kvd))
        tokens["kvd"] = kvd.state.tokens
        t0 = time.perf_counter()
        bare = build(with_cadence(ce_only(base), steps, tmp / f"bare{i}"), device, BareTrainer)
        assert isinstance(bare, BareTrainer)
        bare.bare = Bare(kvd, bare)  # kvd's teachers, loaded once
        loads["bare"].append(time.perf_counter() - t0)
        runs["bare"].append(timed_run(bare))
        tokens["bare"] = bare.state.tokens
        del kvd, bare
    if tokens["kvd"] != tokens["bare"]:
        raise RuntimeError(f"{name}: the sides trained on different tokens: {tokens}")
    return {"runs": runs, "loads": loads, "tokens": tokens["kvd"], "load": os.getloadavg()[0]}


def main() -> None:
    with_kvd_allocator("benchmarks.whole_run")
    args = arguments(__doc__ or "", repeats=2)
    setups = args.setups or (["smoke"] if args.smoke else ["smollm2_gemma3", "tiny3"])
    steps = 6 if args.smoke else 30
    n_cores = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvd-bench-whole-") as tmp:
        for name in setups:
            m = measure(name, steps, args.repeats, args.device, Path(tmp) / name)
            kvd, bare = statistics.median(m["runs"]["kvd"]), statistics.median(m["runs"]["bare"])
            ratio = kvd / bare
            mark = f"**{ratio:.3f}**" + ("" if ratio <= TARGET else " (missed)")
            print(f"whole run {name}: kvd {kvd:.1f} s / bare {bare:.1f} s = {ratio:.3f}")
            rows.append(
                [
                    name,
                    steps,
                    m["tokens"],
                    " / ".join(f"{x:.1f}" for x in m["runs"]["kvd"]),
                    " / ".join(f"{x:.1f}" for x in m["runs"]["bare"]),
                    mark,
                    f"{statistics.median(m['loads']['kvd']):.1f}",
                    f"{statistics.median(m['loads']['bare']):.1f}",
                    f"{m['load']:.1f} / {n_cores}",
                    "yes" if m["load"] <= 1.25 * n_cores else "**no**",
                ]
            )
    body = (
        f"Target: a whole run <= {TARGET} of the bare run with the same cadence. {steps} steps "
        f"per run, validation (8 batches) every {max(1, steps // 3)} steps and at the end, a "
        f"checkpoint every {max(1, steps // 2)} steps and at the end, then the student, heads "
        "and results.json; both sides through kvd's loop (benchmarks/whole_run.py), kvd and "
        "bare runs alternating, each in a fresh run dir. Run seconds exclude loading (own "
        "columns; the bare side reuses kvd's loaded teachers). reliable: load <= 1.25x cores.\n\n"
        + table(
            [
                "setup",
                "steps",
                "student tokens",
                "kvd runs s",
                "bare runs s",
                "run ratio (medians)",
                "kvd load s",
                "bare load s",
                "load / cores",
                "reliable",
            ],
            rows,
        )
    )
    write_section(args.results, "whole_run", "Whole run with its cadence: kvd train / bare", body)


if __name__ == "__main__":
    main()
