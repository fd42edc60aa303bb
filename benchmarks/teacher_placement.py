"""Where the frozen teachers live under torchrun: replicated, FSDP-sharded, or placed whole on
chosen ranks with their aligned targets sent to the ranks that need them (issue 16).

    python -m benchmarks.teacher_placement [--smoke] [--repeats N] [--results PATH]

Three configurations of the teacher side of a step, each a fresh `torchrun --standalone
--nproc_per_node 2` job (gloo on CPU, an equal share of the cores per process), on the same global
batches (tiny3; smoke under --smoke):

- replicate: `training.teacher_parallel: replicate`, built by kvd.run.assemble; every rank holds
  every teacher whole and runs all of them on its own batch (training.batch_size texts).
- fsdp: `training.teacher_parallel: fsdp` (kvd.modeling.sharding.shard_frozen), built the same
  way; every rank runs all teachers on its own batch, each forward gathering one layer's weights
  at a time from the other rank.
- placed: a prototype that lives in this file only. Teacher i is loaded whole on rank i % world
  alone (kvd's TeacherSide given that rank's teachers). Each rank runs its teachers over the
  whole global batch, as one `TeacherSide.targets` call per destination rank's share, packs the
  targets (kvd.step.teacher_cache.pack: K/V at the student layers and positions, masks, aligned
  logits or their top k where a loss reads them, CE where the fusion routes on it) and sends each
  rank its share in one buffer (gloo isend/irecv); each rank unpacks what it receives into
  TeacherTargets.

Why one call per share and not one forward over both shares: a forward over all 2B texts pads
every row to the longest text of the global batch, and the bf16 kernels then round the real
positions of a row padded further than in its own batch differently (measured while building
this: up to one bf16 ulp in some layers' keys and in the logits of 2 of tiny3's 3 teachers), so
its targets would not be replicate's; it was no faster on this CPU either (the extra padding is
computed too). Per share, the placed targets are bit for bit replicate's, and the benchmark
asserts it: every rank compares (torch.equal) every step's targets, after unpacking, against the
targets the replicate job computed for the same rank and step (and records the same comparison
for fsdp).

Measured per rank and step: seconds of the teacher side (a barrier first, so every step starts
together; the step's slowest rank is the step's time), split for placed into its teachers'
compute (targets and pack) and the exchange (layout, transfer, unpack); the bytes of targets sent
and received (placed, measured: the payload buffers, not the small pickled layout); for fsdp an
estimate of the weights gathered: one all-gather of every teacher parameter per forward
(reshard_after_forward), i.e. the bytes of the shards a rank lacks in and its own shard out to
each other rank; the teacher weights a rank holds (local parameter bytes, exact); the
process's resident set after loading and its peak over the steps (Linux VmHWM reset after
loading, mimalloc as `kvd` runs: it keeps what loading left behind); and, from one more step
under torch.profiler (profile_memory, untimed), the peak of tensor bytes that step allocates less
frees: activations, targets, send and receive buffers, FSDP's gathered weights. Medians over the
steps after WARMUP.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile

from benchmarks.ddp import cores, run_child, torchrun
from benchmarks.harness import (
    RESULTS,
    ROOT,
    arguments,
    table,
    with_kvd_allocator,
    write_section,
)
from benchmarks.memory_plan import tensor_peak_mb
from benchmarks.setups import SETUPS
from kvd.core.memory import read_peak_mb, reset_peak

WARMUP = 2
CONFIGS = ("replicate", "fsdp", "placed")
ALIGN = 64
"""Each tensor starts at a multiple of this many bytes of a send buffer: the receiver views it in
place as its dtype (a view needs an offset divisible by the element size)."""

Layout = list[tuple[str, str, list[int], int, int]]
"""A send buffer's contents: (name, dtype, shape, byte offset, byte size) per tensor."""


# -- the placement prototype --------------------------------------------------------------------


def owned_teachers(spec: Any, rank: int, world: int) -> list[str]:
    """Ids of the teachers rank `rank` holds under placement: teacher i on rank i % world."""
    return [ref.id for i, ref in enumerate(spec.teachers) if i % world == rank]


