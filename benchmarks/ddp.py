"""DDP and FSDP on CPU: `kvd train` under `torchrun --nproc_per_node 2` (gloo) against one
process, in global student tokens per second, and the peak resident memory of a rank.

    python -m benchmarks.ddp [--smoke] [--repeats N] [--results PATH]

Each configuration is a fresh, real `kvd train` run of the same spec (tiny3; smoke under
--smoke) in a temp dir, for 2 warm-up + N steps: one process with a thread per core, two
processes with an equal share of the cores each, and (not under --smoke) one process with that
share alone, the reference for scaling efficiency; the two processes run with
training.parallel ddp, with fsdp (FSDP2: the learned parts sharded), and with fsdp and
training.teacher_parallel fsdp (the teachers sharded too). kvd gives every
rank training.batch_size texts, so two processes train on twice the global batch per step: the
comparison is the step record's tokens_per_s (global student tokens per second), not step time.
Medians over the steps after the warm-up ones. The runs share the machine with whatever else
runs on it: the table says how many cores other work kept busy during each.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.harness import arguments, bench_env, table, with_kvd_allocator, write_section
from benchmarks.setups import SETUPS
from kvd.run.rundir import read_metrics

WARMUP = 2
CHILD_TIMEOUT_S = 900


@dataclass
class Config:
    label: str
    processes: int
    threads: int  # OMP_NUM_THREADS of each process
    parallel: str = "ddp"  # training.parallel (one process: neither)
    teacher_parallel: str = "replicate"  # training.teacher_parallel

    @property
    def placement(self) -> str:
        """The table's `parallel` cell."""
        if self.processes == 1:
            return "-"
        return self.parallel + (", teachers fsdp" if self.teacher_parallel == "fsdp" else "")


