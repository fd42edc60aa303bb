"""Long runs that survive faults: SIGKILL and resume exactly, preemption by signal, a crash
while writing a checkpoint, non-finite steps, and checkpoints that would run code."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kvd.cli.app import main
from kvd.core.runtime import PreemptionFlag
from kvd.run.checkpoint import list_checkpoints, verify
from kvd.run.rundir import read_metrics, truncate_metrics
from tests.specs import tiny_spec

ENV = dict(os.environ, OMP_NUM_THREADS="1", KVD_ALLOCATOR="system")


def long_spec(out: Path) -> dict:
    data = tiny_spec(out)
    data["training"].update(max_steps=50, batch_size=8, checkpoint_every=10, keep_checkpoints=10)
    data["evaluation"] = {"every": 1000, "batches": 1}
    return data


def losses(run_dir: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss/total"]
        for r in read_metrics(run_dir / "metrics.jsonl")
        if "loss/total" in r
    }


def start(spec: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "kvd.cli", "train", str(spec)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def train_again(spec: Path) -> subprocess.CompletedProcess[str]:
    """`kvd train SPEC` in a new process, to the end; its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "kvd.cli", "train", str(spec)],
        env=ENV,
        capture_output=True,
        text=True,
    )


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(s >= step for s in losses(run_dir)):
            return
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.005)
    raise AssertionError(f"step {step} not reached")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 50-step run (in a subprocess, like the interrupted ones)."""
    root = tmp_path_factory.mktemp("straight")
    (root / "spec.yaml").write_text(yaml.safe_dump(long_spec(root / "run")))
    subprocess.run(
        [sys.executable, "-m", "kvd.cli", "train", str(root / "spec.yaml")],
        env=ENV,
        check=True,
        capture_output=True,
    )
    return root / "run"


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "student" / "model.safetensors")


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(straight: Path, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(long_spec(tmp_path / "run")))
    proc = start(spec)
    wait_for_step(tmp_path / "run", 37, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    valid, _ = list_checkpoints(tmp_path / "run" / "checkpoints")
    resumed_from = valid[-1].step
    assert resumed_from in (30, 40) and resumed_from <= max(losses(tmp_path / "run"))
    rerun = train_again(spec)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming the run in {tmp_path / 'run'} from step {resumed_from}" in rerun.stderr
    a, b = losses(straight), losses(tmp_path / "run")
    assert sorted(b) == list(range(1, 51))
    assert [b[s] for s in range(resumed_from + 1, 51)] == [
        a[s] for s in range(resumed_from + 1, 51)
    ]
    wa, wb = final_weights(straight), final_weights(tmp_path / "run")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_sigterm_saves_and_exits_143(straight: Path, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(long_spec(tmp_path / "run")))
    proc = start(spec)
    wait_for_step(tmp_path / "run", 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert b"stopped by SIGTERM" in err and b"Traceback" not in err
    valid, _ = list_checkpoints(tmp_path / "run" / "checkpoints")
    stopped = valid[-1].step
    assert stopped == max(losses(tmp_path / "run")) >= 5  # saved at the step it stopped
    subprocess.run(
        [sys.executable, "-m", "kvd.cli", "train", str(spec)],
        env=ENV,
        check=True,
        capture_output=True,
    )
    a, b = losses(straight), losses(tmp_path / "run")
    assert [b[s] for s in range(1, 51)] == [a[s] for s in range(1, 51)]


def test_preemption_flag_records_sigusr1_and_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionFlag() as flag:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert flag.signal == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kvd.run.checkpoint

    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj: object, path: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # the second checkpoint's optimizer state: the disk fills up
            raise OSError(28, "No space left on device")
        real_save(obj, path)  # type: ignore[arg-type]

    monkeypatch.setattr(kvd.run.checkpoint.torch, "save", failing_save)
    data = tiny_spec(tmp_path / "run")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "previous checkpoints are intact" in err
    valid, _ = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.step for c in valid] == [2] and verify(valid[0].path) is None
    monkeypatch.setattr(kvd.run.checkpoint.torch, "save", real_save)
    assert main(["train", str(spec)]) == 0  # resumes from step 2
    steps = sorted(
        r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss/total" in r
    )
    assert steps == [1, 2, 3, 4]


def test_nonfinite_steps_are_skipped_then_stop_with_a_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvd.step.distill import DistillModel

    real = DistillModel.forward
    calls = {"n": 0}

    def poisoned(self: DistillModel, *args: object, **kwargs: object) -> object:
        out = real(self, *args, **kwargs)  # type: ignore[arg-type]
        calls["n"] += 1
        if calls["n"] in (2, 4, 5, 6):  # one bad step, a good one, then three in a row
            out.total = out.total * float("nan")
            out.parts["loss/total"] = torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(DistillModel, "forward", poisoned)
    data = tiny_spec(tmp_path / "run")
    data["training"].update(max_steps=20, checkpoint_every=1, max_nonfinite=3)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "3 non-finite losses or gradients in a row" in err and "Traceback" not in err
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "skipped" in r]
    assert [r["skipped"] for r in records] == [False, True, False, True, True, True]
    valid, _ = list_checkpoints(tmp_path / "run" / "checkpoints")
    newest = valid[-1].path
    assert verify(newest) is None
    weights = load_file(newest / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_an_update_that_overflows_a_weight_stops_before_anything_saves_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finite loss and gradients, but the 3rd optimizer step leaves a weight at inf: the run
    stops with exit 2 naming the parameter; the checkpoints of steps 1-2 are intact and
    finite, and no student, results.json or later checkpoint holds the bad weights."""
    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def overflowing(self: torch.optim.AdamW, *args: Any, **kwargs: Any) -> Any:
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].mul_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    data = tiny_spec(tmp_path / "run")
    data["training"].update(max_steps=6, checkpoint_every=1)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "training stopped at step 3" in err and "non-finite" in err and "student." in err
    assert "Traceback" not in err
    run = tmp_path / "run"
    assert not (run / "results.json").exists() and not (run / "student").exists()
    valid, _ = list_checkpoints(run / "checkpoints")
    assert [c.step for c in valid] == [1, 2]
    for c in valid:
        assert all(
            torch.isfinite(w).all() for w in load_file(c.path / "model.safetensors").values()
        )