def share_batches(parts: Any, rt: Any) -> list[Any]:
    """Every rank's StudentBatches (this rank's is `parts.batches`): each draws the same seeded
    global batch and keeps rows rank::world, as that rank's own does."""
    from kvd.core.runtime import Runtime
    from kvd.data.batches import StudentBatches

    own = parts.batches
    out = []
    for r in range(rt.world):
        if r == rt.rank:
            out.append(own)
            continue
        out.append(
            StudentBatches(
                own.windows,
                own.tokenizer,
                Runtime(rt.device, r, rt.world),
                batch_size=own.batch_size,
                seq_len=own.seq_len,
                add_bos=own.add_bos,
                seed=own.seed,
                append_eos=own.append_eos,
            )
        )
    return out


def layout_of(tensors: dict[str, torch.Tensor]) -> tuple[Layout, int]:
    """Where each of these named tensors (any shapes and dtypes) goes in one byte buffer, each at
    an ALIGN-byte offset, and the buffer's size."""
    layout: Layout = []
    offset = 0
    for name, x in tensors.items():
        size = x.numel() * x.element_size()
        layout.append((name, str(x.dtype).removeprefix("torch."), list(x.shape), offset, size))
        offset += -(-size // ALIGN) * ALIGN
    return layout, offset


def as_bytes(x: torch.Tensor) -> torch.Tensor:
    """Tensor `x` (any shape and dtype) as its bytes: uint8 [x.numel() * x.element_size()]."""
    return x.contiguous().reshape(-1).view(torch.uint8)


def flatten(tensors: dict[str, torch.Tensor], device: torch.device) -> tuple[Layout, torch.Tensor]:
    """Named tensors -> their layout and one uint8 buffer [N] on `device` holding them."""
    layout, total = layout_of(tensors)
    buffer = torch.empty(total, dtype=torch.uint8, device=device)
    for (_, _, _, start, size), x in zip(layout, tensors.values(), strict=True):
        buffer[start : start + size] = as_bytes(x)
    return layout, buffer


def unflatten(layout: Layout, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inverse of `flatten`: views into buffer [N] uint8, no copy."""
    out = {}
    for name, dtype, shape, start, size in layout:
        out[name] = buffer[start : start + size].view(getattr(torch, dtype)).view(shape)
    return out


@dataclass
class Traffic:
    """Payload bytes of one exchange: sent by this rank, received by it."""

    sent: int = 0
    received: int = 0


def exchange(
    outgoing: dict[int, dict[str, torch.Tensor]], rt: Any
) -> tuple[dict[str, torch.Tensor], Traffic]:
    """outgoing[q]: the packed targets this rank's teachers computed for rank q's batch (q =
    this rank included; {} for a rank that owns no teacher). Every rank sends each other rank
    its part in one buffer (the layouts first, as pickled objects) and gets the others' parts:
    returns this rank's packed targets of every teacher (names `0/<teacher>/...`, as `pack`
    writes them) and the bytes moved."""
    sends = {q: flatten(t, rt.device) for q, t in outgoing.items() if q != rt.rank and t}
    layouts: list[dict[int, Layout] | None] = [None] * rt.world
    dist.all_gather_object(layouts, {q: layout for q, (layout, _) in sends.items()})
    traffic = Traffic()
    ops = []
    for q, (_, buffer) in sends.items():
        ops.append(dist.P2POp(dist.isend, buffer, q))
        traffic.sent += buffer.numel()
    inbox: dict[int, tuple[Layout, torch.Tensor]] = {}
    for src, theirs in enumerate(layouts):
        layout = (theirs or {}).get(rt.rank) if src != rt.rank else None
        if layout:
            nbytes = max(start + -(-size // ALIGN) * ALIGN for _, _, _, start, size in layout)
            inbox[src] = (layout, torch.empty(nbytes, dtype=torch.uint8, device=rt.device))
            ops.append(dist.P2POp(dist.irecv, inbox[src][1], src))
            traffic.received += nbytes
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    mine = dict(outgoing.get(rt.rank, {}))
    for layout, buffer in inbox.values():
        mine |= unflatten(layout, buffer)
    return mine, traffic


@dataclass
class StepTimes:
    """One rank's seconds of one step's teacher side: the whole, its teachers' compute (targets
    and, placed, pack), the exchange (placed), and each of its teachers' share of compute."""

    total: float
    compute: float
    exchange: float
    per_teacher: dict[str, float]


