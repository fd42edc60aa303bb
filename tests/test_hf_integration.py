"""kvd's loss inside transformers.Trainer (kvd.integrations.hf): a step through Trainer gives
the loss and gradients of kvd's own step on the same batch, and Trainer's loop trains, logs
kvd's per-part losses and saves a student that loads as a plain HF model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from kvd.core.runtime import Runtime
from kvd.data.tokenize import tokenize
from kvd.integrations.hf import KVDistillTrainer
from kvd.run.train import Trainer as KvdTrainer
from kvd.spec.runspec import parse_spec
from tests.specs import tiny_spec


def hf_args(out: Path, **kw: Any) -> TrainingArguments:
    base: dict[str, Any] = {
        "output_dir": str(out),
        "per_device_train_batch_size": 2,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
    }
    return TrainingArguments(**(base | kw))


class Grads(TrainerCallback):
    """Every parameter's gradient just before Trainer's first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self.grads:
            named = kw["model"].named_parameters()
            self.grads = {n: p.grad.clone() for n, p in named if p.grad is not None}


def test_a_trainer_step_gives_kvds_loss_and_gradients_on_the_same_batch(tmp_path: Path) -> None:
    spec = parse_spec(tiny_spec(tmp_path / "run", fusion={"name": "learnable"}))
    seen: list[tuple[dict[str, Any], float]] = []

    class Recording(KVDistillTrainer):
        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kw: Any) -> Any:
            loss = super().compute_loss(model, inputs, *args, **kw)
            seen.append((inputs, float(loss.detach())))
            return loss

    grads = Grads()
    args = hf_args(tmp_path / "hf", max_steps=1, max_grad_norm=0.0)
    hf = Recording(spec, args, callbacks=[grads])
    initial = {k: v.clone() for k, v in hf.model.state_dict().items()}
    hf.train()
    ((inputs, hf_loss),) = seen

    # kvd's own model, built from the same spec, on the batch Trainer drew
    kvd = KvdTrainer(spec, tmp_path / "run", Runtime(torch.device("cpu")), Path("."))
    assert initial.keys() == kvd.model.state_dict().keys()
    for key, value in kvd.model.state_dict().items():
        assert torch.equal(initial[key], value), key
    batch = tokenize(
        kvd.student.tokenizer,
        inputs["texts"],
        max_length=spec.data.seq_len,
        add_bos=kvd.student.geometry.adds_bos,
    )
    assert torch.equal(batch.input_ids, inputs["input_ids"])
    assert inputs["attention_mask"].sum() > 0
    kvd.curriculum.set_step(0)
    targets = kvd.teacher_side.targets(kvd.curriculum.stage, inputs["texts"], batch, step=0)
    task = kvd.data.tasks.ids(inputs["tasks"])
    out = kvd.model(batch.input_ids, batch.attention_mask, targets, task)
    out.total.backward()
    assert hf_loss == pytest.approx(float(out.total.detach()), rel=1e-6)
    kvd_grads = {n: p.grad for n, p in kvd.model.named_parameters() if p.grad is not None}
    assert set(grads.grads) == set(kvd_grads)
    learned = {name.split(".")[0] for name in kvd_grads}
    assert learned == {"student", "projectors", "stage_fusions"}  # router and projectors too
    for name, grad in kvd_grads.items():
        torch.testing.assert_close(grads.grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_trainer_trains_logs_kvd_parts_and_saves_a_loadable_student(tmp_path: Path) -> None:
    spec = parse_spec(tiny_spec(tmp_path / "run"))
    hf = KVDistillTrainer(spec, hf_args(tmp_path / "hf", max_steps=3, learning_rate=3e-3))
    before = {k: v.clone() for k, v in hf.model.student.state_dict().items()}
    hf.train()
    logged = [r for r in hf.state.log_history if "loss" in r]
    assert len(logged) == 3
    assert all("loss/kv_mse" in r and "loss/ce" in r for r in logged)
    after = hf.model.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained

    hf.save_student(tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    hf.model.student.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, hf.model.student(ids).logits)
    assert "3 steps" in (tmp_path / "student" / "README.md").read_text()


def test_the_documented_example_trains_a_spec_and_writes_its_student(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tmp_path / "run")))
    example = Path(__file__).parents[1] / "examples" / "hf_trainer.py"
    cmd = [sys.executable, str(example), str(spec), "--out", str(tmp_path / "hf")]
    done = subprocess.run([*cmd, "--max-steps", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "student")
    assert loaded.config.num_hidden_layers == 2
    assert not (tmp_path / "run").exists()  # Trainer's output dir only, not kvd's run dir


def test_trainers_checkpoints_resume_to_the_same_losses(tmp_path: Path) -> None:
    """Trainer's checkpoints hold the whole DistillModel (student, projectors, fusion), so a
    run resumed from step 2 logs the straight run's losses at steps 3 and 4."""
    spec = parse_spec(tiny_spec(tmp_path / "run"))
    saving = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    straight = KVDistillTrainer(spec, hf_args(tmp_path / "hf", **saving))
    straight.train()
    resumed = KVDistillTrainer(spec, hf_args(tmp_path / "hf", **saving))
    resumed.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-2"))

    def losses(t: KVDistillTrainer) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in t.state.log_history if "loss" in r}

    assert set(losses(resumed)) == {1, 2, 3, 4}  # steps 1-2 come from the checkpoint's state
    for step in (3, 4):
        assert losses(resumed)[step] == pytest.approx(losses(straight)[step], rel=1e-6)
