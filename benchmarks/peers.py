"""kvd's step beside a peer's, both against the same efficient bare: TRL's GKDTrainer (generalised
JSD between the student's and the teacher's full next-token distributions) on the same student,
teacher and batches.

    python -m benchmarks.peers [--smoke] [--repeats N]     # needs `pip install 'kvd[peers]'`

One teacher that shares the student's vocabulary (GKD needs that): the real SmolLM2-135M into the
quickstart's student (under --smoke a tiny random teacher with SmolLM2's tokenizer). Sides, each
from the same initial student, stepping in turn on the same batch sequence (a step of every side
per batch; the first `WARMUP` batches uncounted):

- efficient bare: the teacher's plain forward + kvd's CE-only student step (benchmarks/harness.py);
- kvd, logit KD: CE + logit KD, the same information GKD uses;
- kvd, logit KD + KV: CE + logit KD + KV MSE (kvd's recipe);
- TRL GKD: `GKDTrainer.training_step` (student and teacher forwards, JSD over the vocabulary,
  backward; lmbda 0: off-policy, no generation; beta 0.5) then the same clipping and AdamW.

Ratios are of median step times against the efficient bare.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import (
    Bare,
    BareBatch,
    arguments,
    build_trainer,
    ce_only,
    kvd_step,
    table,
    timed,
    with_kvd_allocator,
    write_section,
)
from benchmarks.setups import SMOLLM2, smollm2_gemma3, teacher

WARMUP = 2


def setups(smoke: bool) -> dict[str, dict[str, Any]]:
    """The kvd specs of the two kvd sides (CE + logit KD, and with KV MSE), one teacher."""
    if smoke:
        base = smollm2_gemma3()
        base["teachers"] = [teacher(1, scale=0.25)]  # qwen2 with SmolLM2's tokenizer
        base["student"]["config"] |= {"hidden_size": 64, "intermediate_size": 192}
        base["data"]["seq_len"], base["training"]["batch_size"] = 32, 2
    else:
        base = smollm2_gemma3()
        base["teachers"] = [t for t in base["teachers"] if t["id"] == "smollm2"]
    tid = base["teachers"][0]["id"]
    base["student"]["tokenizer_from"] = SMOLLM2
    base["fusion"] = {"name": "mean"}
    kd = [{"name": "ce", "weight": 0.5}, {"name": "logit_kd", "weight": 0.5, "teachers": [tid]}]
    out = {"kvd, logit KD": copy.deepcopy(base), "kvd, logit KD + KV": copy.deepcopy(base)}
    out["kvd, logit KD"]["losses"] = kd
    out["kvd, logit KD + KV"]["losses"] = [*kd, {"name": "kv_mse", "weight": 0.1}]
    return out


class GKD:
    """TRL's GKDTrainer on a copy of the kvd trainer's initial student and its teacher."""

    def __init__(self, student: Any, teacher_model: Any, tokenizer: Any, spec: Any, tmp: Path):
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from datasets import Dataset
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        tr = spec.training
        args = GKDConfig(
            output_dir=str(tmp),
            lmbda=0.0,
            beta=0.5,
            temperature=1.0,
            max_length=spec.data.seq_len,
            per_device_train_batch_size=tr.batch_size,
            learning_rate=tr.lr,
            weight_decay=tr.weight_decay,
            max_grad_norm=tr.clip_grad_norm or 0.0,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            save_strategy="no",
        )
        unused = Dataset.from_dict({"messages": [[{"role": "user", "content": "unused"}]]})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.trainer = GKDTrainer(
                model=student,
                teacher_model=teacher_model,
                args=args,
                train_dataset=unused,
                processing_class=tokenizer,
            )
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop
        self.clip = tr.clip_grad_norm

    def step(self, batch: BareBatch) -> None:
        t = self.trainer
        ids = batch.student.input_ids.to(t.args.device)
        mask = batch.student.attention_mask.to(t.args.device)
        inputs = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
        }
        t.model.train()
        t.training_step(t.model, inputs)
        if self.clip:
            torch.nn.utils.clip_grad_norm_(t.model.parameters(), self.clip)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)


def main() -> None:
    with_kvd_allocator("benchmarks.peers")
    args = arguments(__doc__ or "", repeats=8)
    specs = setups(args.smoke)
    kvd = {name: build_trainer(data, args.device) for name, data in specs.items()}
    first = next(iter(kvd.values()))
    ce = build_trainer(ce_only(next(iter(specs.values()))), args.device)
    bare = Bare(first, ce)
    teacher_model = first.teacher_side.teachers[0].loaded.model
    with tempfile.TemporaryDirectory(prefix="kvd-bench-peers-") as tmp:
        gkd = GKD(
            copy.deepcopy(ce.student.model),
            teacher_model,
            first.student.tokenizer,
            first.spec,
            Path(tmp),
        )
        seconds: dict[str, list[float]] = {"efficient bare": [], "TRL GKD": []} | {
            n: [] for n in kvd
        }
        for i in range(WARMUP + args.repeats):
            batches = bare.next_batches()
            assert len(batches) == 1, "grad_accum 1: one batch a step on every side"
            times = {
                "efficient bare": bare.step(batches)["step_s"],
                "TRL GKD": timed(lambda b=batches[0]: gkd.step(b), bare.device),
            }
            for name, trainer in kvd.items():
                times[name] = timed(lambda t=trainer: kvd_step(t), bare.device)
            if i >= WARMUP:
                for name, s in times.items():
                    seconds[name].append(s)
    base = statistics.median(seconds["efficient bare"])
    rows = []
    for name, values in seconds.items():
        median = statistics.median(values)
        rows.append(
            [name, f"{median:.3f}", f"{statistics.fmean(values):.3f}", f"{median / base:.3f}"]
        )
    setup = "smoke" if args.smoke else "SmolLM2-135M -> quickstart student"
    print("; ".join(f"{r[0]} {r[3]}x" for r in rows))
    tokens = int(batches[0].student.attention_mask.sum())
    body = (
        f"Setup: {setup}, {tokens} student tokens a step, {args.repeats} steps per side after "
        f"{WARMUP} warm-up ones, every side stepping in turn on the same batches "
        "(benchmarks/peers.py). Ratio: median step time / the efficient bare's. TRL's GKD: "
        "`GKDTrainer.training_step` (lmbda 0, beta 0.5: off-policy generalised JSD over the full "
        "vocabulary, no generation) plus the same clipping and AdamW step.\n\n"
        + table(["side", "median step s", "mean step s", "vs efficient bare"], rows)
    )
    write_section(args.results, "peers", "Peers: TRL's GKDTrainer beside kvd", body)


if __name__ == "__main__":
    main()