def run_teachers(
    side: Any, stage: Any, texts: list[str], batch: Any, step: int
) -> tuple[dict[str, Any], dict[str, float]]:
    """`side.targets` for these texts (student tokens `batch`, input_ids [B, Ts]), one teacher
    at a time in the side's order (every rank calls them in the same order: FSDP's gathers are
    collectives), timed per teacher: TeacherTargets per teacher id and seconds per teacher id."""
    out: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for t in side.teachers:
        if t.id not in stage.teachers:
            continue
        start = time.perf_counter()
        out |= side.targets(replace(stage, teachers=[t.id]), texts, batch, step=step)
        seconds[t.id] = time.perf_counter() - start
    return out, seconds


def placed_step(
    side: Any, stage: Any, shares: list[tuple[list[str], Any]], step: int, rt: Any
) -> tuple[dict[str, Any], StepTimes, Traffic]:
    """One placed step: this rank's teachers over every rank's share of the global batch
    (shares[q]: rank q's texts and student tokens [B, Ts]), packed per destination, exchanged;
    returns this rank's TeacherTargets of every teacher (K/V [B, Ht, Ts, Dt] per student layer,
    mask [B, Ts], logits [B, Ts, V] where read, CE [B] where routed on), the step's times and
    the bytes moved."""
    from kvd.step.teacher_cache import pack, unpack

    start = time.perf_counter()
    outgoing: dict[int, dict[str, torch.Tensor]] = {}
    per_teacher: dict[str, float] = {}
    for q, (texts, batch) in enumerate(shares):
        targets, seconds = run_teachers(side, stage, texts, batch, step)
        outgoing[q] = pack(targets, 0) if targets else {}
        for tid, s in seconds.items():
            per_teacher[tid] = per_teacher.get(tid, 0.0) + s
    computed = time.perf_counter()
    mine, traffic = exchange(outgoing, rt)
    targets = unpack(mine, 0, rt.device, {})
    end = time.perf_counter()
    return targets, StepTimes(end - start, computed - start, end - computed, per_teacher), traffic


# -- one rank of one configuration (under torchrun) ---------------------------------------------


def held_and_gathered(side: Any, world: int) -> tuple[int, int, int]:
    """Bytes of teacher weights this rank holds (local shards of sharded parameters, a tied
    weight once), and the fsdp estimate of one forward of every teacher: the shards it lacks
    (gathered in) and its own shards once to each other rank (sent out)."""
    held = lacking = 0
    seen: set[int] = set()
    for t in side.teachers:
        if t.loaded is None:
            continue
        for p in t.loaded.model.parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            if local.data_ptr() in seen:
                continue
            seen.add(local.data_ptr())
            own = local.numel() * local.element_size()
            held += own
            if isinstance(p, DTensor):
                lacking += p.numel() * p.element_size() - own
    return held, lacking, held * (world - 1) if lacking else 0


def build(config: str, setup: str, rt: Any) -> Any:
    """The run's parts for `config`: kvd.run.assemble's for replicate and fsdp (with
    training.teacher_parallel set); for placed, with this rank's teachers only."""
    from kvd.run.assemble import assemble
    from kvd.spec.runspec import parse_spec

    data = SETUPS[setup]()
    parallel = "fsdp" if config == "fsdp" else "replicate"
    data["training"] = dict(data["training"], teacher_parallel=parallel, device="cpu")
    spec = parse_spec(data, base_dir=ROOT)
    owned = owned_teachers(spec, rt.rank, rt.world) if config == "placed" else None
    return assemble(spec, rt, ROOT, use_cache=False, only=owned)


