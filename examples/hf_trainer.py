"""kvd's distillation driven by transformers.Trainer (kvd.integrations.hf).

    pip install 'kvd[hf]'
    python examples/hf_trainer.py configs/quickstart.yaml --out runs/hf-quickstart

Trains the spec's student with its teachers, projectors, fusion and losses through Trainer's
loop (its optimizer, schedule, logging and checkpoints under OUT), then writes the student to
OUT/student as a plain HF model dir. Any TrainingArguments option can be added below.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import TrainingArguments

from kvd.integrations.hf import KVDistillTrainer
from kvd.spec import load_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="a kvd run spec (YAML)")
    parser.add_argument("--out", type=Path, required=True, help="Trainer's output dir")
    parser.add_argument("--max-steps", type=int, help="default: the spec's training.max_steps")
    opts = parser.parse_args()
    spec = load_spec(opts.spec)
    tr = spec.training
    args = TrainingArguments(
        output_dir=str(opts.out),
        max_steps=opts.max_steps or tr.max_steps,
        per_device_train_batch_size=tr.batch_size,
        gradient_accumulation_steps=tr.grad_accum,
        learning_rate=tr.lr,
        weight_decay=tr.weight_decay,
        warmup_steps=tr.warmup_steps,
        lr_scheduler_type="cosine" if tr.schedule == "cosine" else "constant_with_warmup",
        max_grad_norm=tr.clip_grad_norm or 0.0,
        bf16=tr.precision == "bf16",
        seed=spec.seed,
        logging_steps=tr.log_every,
        save_strategy="no",
        report_to=[],
    )
    trainer = KVDistillTrainer(spec, args, base_dir=opts.spec.parent)
    trainer.train()
    trainer.save_student(opts.out / "student")
    print(f"student written to {opts.out / 'student'}")


if __name__ == "__main__":
    main()