def test_a_checkpoint_that_would_run_code_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_spec(tmp_path / "run")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main(["train", str(spec)]) == 0
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    marker = tmp_path / "pwned"
    payload = b"cbuiltins\nexec\n(V" + f"open({str(marker)!r}, 'w').write('x')".encode() + b"\ntR."
    (ckpt / "optimizer.pt").write_bytes(payload)
    manifest = json.loads((ckpt / "manifest.json").read_text())  # an attacker fixes the hashes
    import hashlib

    manifest["files"]["optimizer.pt"] = hashlib.sha256(payload).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "run" / "results.json").unlink()
    assert main(["train", str(spec), "--resume-from", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "optimizer.pt" in err and "Traceback" not in err
    assert not marker.exists()


def test_a_pickled_model_dir_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An HF dir with only pytorch_model.bin (a pickle that would write a marker) is refused."""
    from tests.specs import LLAMA_TEACHER

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({**LLAMA_TEACHER, "architectures": ["LlamaForCausalLM"], "vocab_size": 259})
    )
    marker = tmp_path / "pwned"
    (model / "pytorch_model.bin").write_bytes(
        b"cbuiltins\nexec\n(V" + f"open({str(marker)!r}, 'w').write('x')".encode() + b"\ntR."
    )
    data = tiny_spec(tmp_path / "run")
    data["teachers"][0] = {"id": "pickled", "source": "hf", "path": str(model)}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "safetensors" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_tied_weights_are_stored_once_and_loaded_tied(tmp_path: Path) -> None:
    """A student whose output embedding is its input embedding (tie_word_embeddings) has that
    matrix written once; loading gives it back under both names and a resumed model stays
    tied."""
    import transformers as tf

    from kvd.run.checkpoint import finish, load_checkpoint, staging, write_whole

    config = tf.LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    model = tf.AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    tmp, final = staging(tmp_path, 3)  # as CheckpointManager writes a whole-tensor one
    write_whole(tmp, state, {})
    info = finish(tmp, final, state={}, rng=[])
    stored = load_file(info.path / "model.safetensors")
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored
    assert verify(info.path) is None
    loaded = load_checkpoint(info.path)["model"]
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    fresh = tf.AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_one_writer_per_run_dir_and_a_dead_holder_never_blocks(tmp_path: Path) -> None:
    """A second `kvd train` on a run dir in use (a SLURM requeue while the old job drains)
    exits 2 naming the holder's pid and host; once the holder is killed, its lock is gone."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tmp_path / "run")))
    hold = (
        "import sys, time; from pathlib import Path; from kvd.run.rundir import RunLock; "
        "RunLock.acquire(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path / "run")], env=ENV, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        second = train_again(spec)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by pid {holder.pid} on" in second.stderr
        assert "Traceback" not in second.stderr
        assert [p.name for p in (tmp_path / "run").iterdir()] == [".kvd.lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    done = train_again(spec)
    assert done.returncode == 0 and (tmp_path / "run" / "results.json").exists()


def test_a_full_disk_at_the_final_save_leaves_no_half_student(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk fills while the student is written: exit 2 with a message, no `student/` with
    a config but no weights, no results.json, checkpoints intact; the same command then
    finishes the run."""
    import errno

    from transformers import PreTrainedModel

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tmp_path / "run")))
    real = PreTrainedModel.save_pretrained

    def full_disk(self: PreTrainedModel, path: str | Path, **kwargs: object) -> None:
        (Path(path) / "config.json").write_text("{}")  # the first file made it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "checkpoints are intact" in err
    run = tmp_path / "run"
    assert not (run / "student").exists() and not (run / "results.json").exists()
    assert not list(run.glob(".tmp-*"))
    valid, _ = list_checkpoints(run / "checkpoints")
    assert valid
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real)
    assert main(["train", str(spec)]) == 0
    assert (run / "student" / "model.safetensors").exists()
    json.loads((run / "results.json").read_text())


def test_json_written_by_kvd_is_strict_json() -> None:
    """results.json, eval results and reports hold null where a metric is not finite (Python's
    json would write NaN, which is not JSON)."""
    from kvd.core.files import json_text

    text = json_text({"bpb": float("nan"), "curve": [1.0, float("inf"), -float("inf")], "n": 3})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {
        "bpb": None,
        "curve": [1.0, None, None],
        "n": 3,
    }


def test_a_torn_metrics_record_is_left_out_and_dropped_on_resume(tmp_path: Path) -> None:
    """A kill (or a reader racing a live run) can meet a record written only in part: reading
    skips it, and the resume's truncation leaves only whole records, so the next one appends
    on a line of its own."""
    path = tmp_path / "metrics.jsonl"
    whole = [{"step": 1, "loss/total": 2.5}, {"step": 2, "loss/total": 2.25}]
    text = "".join(json.dumps(r) + "\n" for r in whole)
    path.write_text(text + '{"step": 3, "loss/to', encoding="utf-8")
    assert read_metrics(path) == whole
    truncate_metrics(path, 10)
    assert path.read_text(encoding="utf-8") == "".join(
        json.dumps(r, sort_keys=True) + "\n" for r in whole
    )


def test_a_sharded_checkpoint_is_hash_checked_and_resumes_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """training.parallel: fsdp writes torch.distributed.checkpoint files (here one process's)
    under kvd's manifest: a shard whose bytes changed makes its checkpoint invalid, the run
    resumes from the previous one, and the resumed steps equal the uninterrupted run's."""
    data = tiny_spec(tmp_path / "run")
    data["training"]["parallel"] = "fsdp"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main(["train", str(spec)]) == 0
    run = tmp_path / "run"
    straight = losses(run)
    last = run / "checkpoints" / "step-00000004"
    assert {".metadata", "__0_0.distcp"} <= {p.name for p in last.iterdir()}
    shard = last / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert verify(last) == "__0_0.distcp does not match its sha256"
    (run / "results.json").unlink()
    (run / "heads.safetensors").unlink()
    shutil.rmtree(run / "student")
    capsys.readouterr()
    assert main(["train", str(spec)]) == 0
    err = capsys.readouterr().err
    assert f"ignoring checkpoint {last}" in err and "from step 2" in err
    assert losses(run) == straight
