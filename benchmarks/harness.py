"""What every benchmark shares: the kvd step and its bare baselines on the same models and batches,
interleaved timing, peak memory in a fresh process, and the RESULTS.md writer.

A bare baseline is what the work costs without kvd: each teacher's plain transformers forward on
batches tokenised beforehand (no_grad; the LM head on the real tokens only, and only for teachers
whose logits kvd reads), and a student step. The efficient bare (the headline baseline) takes
kvd's own CE-only student step: a CE-only Trainer on the same spec (LM head on real tokens only,
kvd's chunked CE kernel, the same clipping, optimizer, schedule and step record). The plain HF
bare drives a copy of the student with transformers' forward with labels (head and loss on every
position, padding included), backward and AdamW; the packed bare does the same on each batch's
real tokens packed into one row without padding (`pack`). What the kvd step costs beyond the
efficient bare is distillation itself: tokenising for the teachers, alignment, projection,
fusion and the distillation losses.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity

from kvd.core.memory import read_peak_mb, reset_peak
from kvd.core.runtime import setup_runtime
from kvd.core.types import TokenBatch
from kvd.data.packing import BatchStream
from kvd.data.tokenize import tokenize
from kvd.modeling.capture import capture_kv
from kvd.modeling.nll import IGNORE
from kvd.run.rundir import cpu_model
from kvd.run.train import Trainer
from kvd.spec.runspec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


# -- the two steps ------------------------------------------------------------------------------


def build_trainer(spec_data: dict[str, Any], device: str = "cpu") -> Trainer:
    """A Trainer for `spec_data` whose run dir is never created (nothing is written)."""
    spec = parse_spec(spec_data, base_dir=ROOT)
    run_dir = Path(tempfile.gettempdir()) / "kvd-bench-unused"
    return Trainer(spec, run_dir, setup_runtime(device), ROOT, use_cache=True)


def kvd_step(trainer: Trainer) -> dict[str, Any]:
    """One optimizer step exactly as `kvd train` runs it, with its step record read from the
    device and serialised (log_every 1: the default)."""
    trainer.curriculum.set_step(trainer.state.step)
    record = trainer.train_step().read()
    trainer.state.step += 1
    json.dumps(record)  # the metrics line the loop writes
    return record


@dataclass
class Packed:
    """A student batch's real tokens back to back in one row: input_ids, position_ids and
    labels [1, N], N = the batch's real tokens."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor

    def inputs(self, device: torch.device) -> dict[str, Any]:
        """The student's forward arguments on `device`: no attention_mask and no cache (which
        use_cache builds by default), or transformers does not read the packing."""
        return {
            "input_ids": self.input_ids.to(device),
            "position_ids": self.position_ids.to(device),
            "labels": self.labels.to(device),
            "use_cache": False,
        }


def pack(batch: TokenBatch) -> Packed:
    """The real tokens of `batch` (input_ids, attention_mask [B, T]) packed without padding, as
    transformers' DataCollatorWithFlattening packs for training: one row, position_ids restarting
    at 0 with each text, label IGNORE on each text's first token (no text's last token is taught
    the next text's first).

    Called with no attention_mask and no cache, transformers reads the restarts as text
    boundaries (masking_utils.find_packed_sequence_indices) and builds a block-diagonal causal
    mask (for sdpa and eager, as flash-attention's varlen path does): each token sees its own
    text's prefix at the same positions, so logits and CE equal the padded batch's. One row
    rather than rows cut at seq_len, because a cut text loses its context and one target there.
    The price on sdpa, which has no varlen kernel: the mask is dense, so attention scores N^2
    pairs (about B times the padded batch's B*T^2); projections, MLP and LM head run on the N
    real tokens only."""
    mask = batch.attention_mask.bool()
    input_ids = batch.input_ids[mask][None]
    position_ids = (mask.cumsum(1) - 1)[mask][None]  # 0..n-1 over each text's n real tokens
    return Packed(input_ids, position_ids, input_ids.masked_fill(position_ids == 0, IGNORE))


@dataclass
class BareBatch:
    """One micro-batch tokenised for every model: per teacher (ids, mask, rows), rows [N] the
    flat real positions its LM head runs on, or None (its logits are not read: the head runs on
    the last position only); the student's and, for the packed bare, the student's packed."""

    teachers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    student: TokenBatch
    packed: Packed | None = None

    @property
    def tokens(self) -> int:
        """The real student tokens the student step trains on."""
        if self.packed is not None:
            return self.packed.input_ids.shape[1]
        return int(self.student.attention_mask.sum())