@dataclass
class Measured:
    config: Config
    tokens: float  # global student tokens per step (median)
    step_s: float
    tokens_per_s: float
    threads_seen: int | None  # torch's thread count as the run recorded it (environment.json)
    wall_s: float  # the whole command: start-up, loading, steps, validation, checkpoint
    other_cores: float | None  # cores busy with other work (or stolen) during the command
    model_mib: float  # student + projectors: the gradients DDP all-reduces each step
    peak_rss_mib: float  # rank 0's peak resident memory (its step records)


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (steal included), from /proc/stat."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    fields = [int(x) for x in stat.read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def our_cpu_s() -> float:
    """CPU seconds of this process and its finished children (and theirs: torchrun's
    workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_spec(
    spec_data: dict[str, Any], out_dir: Path, steps: int, device: str, config: Config
) -> dict[str, Any]:
    """`spec_data` as one short run into `out_dir`: every step logged, one validation batch
    and one checkpoint, both at the end."""
    spec = dict(spec_data)
    spec["training"] = dict(
        spec["training"],
        parallel=config.parallel,
        teacher_parallel=config.teacher_parallel,
        max_steps=steps,
        log_every=1,
        checkpoint_every=steps,
        device="cpu" if device == "cpu" else "auto",  # auto: cuda:LOCAL_RANK under torchrun
    )
    spec["evaluation"] = {"every": steps, "batches": 1}
    spec["output"] = {"dir": str(out_dir)}
    return spec


def trained_mib(out_dir: Path) -> float:
    """MiB of the weights the run wrote (the student and its heads: projectors, fusion), a tied
    tensor counted once: what DDP all-reduces as gradients every step (fp32 here)."""
    from safetensors.torch import load_file

    written = load_file(out_dir / "student" / "model.safetensors")
    written |= {f"heads.{k}": v for k, v in load_file(out_dir / "heads.safetensors").items()}
    kept: list[torch.Tensor] = []
    for tensor in written.values():
        if not any(t.shape == tensor.shape and torch.equal(t, tensor) for t in kept):
            kept.append(tensor)
    return sum(t.numel() * t.element_size() for t in kept) / 2**20


def torchrun(processes: int, *module_args: str) -> list[str]:
    """The command running `python -m MODULE ARGS...` as `processes` local torchrun workers."""
    found = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError("torchrun not found next to the interpreter (it ships with torch)")
    return [found, "--standalone", "--nproc_per_node", str(processes), "-m", *module_args]


def command(processes: int, spec_path: Path) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "kvd.cli", "train", str(spec_path)]
    return torchrun(processes, "kvd.cli", "train", str(spec_path))


@dataclass
class Child:
    """A finished child command: its output, wall seconds, and the cores other work kept busy
    meanwhile (None off Linux)."""

    proc: subprocess.CompletedProcess[str]
    wall_s: float
    other_cores: float | None


def run_child(cmd: list[str], cwd: Path, threads: int, label: str) -> Child:
    """Run `cmd` with OMP_NUM_THREADS=threads under kvd's allocator; an error with the tail of
    its stderr when it times out or fails."""
    env = dict(bench_env(), OMP_NUM_THREADS=str(threads))
    busy0, ours0 = machine_busy_s(), our_cpu_s()
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        err = e.stderr or ""
        tail = err.decode(errors="replace") if isinstance(err, bytes) else err
        raise RuntimeError(
            f"{label}: {' '.join(cmd)} timed out after {CHILD_TIMEOUT_S}s:\n{tail[-4000:]}"
        ) from e
    wall = time.perf_counter() - start
    busy1, ours1 = machine_busy_s(), our_cpu_s()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{label}: {' '.join(cmd)} failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    other = None
    if busy0 is not None and busy1 is not None:
        other = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / wall
    return Child(proc, wall, other)


def measure(
    config: Config, spec_data: dict[str, Any], tmp: Path, steps: int, device: str
) -> Measured:
    """Run `kvd train` as `config` says and read its step records."""
    name = f"{config.processes}p{config.threads}t-{config.parallel}-{config.teacher_parallel}"
    out_dir = tmp / name
    spec_path = tmp / f"{name}.yaml"
    spec_data = run_spec(spec_data, out_dir, steps, device, config)
    spec_path.write_text(yaml.safe_dump(spec_data))
    child = run_child(command(config.processes, spec_path), tmp, config.threads, config.label)
    records = [
        r for r in read_metrics(out_dir / "metrics.jsonl") if "tokens_per_s" in r and "step" in r
    ]
    records.sort(key=lambda r: r["step"])
    if len(records) != steps:
        raise RuntimeError(f"{config.label}: {len(records)} step records, expected {steps}")
    timed = records[WARMUP:]
    env_file = out_dir / "environment.json"
    threads_seen = None
    if env_file.exists():
        threads_seen = yaml.safe_load(env_file.read_text()).get("threads")
    return Measured(
        config,
        tokens=statistics.median(r["tokens_per_s"] * r["step_s"] for r in timed),
        step_s=statistics.median(r["step_s"] for r in timed),
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in timed),
        threads_seen=threads_seen,
        wall_s=child.wall_s,
        other_cores=child.other_cores,
        model_mib=trained_mib(out_dir),
        peak_rss_mib=max(r.get("peak_mem_mb", r.get("peak_rss_mb", 0.0)) for r in timed),
    )


def fsdp_verdict(ddp: Measured, fsdp: Measured, sharded: Measured) -> str:
    """FSDP against DDP on the same processes: speed and a rank's memory; then the teachers
    sharded as well."""
    return (
        f" Under training.parallel fsdp the same two processes reach "
        f"{fsdp.tokens_per_s / ddp.tokens_per_s:.2f}x DDP's tokens/s with a rank's peak "
        f"resident memory at {fsdp.peak_rss_mib / ddp.peak_rss_mib:.2f}x DDP's "
        f"({fsdp.peak_rss_mib:.0f} vs {ddp.peak_rss_mib:.0f} MiB): FSDP gathers each layer's "
        "weights before its forward and backward and reduce-scatters its gradients, more "
        "messages than DDP's one all-reduce, for 1/2 of the learned parts' weights, gradients "
        "and AdamW state per rank; the resident memory also holds the teachers, the data and "
        "Python. With the teachers sharded too (training.teacher_parallel fsdp), "
        f"{sharded.tokens_per_s / ddp.tokens_per_s:.2f}x DDP's tokens/s and a rank's peak at "
        f"{sharded.peak_rss_mib / ddp.peak_rss_mib:.2f}x DDP's ({sharded.peak_rss_mib:.0f} MiB): "
        "every teacher forward now gathers each layer's weights from the other rank, and while a "
        "teacher runs its embeddings and head stay gathered, in FSDP's all-gather buffer and "
        "copied out of it. Sharding saves half of each teacher's weights but adds that gathered "
        "group, so it lowers the peak only where the teachers' layers outweigh one teacher's "
        "embeddings and head (several large teachers on many ranks; `kvd check-shapes --gpus N` "
        "computes it for a spec), not for these small random teachers with 49k-262k vocabularies."
    )


def verdict(full: Measured, ref: Measured | None, two: Measured, n_cores: int) -> str:
    """What the numbers say and what one CPU host allows, without more than they show."""
    speedup = two.tokens_per_s / full.tokens_per_s
    if speedup < 0.95:
        outcome = f"are slower than one process using all of them ({speedup:.2f}x)"
    elif speedup <= 1.05:
        outcome = f"only match one process using all of them ({speedup:.2f}x)"
    else:
        outcome = f"beat one process using all of them ({speedup:.2f}x)"
    if ref is not None and full.config.threads > ref.config.threads:
        gain = full.tokens_per_s / ref.tokens_per_s
        outcome += (
            f", where {full.config.threads} threads give {gain:.2f}x the tokens/s of "
            f"{ref.config.threads} in one process"
        )
    sentence = (
        f"On {n_cores} CPU cores, {two.config.processes} DDP processes {outcome}: both ways "
        f"share the same cores and memory bandwidth, so neither can exceed {n_cores}x one "
        "core, and DDP adds a gloo all-reduce of the student's and projectors' gradients "
        f"(~{two.model_mib:.0f} MiB fp32) over loopback every step, on those same cores; DDP on "
        "one CPU host is the correctness path for multi-GPU and multi-host runs, not a source "
        "of more compute."
    )
    others = [m.other_cores for m in (full, ref, two) if m is not None and m.other_cores]
    if others and max(others) >= 0.2:
        sentence += (
            f" Other work kept up to {max(others):.1f} of the {n_cores} cores busy during these "
            "runs (column `other work, cores`), so the numbers are contended: a run with more "
            "threads than the cores left free suffers most."
        )
    return sentence


def main() -> None:
    with_kvd_allocator("benchmarks.ddp")
    args = arguments(__doc__ or "")
    setup = "smoke" if args.smoke else "tiny3"
    spec_data = SETUPS[setup]()
    steps = WARMUP + args.repeats
    n = cores()
    share = max(1, n // 2)
    full_c = Config("1 process, all cores", 1, n)
    ref_c = Config("1 process, per-process share (reference)", 1, share)
    two_c = Config("2 processes (torchrun, gloo), ddp", 2, share)
    fsdp_c = Config("2 processes (torchrun, gloo), fsdp", 2, share, "fsdp")
    both_c = Config("2 processes (torchrun, gloo), fsdp + teachers", 2, share, "fsdp", "fsdp")
    # --smoke skips the reference: every run costs ~10 s of start-up and loading
    configs = [full_c, two_c, fsdp_c, both_c]
    if not args.smoke:
        configs.insert(1, ref_c)
    with tempfile.TemporaryDirectory(prefix="kvd-bench-ddp-") as tmp:
        results = [measure(c, spec_data, Path(tmp), steps, args.device) for c in configs]
    full, two, fsdp, both = results[0], results[-3], results[-2], results[-1]
    ref = results[1] if len(results) == 5 else None
    rows = []
    for m in results:
        c = m.config
        efficiency: Any = "n/a"
        if ref is not None:
            per_thread = ref.tokens_per_s / ref.config.threads
            efficiency = f"{m.tokens_per_s / (c.processes * c.threads * per_thread):.2f}"
        threads: Any = c.threads
        if m.threads_seen not in (None, c.threads):
            threads = f"{c.threads} (torch saw {m.threads_seen})"
        rows.append(
            [
                c.label,
                c.processes,
                c.placement,
                threads,
                round(m.tokens),
                m.step_s,
                m.tokens_per_s,
                f"{m.tokens_per_s / full.tokens_per_s:.2f}x",
                efficiency,
                m.wall_s,
                m.peak_rss_mib,
                "n/a" if m.other_cores is None else f"{m.other_cores:.2f}",
            ]
        )
    speedup = two.tokens_per_s / full.tokens_per_s
    reference = (
        f", 1 process x {share} thread(s) {ref.tokens_per_s:.0f} tok/s" if ref is not None else ""
    )
    print(
        f"ddp ({setup}, {n} cores): 2 processes {two.tokens_per_s:.0f} tok/s vs 1 process "
        f"{full.tokens_per_s:.0f} tok/s ({speedup:.2f}x){reference}; fsdp "
        f"{fsdp.tokens_per_s:.0f} tok/s, rank peak {fsdp.peak_rss_mib:.0f} vs ddp "
        f"{two.peak_rss_mib:.0f} MiB; fsdp + teachers {both.tokens_per_s:.0f} tok/s, rank "
        f"peak {both.peak_rss_mib:.0f} MiB"
    )
    body = (
        f"Setup `{setup}`, real `kvd train` runs on {args.device}, one after another: {WARMUP} "
        f"warm-up steps, then the median of {args.repeats} steps from each run's "
        f"metrics.jsonl. Every rank gets training.batch_size = "
        f"{spec_data['training']['batch_size']} texts, so 2 processes train on twice the "
        "global batch per step; tokens/s is the step record's global student tokens per second "
        "(summed over ranks), so it, not step time, is the comparison. Threads/process is "
        "OMP_NUM_THREADS. Scaling efficiency is tokens/s over (processes x threads) times the "
        "reference's tokens/s per thread: 1.00 is perfect scaling from the one-share process "
        "(n/a under --smoke, which skips it). Wall s is the whole command (start-up, loading, "
        "steps, one validation batch, one checkpoint); other work, cores is the machine's busy "
        "CPU time (steal included) outside this benchmark and its runs, over the wall time.\n\n"
        + table(
            [
                "configuration",
                "processes",
                "parallel",
                "threads/process",
                "tokens/step",
                "median step s",
                "tokens/s",
                "vs 1 process",
                "scaling efficiency",
                "wall s",
                "rank peak RSS MiB",
                "other work, cores",
            ],
            rows,
        )
        + "\n\n"
        + verdict(full, ref, two, n)
        + fsdp_verdict(two, fsdp, both)
    )
    write_section(args.results, "ddp", "DDP and FSDP on CPU: 2 processes vs 1", body)


if __name__ == "__main__":
    main()