def targets_file(folder: Path, config: str, rank: int, step: int) -> Path:
    return folder / f"{config}-rank{rank}-step{step}.bin"


def save_targets(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Packed targets (CPU tensors) to `path` as a JSON layout line and `flatten`'s bytes,
    written tensor by tensor from their own memory (no copy: received targets are views of
    several dtypes into one buffer, which torch.save refuses)."""
    layout, total = layout_of(tensors)
    header = json.dumps(layout).encode() + b"\n"
    with path.open("wb") as f:
        f.write(header)
        base = len(header)
        for (_, _, _, start, _), x in zip(layout, tensors.values(), strict=True):
            f.seek(base + start)
            f.write(as_bytes(x).numpy().data)
        f.truncate(base + total)


def load_targets(path: Path) -> dict[str, torch.Tensor]:
    """The inverse of `save_targets`."""
    data = bytearray(path.read_bytes())
    end = data.index(b"\n") + 1
    layout = json.loads(data[:end])
    return unflatten(layout, torch.frombuffer(data, dtype=torch.uint8, offset=end))


def compare(mine: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> str | None:
    """None when both packed targets hold the same names with torch.equal tensors, else what
    differs first."""
    if mine.keys() != reference.keys():
        return f"names differ: {sorted(mine.keys() ^ reference.keys())[:6]}"
    for name, x in mine.items():
        y = reference[name]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            return f"{name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}"
    return None


def one_step(
    config: str, parts: Any, batches: list[Any], step: int, rt: Any, fsdp: Traffic
) -> tuple[dict[str, Any], StepTimes, Traffic]:
    """Step `step` of the teacher side under `config`: the next batch of every rank in
    `batches` (this rank's only, but for placed), a barrier, then the timed targets (fsdp: the
    weights-gathered estimate as its traffic)."""
    parts.curriculum.set_step(step)
    stage = parts.curriculum.stage
    shares = [(texts, batch) for texts, _, batch in (b.next() for b in batches)]
    dist.barrier()
    if config == "placed":
        return placed_step(parts.teachers, stage, shares, step, rt)
    start = time.perf_counter()
    targets, seconds = run_teachers(parts.teachers, stage, *shares[0], step)
    total = time.perf_counter() - start
    return targets, StepTimes(total, total, 0.0, seconds), fsdp


def worker(config: str, setup: str, steps: int, folder: Path) -> None:
    """One rank of `config`: build, run `steps` timed steps of the teacher side and one more
    under torch.profiler (its tensor peak), save each step's packed targets, then (fsdp,
    placed) compare them with the replicate job's; write this rank's measurements as JSON. A
    placed target that differs from replicate's fails the run."""
    from kvd.core.runtime import setup_runtime
    from kvd.step.teacher_cache import pack

    rt = setup_runtime("cpu")
    parts = build(config, setup, rt)
    batches = share_batches(parts, rt) if config == "placed" else [parts.batches]
    held, lacking, shards = held_and_gathered(parts.teachers, rt.world)
    gathered = Traffic(sent=shards, received=lacking)
    dist.barrier()
    base_mb = reset_peak(rt.device)
    times: list[StepTimes] = []
    traffic: list[Traffic] = []
    for step in range(steps):
        targets, st, moved = one_step(config, parts, batches, step, rt, gathered)
        times.append(st)
        traffic.append(moved)
        save_targets(targets_file(folder, config, rt.rank, step), pack(targets, 0))
    peak_mb = read_peak_mb(rt.device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        targets, _, _ = one_step(config, parts, batches, steps, rt, gathered)
    save_targets(targets_file(folder, config, rt.rank, steps), pack(targets, 0))
    del targets
    mismatch = None
    if config != "replicate":
        for step in range(steps + 1):
            mine = targets_file(folder, config, rt.rank, step)
            reference = targets_file(folder, "replicate", rt.rank, step)
            found = compare(load_targets(mine), load_targets(reference))
            mine.unlink()
            if found is not None:
                mismatch = f"step {step}: {found}"
                break
    result = {
        "rank": rt.rank,
        "world": rt.world,
        "threads": torch.get_num_threads(),
        "teachers": [t.id for t in parts.teachers.teachers],
        "total_s": [t.total for t in times],
        "compute_s": [t.compute for t in times],
        "exchange_s": [t.exchange for t in times],
        "per_teacher_s": [t.per_teacher for t in times],
        "sent": [m.sent for m in traffic],
        "received": [m.received for m in traffic],
        "held": held,
        "base_mb": base_mb,
        "peak_mb": peak_mb,
        "tensor_peak_mb": tensor_peak_mb(prof),
        "mismatch": mismatch,
    }
    (folder / f"{config}-rank{rt.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    if config == "placed" and mismatch is not None:
        raise AssertionError(f"rank {rt.rank}: placed targets differ from replicate's: {mismatch}")


# -- the parent: one torchrun job per configuration ---------------------------------------------


@dataclass
class Measured:
    """One configuration's ranks, as their workers wrote them; other work on the machine."""

    config: str
    ranks: list[dict[str, Any]]
    other_cores: float | None
    wall_s: float

    def counted(self, key: str, rank: int) -> list[Any]:
        return list(self.ranks[rank][key][WARMUP:])

    def median_s(self, rank: int) -> float:
        return float(statistics.median(self.counted("total_s", rank)))

    @property
    def slowest_s(self) -> float:
        """Median over the counted steps of the slowest rank's seconds."""
        per_step = zip(*(self.counted("total_s", r) for r in range(len(self.ranks))), strict=True)
        return float(statistics.median(max(s) for s in per_step))

    def split(self, rank: int) -> tuple[float, float]:
        """Median compute and exchange seconds of `rank` (a rank that finishes its teachers
        first waits for the other's targets inside the exchange)."""
        compute = statistics.median(self.counted("compute_s", rank))
        return float(compute), float(statistics.median(self.counted("exchange_s", rank)))

    def traffic_mib(self, rank: int) -> tuple[float, float]:
        """Median MiB in and out of `rank` per step."""
        received = statistics.median(self.counted("received", rank)) / 2**20
        sent = statistics.median(self.counted("sent", rank)) / 2**20
        return received, sent

    @property
    def equal(self) -> str:
        if self.config == "replicate":
            return "(reference)"
        bad = [r["mismatch"] for r in self.ranks if r["mismatch"]]
        return "yes, every step and rank" if not bad else f"no: {bad[0]}"


def run_config(config: str, setup: str, steps: int, folder: Path, threads: int) -> Measured:
    """`config` as a 2-process torchrun job of this module's worker; its ranks' JSON."""
    args = ["benchmarks.teacher_placement", "worker", config, setup, str(steps), str(folder)]
    child = run_child(torchrun(2, *args), ROOT, threads, config)
    ranks = [json.loads((folder / f"{config}-rank{r}.json").read_text()) for r in range(2)]
    return Measured(config, ranks, child.other_cores, child.wall_s)


def placement_balance(replicate: Measured) -> str:
    """From replicate's per-teacher seconds (each teacher's cost on the global batch: summed
    over ranks), the teacher compute each rank gets under i % world and under the best split
    of those costs: how much of placed's time is imbalance."""
    world = len(replicate.ranks)
    ids = replicate.ranks[0]["teachers"]
    cost = {
        tid: sum(
            statistics.median(s[tid] for s in replicate.counted("per_teacher_s", r))
            for r in range(world)
        )
        for tid in ids
    }

    def loads(assign: tuple[int, ...]) -> list[float]:
        out = [0.0] * world
        for tid, rank in zip(ids, assign, strict=True):
            out[rank] += cost[tid]
        return out

    modulo = tuple(i % world for i in range(len(ids)))
    best = min(itertools.product(range(world), repeat=len(ids)), key=lambda a: max(loads(a)))

    def describe(assign: tuple[int, ...]) -> str:
        parts = []
        for rank, load in enumerate(loads(assign)):
            held = ", ".join(t for t, a in zip(ids, assign, strict=True) if a == rank) or "none"
            parts.append(f"rank {rank} {{{held}}} {load:.2f} s")
        return "; ".join(parts)

    costs = ", ".join(f"{tid} {c:.2f} s" for tid, c in cost.items())
    return (
        f"Each teacher's compute on the global batch (replicate's per-teacher medians summed over "
        f"ranks): {costs}. Placed by i % world: {describe(modulo)}; the best split of these costs "
        f"would be {describe(best)} (an estimate from these medians, not measured)."
    )


def verdict(rows: dict[str, Measured]) -> str:
    """What the numbers say, without more than they show."""
    rep, fsdp, placed = rows["replicate"], rows["fsdp"], rows["placed"]
    (c0, x0), (c1, x1) = placed.split(0), placed.split(1)
    r_in, r_out = placed.traffic_mib(0)
    o_in, o_out = placed.traffic_mib(1)
    peaks = {c: max(r["peak_mb"] for r in m.ranks) for c, m in rows.items()}
    tensors = {
        c: max(r["held"] / 2**20 + r["tensor_peak_mb"] for r in m.ranks) for c, m in rows.items()
    }
    return (
        f"The slowest rank's teacher side takes {rep.slowest_s:.2f} s replicated, "
        f"{fsdp.slowest_s:.2f} s ({fsdp.slowest_s / rep.slowest_s:.2f}x) with the teachers "
        f"sharded and {placed.slowest_s:.2f} s ({placed.slowest_s / rep.slowest_s:.2f}x) placed, "
        f"where rank 0 computes its teachers' targets for {c0:.2f} s and exchanges for "
        f"{x0:.2f} s, rank 1 {c1:.2f} s and {x1:.2f} s (the exchange waits for the slower "
        f"rank): rank 0 receives {r_in:.1f} MiB and sends {r_out:.1f} MiB of targets a step, "
        f"rank 1 {o_in:.1f} / {o_out:.1f}. With FSDP a rank gathers "
        f"{fsdp.traffic_mib(0)[0]:.0f} MiB of teacher weights a step (estimate), one group "
        "(a decoder layer, the input embeddings or the head) at a time, held twice at the "
        "next group's gather (kvd.modeling.sharding.shard_frozen). A rank's teacher tensors "
        "at their peak (weights held plus "
        f"the step's tensor peak, the larger rank): {tensors['replicate']:.0f} MiB replicated, "
        f"{tensors['fsdp']:.0f} sharded, {tensors['placed']:.0f} placed; the largest peak "
        f"resident set {peaks['replicate']:.0f}, {peaks['fsdp']:.0f} and {peaks['placed']:.0f} "
        "MiB (which also holds what loading left behind: tokenizers, the whole teachers before "
        "sharding, the student, data and Python). " + placement_balance(rep)
    )


def results_given() -> bool:
    """Whether --results was on the command line (a smoke run writes only then)."""
    return any(a == "--results" or a.startswith("--results=") for a in sys.argv[1:])


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        config, setup, steps, folder = sys.argv[2:]
        worker(config, setup, int(steps), Path(folder))
        return
    with_kvd_allocator("benchmarks.teacher_placement")
    args = arguments(__doc__ or "")
    if args.device != "cpu":
        sys.exit("teacher_placement measures gloo on CPU only (--device cpu)")
    setup = args.setups[0] if args.setups else ("smoke" if args.smoke else "tiny3")
    steps = WARMUP + args.repeats
    n_cores = cores()
    threads = max(1, n_cores // 2)
    with tempfile.TemporaryDirectory(prefix="kvd-bench-placement-") as tmp:
        rows = {c: run_config(c, setup, steps, Path(tmp), threads) for c in CONFIGS}
    load = os.getloadavg()[0]
    rep = rows["replicate"]
    cells = []
    for config, m in rows.items():
        what = {"replicate": "-", "fsdp": "weights (estimate)", "placed": "targets"}[config]
        traffic = [f"{a:.1f} / {b:.1f}" for a, b in (m.traffic_mib(r) for r in range(2))]
        cells.append(
            [
                config,
                " / ".join(f"{r['held'] / 2**20:.1f}" for r in m.ranks),
                f"{m.median_s(0):.3f}",
                f"{m.median_s(1):.3f}",
                f"{m.slowest_s:.3f}",
                f"{m.slowest_s / rep.slowest_s:.2f}x",
                "; ".join(f"{c:.3f} / {x:.3f}" for c, x in (m.split(r) for r in range(2))),
                what,
                *traffic,
                " / ".join(f"{r['base_mb']:.0f}" for r in m.ranks),
                " / ".join(f"{r['peak_mb']:.0f}" for r in m.ranks),
                " / ".join(f"{r['tensor_peak_mb']:.1f}" for r in m.ranks),
                " / ".join(f"{(r['held'] / 2**20 + r['tensor_peak_mb']):.0f}" for r in m.ranks),
                m.equal,
                "n/a" if m.other_cores is None else f"{m.other_cores:.2f}",
            ]
        )
    header = [
        "configuration",
        "teacher weights held MiB (rank 0 / 1)",
        "median s rank 0",
        "median s rank 1",
        "slowest rank s",
        "vs replicate",
        "compute / exchange s (rank 0; rank 1)",
        "what moves",
        "rank 0 MiB in / out per step",
        "rank 1 MiB in / out per step",
        "RSS after loading MiB (rank 0 / 1)",
        "peak RSS over steps MiB (rank 0 / 1)",
        "step tensor peak MiB (rank 0 / 1)",
        "weights + step tensor peak MiB (rank 0 / 1)",
        "targets equal to replicate's",
        "other work, cores",
    ]
    spec = SETUPS[setup]()
    threads_seen = {r["threads"] for m in rows.values() for r in m.ranks}
    body = (
        f"Setup `{setup}` ({len(spec['teachers'])} teachers, "
        f"{spec['teachers'][0]['dtype']}), 2 processes under torchrun (gloo) on {n_cores} CPU "
        f"cores, {threads} thread(s) each (torch saw {sorted(threads_seen)}), one fresh job per "
        f"configuration, one after another: {WARMUP} warm-up steps, then medians of "
        f"{args.repeats} steps. Every rank gets training.batch_size = "
        f"{spec['training']['batch_size']} texts of the same global batches in every "
        "configuration. Seconds are the teacher side of a step (targets as the student side "
        "reads them); slowest rank s is the median over steps of the slower rank's seconds (a "
        "barrier starts every step). Traffic: placed's is the measured payload of the target "
        "buffers; fsdp's is an estimate, one all-gather of every teacher parameter per forward "
        "(the shards a rank lacks in, its own shard out). Memory: the teacher weights a rank "
        "holds are exact (local parameter bytes); the step tensor peak is the peak of tensor "
        "bytes allocated less freed during one more step under torch.profiler (profile_memory): "
        "activations, targets, send and receive buffers, FSDP's gathered weights; the resident "
        "set is the process's (VmHWM reset after loading, mimalloc keeping freed pages), which "
        "also holds the student, data, tokenizers and Python. Targets equal: torch.equal of every "
        f"packed target, every step and rank, against replicate's. 1-minute load average at the "
        f"end {load:.1f} on {n_cores} cores; other work, cores is the machine's busy CPU time "
        "outside this benchmark over each job's wall time.\n\n"
        + table(header, cells)
        + "\n\n"
        + verdict(rows)
    )
    print(table(header, cells))
    print(verdict(rows))
    print(f"load average {load:.1f} on {n_cores} cores")
    if args.smoke and not results_given():
        print("--smoke without --results: RESULTS.md not written")
        return
    title = "Teacher placement under torchrun: replicate, fsdp, placed"
    write_section(args.results, "teacher_placement", title, body)
    if args.results == RESULTS:
        print(f"wrote the teacher_placement section of {args.results}")


if __name__ == "__main__":
    main()