def ce_only(spec_data: dict[str, Any]) -> dict[str, Any]:
    """`spec_data` with CE as its only loss: a Trainer of it runs no teacher and is the
    efficient bare's student step."""
    data = copy.deepcopy(spec_data)
    data["losses"] = [{"name": "ce", "weight": 1.0}]
    return data


class Bare:
    """A baseline on the trainer's teachers and the batches the trainer sees, in the same order:
    plain transformers teacher forwards, then the student step of `ce` (a Trainer of
    `ce_only(spec)`: the efficient bare) or, without `ce`, of a copy of the trainer's student
    driven by plain transformers calls (the HF bare; with `packed`, on packed batches: the
    packed bare)."""

    def __init__(
        self, trainer: Trainer, ce: Trainer | None = None, *, packed: bool = False
    ) -> None:
        if ce is not None and packed:
            raise ValueError("the packed bare drives the HF bare's student: give ce or packed")
        self.trainer = trainer
        self.ce = ce
        self.packed = packed
        readers = trainer.curriculum.stage.logit_readers
        wants_all = trainer.curriculum.stage.fusion.needs_teacher_ce
        self.teachers = [
            (t.loaded, t.add_bos, t.id in readers or wants_all)
            for t in trainer.teacher_side.teachers
            if t.loaded is not None
        ]
        tr = trainer.spec.training
        if ce is None:
            self.student = copy.deepcopy(trainer.student.model)
            self.student.train()
            self.optimizer = torch.optim.AdamW(
                self.student.parameters(), lr=tr.lr, weight_decay=tr.weight_decay
            )
        self.stream = BatchStream(trainer.data.train, tr.batch_size, seed=trainer.spec.seed)
        self.device = trainer.rt.device
        self.bf16 = tr.precision == "bf16"

    def next_batches(self) -> list[BareBatch]:
        """The micro-batches of the next step, tokenised (outside the timed region)."""
        out = []
        seq_len = self.trainer.spec.data.seq_len
        s_bos = self.trainer.student.geometry.adds_bos
        for _ in range(self.trainer.spec.training.grad_accum):
            texts = next(self.stream).texts
            teachers = []
            for loaded, bos, reads in self.teachers:
                b = tokenize(loaded.tokenizer, texts, max_length=None, add_bos=bos)
                rows = b.attention_mask.reshape(-1).nonzero()[:, 0] if reads else None
                ids, mask = b.input_ids.to(self.device), b.attention_mask.to(self.device)
                teachers.append((ids, mask, None if rows is None else rows.to(self.device)))
            s = tokenize(self.trainer.student.tokenizer, texts, max_length=seq_len, add_bos=s_bos)
            out.append(BareBatch(teachers, s, pack(s) if self.packed else None))
        return out

    # boolean attention masks: with int masks transformers builds the 4D mask more slowly
    # (0.50 s vs 0.42 s per SmolLM2 forward, measured); the baseline takes the faster call
    def teacher_forwards(self, batch: BareBatch) -> None:
        for (loaded, _, _), (ids, mask, rows) in zip(self.teachers, batch.teachers, strict=True):
            teacher_forward(loaded.model, ids, mask, rows)

    def student_forward_backward(self, batch: BareBatch) -> None:
        if batch.packed is not None:
            inputs = batch.packed.inputs(self.device)
        else:
            ids = batch.student.input_ids.to(self.device)
            mask = batch.student.attention_mask.to(self.device).bool()
            labels = ids.masked_fill(~mask, IGNORE)
            inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.student(**inputs).loss
        (loss / self.trainer.spec.training.grad_accum).backward()

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, batches: list[BareBatch]) -> dict[str, float]:
        """One bare step on pre-tokenised batches; seconds of the teacher and student parts and
        the student tokens (the efficient bare: as its step record counts them)."""
        t0 = time.perf_counter()
        for b in batches:
            self.teacher_forwards(b)
        sync(self.device)
        t1 = time.perf_counter()
        tokens = sum(b.tokens for b in batches)
        if self.ce is not None:
            before = self.ce.state.tokens
            kvd_step(self.ce)
            tokens = self.ce.state.tokens - before
        else:
            for b in batches:
                self.student_forward_backward(b)
            self.update()
        sync(self.device)
        t2 = time.perf_counter()
        return {"teachers_s": t1 - t0, "student_s": t2 - t1, "step_s": t2 - t0, "tokens": tokens}


@torch.no_grad()
def teacher_forward(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | None
) -> None:
    """A teacher's plain forward on ids, mask [B, T] (bool), its LM head on the flat positions
    rows [N] only (kvd's capture recording no K/V: what narrows the head), or on the last
    position when rows is None."""
    if rows is None:
        model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    else:
        capture_kv(model, ids, mask, layers=[], rows=rows)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@dataclass
