"""`kvd train` under a real `torchrun --nproc_per_node 2` (gloo on CPU) matches one process."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig

from kvd.run.rundir import read_metrics
from tests.conftest import cache_entries, write_tiny_gguf
from tests.specs import tiny_spec

TOLERANCE = 0.005
"""Relative tolerance on each step's loss: each rank averages over its own tokens and the
ranks' means are averaged, which weights tokens slightly differently from one process.
The KV variance guard's statistics are summed over the ranks (kvd.losses.kv.global_sum), so
the guard standardises as one process would; with per-rank statistics (like BatchNorm without
synchronisation) the first step's loss was 2.80 against 2.54."""


def losses(run_dir: Path) -> list[float]:
    return [r["loss/total"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss/total" in r]


@pytest.mark.slow
@pytest.mark.parametrize("guard", ["none", "variance"])
def test_two_process_run_matches_single_process(tmp_path: Path, guard: str) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun ships with torch"
    env = dict(os.environ, OMP_NUM_THREADS="1", KVD_ALLOCATOR="system")
    losses_ = [{"name": "kv_mse", "guard": guard}, {"name": "ce"}]
    single = tiny_spec(tmp_path / "one", losses=losses_)
    single["training"]["batch_size"] = 4
    double = tiny_spec(tmp_path / "two", losses=losses_)
    double["training"]["batch_size"] = 2  # per process: the same 4 texts per step in total
    for name, data in (("one", single), ("two", double)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    subprocess.run(
        [sys.executable, "-m", "kvd.cli", "train", str(tmp_path / "one.yaml")],
        check=True,
        env=env,
        capture_output=True,
    )
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "kvd.cli",
            "train",
            str(tmp_path / "two.yaml"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=TOLERANCE)
    # the same texts per step in total: token counts are summed over ranks, exactly
    tokens = [[r["tokens"] for r in read_metrics(d / "metrics.jsonl") if "loss/total" in r]
              for d in (tmp_path / "one", tmp_path / "two")]  # fmt: skip
    assert tokens[0] == tokens[1]
    last = sorted((tmp_path / "two" / "checkpoints").glob("step-*"))[-1]
    assert yaml.safe_load((last / "state.json").read_text())["world"] == 2


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_a_checkpoint_on_every_rank_and_the_run_resumes(
    tmp_path: Path,
) -> None:
    """The preemption path of examples/slurm*.sbatch: SIGTERM to torchrun reaches every rank
    (torchrun forwards it and waits 30 s before SIGKILL); kvd saves a checkpoint at the end of
    the step it is in, and the same torchrun command resumes from it to the end."""
    import signal
    import time

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun ships with torch"
    env = dict(os.environ, OMP_NUM_THREADS="1", KVD_ALLOCATOR="system")
    data = tiny_spec(tmp_path / "run")
    data["training"].update(max_steps=100, checkpoint_every=1000, batch_size=2)
    data["evaluation"] = {"every": 1000, "batches": 1}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "kvd.cli", "train", str(spec)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (tmp_path / "run" / "metrics.jsonl").exists() or len(losses(tmp_path / "run")) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, "a preempted run does not report success"
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert saved, err.decode()[-3000:]
    step = int(saved[-1].name.removeprefix("step-"))
    assert 3 <= step < 100
    assert yaml.safe_load((saved[-1] / "state.json").read_text())["world"] == 2
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming the run in {tmp_path / 'run'} from step {step}" in done.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")][-1] == 100


def torchrun_module(*module_args: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE ARGS...` as 2 torchrun workers (1 thread each) from the repository root,
    with `env_vars` added to the environment."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun ships with torch"
    env = dict(os.environ, OMP_NUM_THREADS="1", KVD_ALLOCATOR="system", **env_vars)
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", *module_args]
    root = Path(__file__).parent.parent
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)


def torchrun_train(spec: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return torchrun_module("kvd.cli", "train", str(spec), *extra)


def train_one_process(spec: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", KVD_ALLOCATOR="system")
    cmd = [sys.executable, "-m", "kvd.cli", "train", str(spec), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def keep_only_step_2(run: Path) -> None:
    """The run as if killed during step 3: its step-2 checkpoint and no outputs."""
    for gone in ("results.json", "heads.safetensors", "student", "checkpoints/step-00000004"):
        shutil.rmtree(run / gone) if (run / gone).is_dir() else (run / gone).unlink()


@pytest.mark.slow
def test_fsdp_matches_ddp_and_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """training.parallel: fsdp (FSDP2, every decoder layer sharded over 2 gloo processes; the
    teachers sharded too, training.teacher_parallel: fsdp) trains as ddp does: the same loss at
    every step, the same exported student and heads. Its checkpoints are DCP files (one per
    rank, nothing gathered); they resume the run on 2 processes to the same losses, and on 1
    process (with the same global batch) to the same losses within the 1-vs-2-process
    tolerance; `kvd export` reads them. A resume that changes the parallelism, or the global
    batch, or a ddp run's number of processes, is refused."""
    from safetensors.torch import load_file

    losses_ = [{"name": "kv_mse", "guard": "variance"}, {"name": "ce"}]
    for parallel in ("ddp", "fsdp"):
        data = tiny_spec(tmp_path / parallel, losses=losses_)
        data["training"] |= {"batch_size": 2, "parallel": parallel, "checkpoint_every": 2}
        data["training"]["teacher_parallel"] = "fsdp" if parallel == "fsdp" else "replicate"
        (tmp_path / f"{parallel}.yaml").write_text(yaml.safe_dump(data))
        proc = torchrun_train(tmp_path / f"{parallel}.yaml")
        assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, fsdp = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert len(ddp) == 4 and fsdp == pytest.approx(ddp, rel=1e-5)
    for name in ("student/model.safetensors", "heads.safetensors"):
        a, b = load_file(tmp_path / "ddp" / name), load_file(tmp_path / "fsdp" / name)
        assert sorted(a) == sorted(b), name
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), name
    run = tmp_path / "fsdp"
    files = {p.name for p in (run / "checkpoints" / "step-00000004").iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= files
    assert "model.safetensors" not in files  # each rank wrote its own shards
    # kvd export reads a sharded checkpoint in one process: the student the run wrote
    out = tmp_path / "exported"
    proc = subprocess.run(
        [sys.executable, "-m", "kvd.cli", "export", str(run), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(out / "model.safetensors"), load_file(run / "student" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the step-2 checkpoint alone resumes on 2 processes to the same losses
    keep_only_step_2(run)
    proc = torchrun_train(tmp_path / "fsdp.yaml", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming the run" in proc.stderr + proc.stdout
    assert losses(run) == fsdp  # steps 3-4 again, equal to the uninterrupted run
    # ... and on 1 process, once the per-process batch keeps the global batch (2 x 2)
    keep_only_step_2(run)
    proc = train_one_process(tmp_path / "fsdp.yaml", "--resume")
    assert proc.returncode == 2 and "--set training.batch_size=4" in proc.stderr, proc.stderr
    proc = train_one_process(tmp_path / "fsdp.yaml", "--resume", "--set", "training.batch_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(run)[:2] == fsdp[:2]
    assert losses(run)[2:] == pytest.approx(fsdp[2:], rel=TOLERANCE)
    # its step-4 checkpoint (1 process x 4) goes back to 2 processes with the spec's own 2
    for gone in ("results.json", "heads.safetensors", "student"):
        shutil.rmtree(run / gone) if (run / gone).is_dir() else (run / gone).unlink()
    proc = torchrun_train(tmp_path / "fsdp.yaml", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run / "results.json").unlink()
    proc = torchrun_train(tmp_path / "fsdp.yaml", "--resume", "--set", "training.parallel=ddp")
    assert proc.returncode != 0 and "training.parallel" in proc.stderr
    assert "exitcode  : 2" in proc.stderr  # kvd's bad-input exit on the ranks (torchrun: 1)
    # a ddp checkpoint holds every rank's place in its batches: it resumes on 2 processes only
    keep_only_step_2(tmp_path / "ddp")
    proc = train_one_process(tmp_path / "ddp.yaml", "--resume", "--set", "training.batch_size=4")
    assert proc.returncode == 2 and "written by 2 process(es)" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_sharded_teachers_give_the_targets_of_whole_ones(tmp_path: Path) -> None:
    """training.teacher_parallel: fsdp shards each teacher over the processes; on every rank,
    K/V (captured, un-rotated, aligned), logits and per-sequence CE are bit-identical to whole
    teachers', for bf16 teachers over gloo (tests/dist_targets.py): llama's embeddings and head
    untied (each its own FSDP group), qwen's tied (in the root group)."""
    losses_ = [{"name": "kv_mse"}, {"name": "logit_kd", "teachers": ["llama"]}, {"name": "ce"}]
    data = tiny_spec(tmp_path / "run", losses=losses_, fusion={"name": "lowest_ce"})
    for teacher in data["teachers"]:
        teacher["dtype"] = "bfloat16"
    llama, qwen = (t["config"] for t in data["teachers"])
    assert not AutoConfig.for_model(**llama).tie_word_embeddings  # llama's default: untied
    qwen["tie_word_embeddings"] = True
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    proc = torchrun_module("tests.dist_targets", str(tmp_path / "spec.yaml"), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["sharded_teacher_params"] == ["DTensor"]  # the teachers were sharded
        kinds = {name.rsplit("/", 1)[-1] for name in report["names"]}
        assert {"k0", "k1", "v0", "v1", "logits", "ce", "mask"} <= kinds
        assert report["equal"] == report["names"]


@pytest.mark.slow
def test_sharded_untied_teacher_gathers_embeddings_and_head_one_at_a_time(tmp_path: Path) -> None:
    """shard_frozen makes untied input embeddings and LM head a group each, gathered around their
    own call: a forward's tensor peak holds one of them (twice: FSDP's all-gather buffer and the
    weight copied out of it) plus logits, where the old grouping (both in the root group, gathered
    for the whole forward) held both, twice (measured 17.0 vs 32.3 MiB, 8 MiB each). A tied
    pair stays in the root group (peak as before). Logits bit-identical to the whole model's
    (tests/dist_shard_peak.py)."""
    proc = torchrun_module("tests.dist_shard_peak", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert all(got[f"{tied}/{g}_equal"] for tied in ("untied", "tied") for g in ("new", "old"))
        embeddings, head = got["untied/embeddings_mib"], got["untied/head_mib"]
        assert got["untied/old"] >= 2 * (embeddings + head)
        assert got["untied/new"] < 2 * max(embeddings, head) + 2 * got["untied/whole"]
        assert got["tied/new"] == got["tied/old"]


@pytest.mark.slow
def test_kvd_closes_the_process_group_it_opened_and_keeps_a_callers(tmp_path: Path) -> None:
    """Under torchrun, a kvd command closes the gloo group it opened once every rank has
    finished (a process that exits with its group open tears it down at interpreter exit, where
    gloo's worker threads may still hold work: a CI run once aborted with `terminate called
    without an active exception`); both trainings of `--baseline` share that group; a group
    the caller opened stays open (tests/dist_teardown.py)."""
    data = tiny_spec(tmp_path / "unused", losses=[{"name": "ce"}])
    data["training"] |= {"max_steps": 2}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    for mode, left in (("own", False), ("callers", True)):
        proc = torchrun_module(
            "tests.dist_teardown", mode, str(tmp_path / "spec.yaml"), str(tmp_path)
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        for rank in (0, 1):
            got = json.loads((tmp_path / f"{mode}-rank{rank}.json").read_text())
            assert got == {"code": 0, "group_left": left}
        assert (tmp_path / mode / "results.json").is_file()
        assert (tmp_path / f"{mode}-ce-baseline" / "results.json").is_file()


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_and_cpu_offload_train_as_ddp_bf16(tmp_path: Path) -> None:
    """training.precision: bf16 under fsdp gathers the student's weights as bf16 and reduces
    gradients in fp32 (FSDP2's MixedPrecisionPolicy), with cpu_offload's policy on top (on a
    CPU run it moves nothing): the losses of ddp under bf16 autocast within 1e-3 (measured
    4e-4), finite at every step."""
    runs = {}
    for name, extra in (("ddp", {}), ("fsdp", {"parallel": "fsdp", "cpu_offload": True})):
        data = tiny_spec(tmp_path / name, losses=[{"name": "kv_mse"}, {"name": "ce"}])
        data["training"] |= {"batch_size": 2, "precision": "bf16", **extra}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
        proc = torchrun_train(tmp_path / f"{name}.yaml")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = losses(tmp_path / name)
    assert len(runs["fsdp"]) == 4 and all(math.isfinite(x) for x in runs["fsdp"])
    assert runs["fsdp"] == pytest.approx(runs["ddp"], rel=1e-3)


@pytest.mark.slow
def test_one_process_per_node_converts_a_gguf_teacher_while_the_other_waits(
    tmp_path: Path,
) -> None:
    """Under torchrun, the node's first process converts a GGUF teacher into an empty kvd cache
    and the other loads the converted copy after it: one conversion, not one per process at the
    same time (each holds the dequantised weights: ~3.9 GB for Qwen2.5-Coder-0.5B)."""
    gguf = write_tiny_gguf(tmp_path / "teacher.gguf")
    teachers = [{"id": "g", "source": "gguf", "path": str(gguf)}]
    data = tiny_spec(tmp_path / "run", teachers=teachers)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    cache = tmp_path / "kvd-cache"
    env = {"KVD_CACHE_DIR": str(cache)}
    proc = torchrun_module("tests.dist_prepare", str(tmp_path / "spec.yaml"), str(tmp_path), **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "done-rank0").is_file() and (tmp_path / "done-rank1").is_file()
    spans = {r: json.loads((tmp_path / f"convert-rank{r}.json").read_text()) for r in (0, 1)}
    assert len(spans[0]) == 1 and spans[1] == []
    assert len(cache_entries(cache / "gguf")) == 1
