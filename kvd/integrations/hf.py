"""kvd's distillation inside `transformers.Trainer`: the same run spec, teachers, alignment,
projectors, fusion and losses, with Trainer's loop (and so accelerate, DeepSpeed, PEFT and
its callbacks and loggers) instead of `kvd train`'s.

    spec = load_spec("configs/quickstart.yaml")
    trainer = KVDistillTrainer(spec, TrainingArguments(output_dir="out", max_steps=200, ...))
    trainer.train()
    trainer.save_student("out/student")

What differs from `kvd train` (the loss and gradients of a batch are the same, tested):
Trainer's sampler orders the data (args.seed), its optimizer and schedule take args' learning
rate for the student and the projectors alike, its `save_model` saves the whole DistillModel
(student and projectors, so Trainer's resume works), and teachers always run live (no
training.teacher_cache). Needs `pip install 'kvd[hf]'` (accelerate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from kvd.core.runtime import Runtime
from kvd.core.types import TokenBatch
from kvd.data.packing import TextWindow
from kvd.data.tokenize import tokenize
from kvd.run.assemble import assemble
from kvd.run.export import write_student
from kvd.spec.runspec import RunSpec
from kvd.step.distill import DistillModel, StepOutput, build_distill_model, read_numbers


class WindowDataset(Dataset[TextWindow]):
    """The run's training windows (kvd.data's split, cut in student tokens)."""

    def __init__(self, windows: Sequence[TextWindow]) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> TextWindow:
        return self.windows[index]


class StudentCollator:
    """Windows -> what `KVDistillTrainer.compute_loss` reads: the student's tokens (input_ids,
    attention_mask [B, T], tokenised as `kvd train` does) and the texts and tasks the teachers
    and the router need."""

    def __init__(
        self, tokenizer: Any, *, seq_len: int, add_bos: bool, append_eos: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.add_bos = add_bos
        self.append_eos = append_eos

    def __call__(self, windows: list[TextWindow]) -> dict[str, Any]:
        texts = [w.text for w in windows]
        ends = [w.ends_document for w in windows] if self.append_eos else []
        batch = tokenize(
            self.tokenizer, texts, max_length=self.seq_len, add_bos=self.add_bos, eos=ends
        )
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "student_batch": batch,
            "texts": texts,
            "tasks": [w.task for w in windows],
        }


class KVDistillTrainer(Trainer):
    """A `transformers.Trainer` whose model is kvd's DistillModel (student + projectors +
    fusion + losses, built from `spec` as `kvd train` builds it) and whose loss is kvd's.

    The train dataset and collator come from the spec's data unless given. `base_dir`: where
    the spec's relative paths start (the spec file's folder). Per-part losses (`loss/kv_mse`,
    ...) join Trainer's logs, averaged over the steps since the last log, on each rank.
    """

    def __init__(
        self,
        spec: RunSpec,
        args: TrainingArguments,
        *,
        base_dir: Path = Path("."),
        **kwargs: Any,
    ) -> None:
        runtime = Runtime(args.device, args.process_index, args.world_size)
        parts = assemble(spec, runtime, base_dir, use_cache=False)
        self.spec = spec
        self.student_parts = parts.student
        self.data = parts.data
        self.teacher_side = parts.teachers
        self.curriculum = parts.curriculum
        model = build_distill_model(
            parts.student,
            parts.teachers.teachers,
            parts.teachers.shapes,
            parts.curriculum,
            spec.projector,
            parts.teachers.rope,
        )
        if len(parts.curriculum.stages) > 1 and args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = True  # a stage leaves other stages' parts idle
        kwargs.setdefault("train_dataset", WindowDataset(parts.data.train))
        kwargs.setdefault(
            "data_collator",
            StudentCollator(
                parts.student.tokenizer,
                seq_len=spec.data.seq_len,
                add_bos=parts.student.geometry.adds_bos,
                append_eos=spec.data.append_eos,
            ),
        )
        self._parts_sum: dict[str, torch.Tensor] = {}
        self._parts_count = 0
        self._tokens = 0  # this rank's real student tokens, for the model card
        super().__init__(model=model, args=args, **kwargs)

    def distill_step(self, model: torch.nn.Module, inputs: dict[str, Any]) -> StepOutput:
        """kvd's forward on one batch: the curriculum's stage at Trainer's step, the active
        teachers' aligned targets, then the student with projectors, fusion and losses."""
        step = self.state.global_step
        self.curriculum.set_step(step)
        student_batch: TokenBatch = inputs["student_batch"]
        targets = self.teacher_side.targets(
            self.curriculum.stage, inputs["texts"], student_batch, step=step
        )
        task = self.data.tasks.ids(inputs["tasks"]).to(self.args.device)
        out: StepOutput = model(inputs["input_ids"], inputs["attention_mask"], targets, task)
        return out

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, StepOutput]:
        """The weighted total of the spec's losses (a batch mean, as in `kvd train`)."""
        out = self.distill_step(model, inputs)
        for key, value in out.parts.items():  # summed on the device, read when logged
            self._parts_sum[key] = self._parts_sum[key] + value if key in self._parts_sum else value
        self._parts_count += 1
        self._tokens += int(inputs["student_batch"].attention_mask.sum())  # a host tensor
        return (out.total, out) if return_outputs else out.total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._parts_count:
            n = self._parts_count
            parts = read_numbers(self._parts_sum)
            logs = {**logs, **{k: v / n for k, v in parts.items() if k != "loss/total"}}
            self._parts_sum, self._parts_count = {}, 0
        super().log(logs, start_time)

    def save_student(self, path: str | Path) -> None:
        """The student alone as `kvd train` exports it (kvd.run.export.write_student): a plain HF
        model dir with its tokenizer and model card, no projectors; written on the main rank."""
        if not self.args.should_save:
            return
        distill: DistillModel = self.accelerator.unwrap_model(self.model)
        student = replace(self.student_parts, model=distill.student)
        results = {"step": self.state.global_step, "tokens": self._tokens}
        resolved = self.spec.model_dump(mode="json")
        write_student(Path(path), student, self.spec, resolved, results)