class Samples:
    """The counted steps of one side: seconds and student tokens per step."""

    seconds: list[float]
    tokens: list[int]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.seconds)

    @property
    def p90(self) -> float:
        """The 90th percentile (nearest rank)."""
        ordered = sorted(self.seconds)
        return ordered[max(0, -(-9 * len(ordered) // 10) - 1)]


@dataclass
class Overhead:
    """The kvd step against its baseline (the efficient bare when step_overhead had a CE-only
    trainer, else the HF bare; then also the HF bare apart), the packed bare when asked for,
    and how busy the machine was."""

    kvd: Samples
    bare: Samples
    teachers_s: float  # median seconds of the baseline's teacher forwards
    student_s: float  # median seconds of the baseline's student step
    hf: Samples | None
    packed: Samples | None
    load: float  # the 1-minute load average at the end
    cpu_per_wall: float  # this process's CPU seconds per wall second over the run
    cores: int

    @property
    def kvd_s(self) -> float:
        return self.kvd.median

    @property
    def bare_s(self) -> float:
        return self.bare.median

    @property
    def tokens(self) -> int:
        """Student tokens per step (median)."""
        return int(statistics.median(self.kvd.tokens))

    @property
    def ratio(self) -> float:
        return self.kvd_s / self.bare_s

    @property
    def reliable(self) -> bool:
        """False when the machine was busier than its cores (others' work in the timings)."""
        return self.load <= 1.25 * self.cores


BLOCK = 3
"""Steps per block: the sides run in alternating blocks on the same batch sequence."""


def step_overhead(
    trainer: Trainer,
    repeats: int,
    warmup: int = 1,
    ce: Trainer | None = None,
    packed: bool = False,
) -> Overhead:
    """kvd and bare steps in alternating blocks of BLOCK steps on the same batches (the k-th
    step of every side sees batch k, checked by its student tokens); medians, means and p90
    of `repeats` steps per side. With `ce` (a Trainer of `ce_only(spec)`) the baseline is the
    efficient bare and the HF bare runs as a third side; with `packed` the packed bare runs too.

    The first step of every block is not counted: right after a switch the other side's
    buffers are still in the allocator and caches, which neither side meets in a real run
    (measured: +0.1-0.4 s on the first quickstart kvd step after bare steps). `warmup` whole
    rounds go first, uncounted; blocks take turns at going first, so drift hits both sides."""
    bares = {"hf": Bare(trainer)}
    if ce is not None:
        bares["efficient"] = Bare(trainer, ce)
    if packed:
        bares["packed"] = Bare(trainer, packed=True)
    sides = ["kvd", *bares]
    rows: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    counted = BLOCK - 1
    rounds = warmup + -(-repeats // counted)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for r in range(rounds):
        order = sides[r % len(sides) :] + sides[: r % len(sides)]
        for side in order:
            for i in range(BLOCK):
                if side == "kvd":
                    before = trainer.state.tokens
                    t = timed(lambda: kvd_step(trainer), trainer.rt.device)
                    row = {"step_s": t, "tokens": trainer.state.tokens - before}
                else:
                    bare = bares[side]
                    row = bare.step(bare.next_batches())
                if r >= warmup and i:
                    rows[side].append(row)
    cpu_per_wall = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    samples = {
        side: Samples([r["step_s"] for r in rs], [int(r["tokens"]) for r in rs])
        for side, rs in rows.items()
    }
    for side, s in samples.items():
        if s.tokens != samples["kvd"].tokens:
            raise AssertionError(
                f"the {side} bare trained on other tokens than kvd (student tokens per step "
                f"{s.tokens} vs {samples['kvd'].tokens})"
            )
    base = "efficient" if ce is not None else "hf"
    return Overhead(
        kvd=samples["kvd"],
        bare=samples[base],
        teachers_s=statistics.median(r["teachers_s"] for r in rows[base]),
        student_s=statistics.median(r["student_s"] for r in rows[base]),
        hf=samples["hf"] if ce is not None else None,
        packed=samples.get("packed"),
        load=os.getloadavg()[0],
        cpu_per_wall=cpu_per_wall,
        cores=os.cpu_count() or 1,
    )


# -- peak memory in a fresh process --------------------------------------------------------------


MODES = ("kvd", "efficient", "hf")
"""peak_memory's sides: the kvd step, the efficient bare, the HF bare."""


def peak_memory_worker(setup: str, mode: str, steps: int, device: str) -> dict[str, float]:
    """In this process: build `setup`, reset the peak, run `steps` steps of `mode`; the peak
    and what was in use at the reset (the loaded models: the difference is the steps' own)."""
    from benchmarks.setups import SETUPS

    data = SETUPS[setup]()
    trainer = build_trainer(data, device)
    bare = None
    if mode == "efficient":
        bare = Bare(trainer, build_trainer(ce_only(data), device))
    elif mode == "hf":
        bare = Bare(trainer)
    dev = trainer.rt.device
    batches = [bare.next_batches() for _ in range(steps + 1)] if bare else []

    def step(i: int) -> None:
        if bare is not None:
            bare.step(batches[i])
        else:
            kvd_step(trainer)

    gc.collect()
    base = reset_peak(dev)
    for i in range(steps):
        step(i)
    peak = read_peak_mb(dev)
    # CUDA's allocated bytes are tensors already; on the CPU one more step, profiled
    tensors = peak - base if dev.type == "cuda" else tensor_peak_mb(lambda: step(steps))
    return {"peak_mb": peak, "base_mb": base, "tensor_mb": tensors}


def tensor_peak_mb(fn: Callable[[], Any]) -> float:
    """The most memory fn()'s own allocations hold at once (MiB), from every allocation and
    free the profiler records, in order: what a caching allocator would have to provide
    (CUDA's max_memory_allocated), whatever the CPU allocator keeps. The profiler does not see
    frees of memory allocated before fn began: a step that drops the last step's tensors
    (gradients set to None) and makes new ones counts the new ones whole, on every side."""
    with torch.profiler.profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # the raw records: the public FunctionEvents fold each op's allocations into one number
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(records, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


@dataclass
class Peak:
    """A side's peak memory (MiB) over its steps and what was in use before them."""

    peak_mb: float
    base_mb: float
    tensor_mb: float
    """The most memory one more step's own allocations held at once (tensor_peak_mb)."""

    @property
    def steps_mb(self) -> float:
        """The steps' own memory: the peak above the loaded models."""
        return self.peak_mb - self.base_mb


def peak_memory(setup: str, mode: str, steps: int, device: str) -> Peak:
    """Peak memory of `steps` steps of `mode` (one of MODES) in a fresh process."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.harness",
        "peak",
        setup,
        mode,
        str(steps),
        device,
    ]
    out = subprocess.run(
        cmd, cwd=ROOT, env=bench_env(), capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
    return Peak(**json.loads(out.stdout.strip().splitlines()[-1]))


def bench_env() -> dict[str, str]:
    """This process's environment for a child, with mimalloc preloaded as `kvd` runs."""
    from kvd.core.allocator import preload_env

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return preload_env(env)


# -- reporting ----------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """Where and with what the numbers were measured."""
    import transformers

    cpu = cpu_model()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    preload = os.environ.get("LD_PRELOAD", "")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "device": device,
        "allocator": "mimalloc" if "mimalloc" in preload else "system",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
    }


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; floats with 3 significant digits."""

    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


HEADER = """# kvd benchmark results

Written by the scripts in `benchmarks/` (`python -m benchmarks.NAME`, see benchmarks/README.md);
each script replaces its own section. Times are medians over repeats; ratios are taken against a
baseline measured in the same process, on the same models and batches.
"""


def write_section(path: Path, key: str, title: str, body: str) -> None:
    """Replace (or append) the section `key` of the results file with `body` under a header
    naming the machine, versions and date."""
    info = machine()
    meta = "\n".join(f"- {k}: {v}" for k, v in info.items())
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    section = f"{start}\n## {title}\n\n{meta}\n\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


def arguments(description: str, repeats: int = 8) -> argparse.Namespace:
    """The options every benchmark script takes; `repeats` is the default of --repeats."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny models, 2 repeats: a CI-sized run")
    p.add_argument(
        "--repeats", type=int, default=None, help=f"timed repeats, median reported ({repeats})"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--results", type=Path, default=RESULTS, help="the results file to update")
    p.add_argument(
        "--setups",
        type=lambda text: text.split(","),
        default=None,
        help="comma-separated setups of benchmarks/setups.py instead of the script's own",
    )
    args = p.parse_args()
    if args.repeats is None:
        args.repeats = 2 if args.smoke else repeats
    return args


def with_kvd_allocator(module: str) -> None:
    """Re-execute `python -m MODULE` with mimalloc preloaded, as the `kvd` command does."""
    from kvd.core.allocator import reexec_with_mimalloc

    reexec_with_mimalloc(sys.argv[1:], module=module)


def main() -> None:
    """`python -m benchmarks.harness peak SETUP MODE STEPS DEVICE` (used by peak_memory)."""
    _, setup, mode, steps, device = sys.argv[1:]
    print(json.dumps(peak_memory_worker(setup, mode, int(steps), device)))


if __name__ == "__main__":
    main()
