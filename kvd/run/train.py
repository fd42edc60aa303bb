"""The training loop of `kvd train`: build the run from a spec, then distil step by step.

Reads top to bottom like a recipe: the run's parts (kvd.run.assemble: student, data, teacher side,
curriculum, batches) -> learned parts (kvd.step.distill) -> optimizer -> checkpoints
(kvd.run.run_state) -> loop (teacher targets, student step, update, log, validate, checkpoint)
-> outputs.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_file

from kvd.core.errors import KvdError
from kvd.core.files import atomic_path, json_text, write_atomic
from kvd.core.memory import read_peak_mb
from kvd.core.phases import phase
from kvd.core.progress import Progress
from kvd.core.runtime import Preempted, PreemptionFlag, Runtime, oom_guard, setup_runtime
from kvd.data import write_manifest
from kvd.run.assemble import assemble
from kvd.run.checkpoint import written_by
from kvd.run.evaluate import LMMetrics, evaluate_lm
from kvd.run.export import write_student
from kvd.run.parallel import distribute, full_model_state, is_sharded, local, whole
from kvd.run.resume import check_same_run, resume_point
from kvd.run.run_state import CheckpointManager, RunState
from kvd.run.rundir import (
    MetricsLog,
    RunLock,
    check_new_run_dir,
    create_run_dir,
    holds_run,
    truncate_metrics,
    write_environment,
    write_spec,
)
from kvd.run.schedule import lr_factor
from kvd.run.trackers import check_trackers, open_trackers
from kvd.spec.runspec import RunSpec
from kvd.step.distill import build_distill_model, read_numbers


@dataclass
class StepLog:
    """One step's record: `fixed`, the numbers the host knows, and `pending`, 0-dim tensors
    on the device (loss parts, grad norm, routing) that `read()` fetches in one transfer."""

    fixed: dict[str, Any]
    pending: dict[str, torch.Tensor]

    def read(self) -> dict[str, Any]:
        with phase("step/log"):
            return {**self.fixed, **read_numbers(self.pending)}


@dataclass
class TrainResult:
    """What a finished run reports: final validation metrics and where the run lives."""

    run_dir: Path
    steps: int
    validation: LMMetrics
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Everything a run needs, built once from the spec; `run()` trains to max_steps."""

    def __init__(
        self,
        spec: RunSpec,
        run_dir: Path,
        runtime: Runtime,
        base_dir: Path,
        *,
        use_cache: bool = True,
    ) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.rt = runtime
        # 1. what is not learned: student, data, teachers (or their cache), curriculum, batches
        parts = assemble(spec, runtime, base_dir, use_cache=use_cache)
        self.student = parts.student
        self.data = parts.data
        self.teacher_side = parts.teachers
        self.curriculum = parts.curriculum
        self.batches = parts.batches
        # 2. learned parts: projectors per (teacher, layer), fusion, losses; DDP over all of them
        self.model = build_distill_model(
            self.student,
            self.teacher_side.teachers,
            self.teacher_side.shapes,
            self.curriculum,
            spec.projector,
            self.teacher_side.rope,
        ).to(runtime.device)
        self.wrapped = distribute(
            self.model, runtime, spec.training, multi_stage=len(self.curriculum.stages) > 1
        )
        # 3. optimizer: separate learning rates for the student and the heads
        tr = spec.training
        heads = self.model.heads_parameters()
        head_ids = {id(p) for p in heads}
        student_params = [p for p in self.model.student.parameters() if id(p) not in head_ids]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": student_params, "lr": tr.lr},
                {"params": heads, "lr": tr.projector_lr or tr.lr},
            ],
            weight_decay=tr.weight_decay,
        )
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        # 4. what a checkpoint saves and restores
        self.state = RunState(self.batches, self.curriculum)
        self.checkpoints = CheckpointManager(
            run_dir,
            runtime,
            model=self.model,
            optimizer=self.optimizer,
            state=self.state,
            keep=tr.keep_checkpoints,
            sharded=tr.parallel == "fsdp",
        )

    # -- one optimizer step ------------------------------------------------------------------

    def train_step(self) -> StepLog:
        """Gradient accumulation over micro-batches, NaN guard, clipping, update. The loss
        parts, grad norm and routing stay on the device (StepLog.read() fetches them); the
        step waits for the device only for the NaN guard and the weight check."""
        tr = self.spec.training
        state = self.state
        factor = lr_factor(
            state.step, warmup=tr.warmup_steps, total=tr.max_steps, schedule=tr.schedule
        )
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        started = time.perf_counter()
        parts: dict[str, torch.Tensor] = {}
        routing: dict[int, torch.Tensor] = {}
        tokens = 0
        for micro in range(tr.grad_accum):
            with phase("step/batch"):
                texts, tasks, s_batch = self.batches.next()
            stage = self.curriculum.stage
            with phase("step/teachers"):
                if self.teacher_side.cache is not None:
                    targets = self.teacher_side.cached_targets(stage, state.step, micro)
                else:
                    targets = self.teacher_side.step_targets(stage, texts, s_batch, step=state.step)
            task = self.data.tasks.ids(tasks).to(self.rt.device)
            with (
                oom_guard("the student step", s_batch, self.rt.device, state.step),
                torch.autocast(
                    self.rt.device.type, dtype=torch.bfloat16, enabled=tr.precision == "bf16"
                ),
            ):
                with phase("step/student"):
                    # the real tokens' rows from the host's mask: nonzero() on a GPU waits for it
                    real_rows = s_batch.attention_mask.flatten().nonzero().squeeze(1)
                    out = self.wrapped(
                        s_batch.input_ids.to(self.rt.device),
                        s_batch.attention_mask.to(self.rt.device),
                        targets,
                        task,
                        real_rows.to(self.rt.device),
                    )
                # backward needs no teacher tensor the graph does not hold itself (the logit
                # losses formed their gradients in forward): free aligned logits first
                del targets
                with phase("step/backward"):
                    (out.total / tr.grad_accum).backward()
            tokens += int(s_batch.attention_mask.sum())  # a host tensor: no device sync
            for key, value in out.parts.items():
                share = value / tr.grad_accum
                parts[key] = parts[key] + share if key in parts else share
            routing = out.routing
        with phase("step/clip"):
            grad_norm = self._clip()
        ok = torch.isfinite(parts["loss/total"]) & torch.isfinite(grad_norm)
        with phase("step/guard"):  # all ranks agree: the mean loss, finite everywhere
            if self.rt.world > 1:  # the mean over ranks, all ranks' tokens, finite on every rank
                names = sorted(parts)
                summed = torch.stack([*(parts[n] for n in names), torch.tensor(float(tokens))])
                summed = summed.to(self.rt.device)
                dist.all_reduce(summed)
                parts = {n: m / self.rt.world for n, m in zip(names, summed[:-1], strict=True)}
                ok = ok.float()
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
                finite, total = torch.stack([ok, summed[-1]]).tolist()  # one device sync
                finite, tokens = bool(finite), int(total)
            else:
                finite = bool(ok)  # the step's one device sync before the update
        with phase("step/optimizer"):
            if finite:
                self.optimizer.step()
                self._check_weights()
                state.nonfinite = 0
            else:
                state.nonfinite += 1
            self.optimizer.zero_grad(set_to_none=True)
        state.tokens += tokens
        elapsed = time.perf_counter() - started
        fixed: dict[str, Any] = {
            "step": state.step + 1,
            "tokens": state.tokens,
            "lr": self.optimizer.param_groups[0]["lr"],
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "step_s": elapsed,
            "skipped": not finite,
        }
        peak = "peak_mem_mb" if self.rt.device.type == "cuda" else "peak_rss_mb"
        fixed[peak] = read_peak_mb(self.rt.device)
        pending = {"grad_norm": grad_norm, **parts, **self._routing_record(routing, tasks)}
        return StepLog(fixed, pending)

    def _check_weights(self) -> None:
        """A finite loss and gradient can still give an update that overflows a weight (an
        absurd learning rate, a plugin's optimizer hook): stop before anything saves it, with
        the previous checkpoints intact. One pass over the parameters, one host sync."""
        params = [local(p.detach()) for p in self.model.parameters()]
        norms = torch._foreach_norm(params)
        finite = bool(torch.stack(norms).isfinite().all())
        if is_sharded(self.model):  # each rank sees its own shards
            finite = not self._any_rank(not finite)
        if finite:
            return
        bad = next(
            n
            for (n, _), norm in zip(self.model.named_parameters(), norms, strict=True)
            if not bool(norm.isfinite())
        )
        raise KvdError(
            f"training stopped at step {self.state.step + 1}: the update made the weights of "
            f"{bad} non-finite although the loss and gradients were finite; nothing of this "
            "step was saved and the last good checkpoint is intact",
            hint="lower training.lr (or training.projector_lr), then resume with the same command",
        )

    def _clip(self) -> torch.Tensor:
        """The gradients' global norm (before clipping), a 0-dim tensor on the device."""
        clip = self.spec.training.clip_grad_norm
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.rt.device)
        return whole(torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf")))

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` holds on any of them."""
        if self.rt.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _routing_record(
        self, routing: dict[int, torch.Tensor], tasks: list[str]
    ) -> dict[str, torch.Tensor]:
        """Mean routing weight per layer and teacher, and per task and teacher (0-dim tensors)."""
        out: dict[str, torch.Tensor] = {}
        ids = [t.id for t in self.spec.teachers]
        per_task: dict[str, list[torch.Tensor]] = {}
        for layer, w in routing.items():  # w: [B, T, N]
            valid = w.sum(-1) > 0  # [B, T]
            mean = (w * valid[..., None]).sum((0, 1)) / valid.sum().clamp_min(1)
            for n, tid in enumerate(ids):
                out[f"route/L{layer}/{tid}"] = mean[n]
            for b, task in enumerate(tasks):
                row = (w[b] * valid[b, :, None]).sum(0) / valid[b].sum().clamp_min(1)
                per_task.setdefault(task, []).append(row)
        for task, rows in per_task.items():
            mean = torch.stack(rows).mean(0)
            for n, tid in enumerate(ids):
                out[f"route/task/{task}/{tid}"] = mean[n]
        return out

    # -- validation, checkpoints, outputs ------------------------------------------------------

    def validate(self) -> LMMetrics:
        ev = self.spec.evaluation
        windows = self.data.validation[: ev.batches * self.spec.training.batch_size]
        return evaluate_lm(
            self.student.model,
            self.student.tokenizer,
            [w.text for w in windows],
            batch_size=self.spec.training.batch_size,
            max_length=self.spec.data.seq_len,
            add_bos=self.student.geometry.adds_bos,
            device=self.rt.device,
        )

    def save_outputs(self, metrics: LMMetrics) -> None:
        """The student in HF format with its tokenizer, the heads, and the final metrics
        (results.json, last: it marks the run finished). Each is written whole or not at all;
        a failed write (a full disk) is a KvdError and the checkpoints stay as they were."""
        if not (self.rt.main or is_sharded(self.model)):
            return
        weights = full_model_state(self.model)  # a sharded model's: every rank gathers
        if not self.rt.main:
            return
        try:
            self._save_outputs(metrics, weights)
        except OSError as exc:
            raise KvdError(
                f"could not write the run's outputs in {self.run_dir}: {exc.strerror or exc}; "
                "the checkpoints are intact",
                hint="free disk space, then run the same command again to finish the run",
            ) from None

    def _save_outputs(self, metrics: LMMetrics, weights: dict[str, Any]) -> None:
        state = self.state
        results = {"step": state.step, "tokens": state.tokens, "validation": metrics.as_dict()}
        resolved = yaml.safe_load((self.run_dir / "spec.resolved.yaml").read_text())
        student = replace(self.student, model=self.model.student)
        own = None  # save_pretrained cannot gather shards: a sharded student's whole tensors
        if is_sharded(self.model):
            own = {k[len("student.") :]: v for k, v in weights.items() if k.startswith("student.")}
        write_student(self.run_dir / "student", student, self.spec, resolved, results, weights=own)
        heads = {
            k: v.detach().cpu().clone() for k, v in weights.items() if not k.startswith("student.")
        }
        if heads:
            with atomic_path(self.run_dir / "heads.safetensors", directory=False) as path:
                save_file(heads, path)
        write_atomic(self.run_dir / "results.json", json_text(results))

    def run(self, log: MetricsLog | None, progress: Progress) -> TrainResult:
        """Train to max_steps (or max_tokens); SIGTERM / SIGUSR1 save and stop at a step end."""
        max_steps = self.spec.training.max_steps
        progress.start(max_steps, self.state.step)
        with PreemptionFlag() as preempt:
            self._loop(log, progress, preempt)
        progress.stop()
        # the loop validates at max_steps; a run stopped early (max_tokens) has not yet
        state = self.state
        final = state.validated[1] if state.validated and state.validated[0] == state.step else None
        final = final or self.validate()
        self.save_outputs(final)
        return TrainResult(self.run_dir, state.step, final)

    def _loop(self, log: MetricsLog | None, progress: Progress, preempt: PreemptionFlag) -> None:
        tr = self.spec.training
        ev = self.spec.evaluation
        state = self.state
        max_steps = tr.max_steps
        while state.step < max_steps:
            if tr.max_tokens is not None and state.tokens >= tr.max_tokens:
                break
            if self.curriculum.set_step(state.step) and log:
                log.write({"step": state.step, "event": "stage", "stage": self.curriculum.index})
            step_log = self.train_step()
            state.step += 1
            val = None
            evaluate = state.step % ev.every == 0 or state.step == max_steps
            logging = log is not None and (state.step % tr.log_every == 0 or evaluate)
            # the losses leave the device only when they are logged or shown
            record = step_log.read() if logging or progress.shows(state.step) else step_log.fixed
            if evaluate:
                metrics = self.validate()
                state.validated = (state.step, metrics)
                val = metrics.bits_per_byte
                record.update(
                    {
                        "val/bits_per_byte": metrics.bits_per_byte,
                        "val/perplexity": metrics.perplexity,
                        "val/accuracy": metrics.accuracy,
                    }
                )
            if log and logging:
                log.write(record)
            progress.update(state.step, record)
            if state.nonfinite >= tr.max_nonfinite:
                progress.stop()
                raise KvdError(
                    f"training stopped: {state.nonfinite} non-finite losses or gradients in a "
                    f"row (step {state.step}); the last good checkpoint is intact",
                    hint="lower training.lr or check the data",
                )
            stop = self._any_rank(preempt.signal is not None)
            if state.step % tr.checkpoint_every == 0 or state.step == max_steps or stop:
                self.checkpoints.save(val)
            if stop:
                progress.stop()
                raise Preempted(
                    f"stopped by {preempt.signal or 'a signal on another rank'} after step "
                    f"{state.step}; checkpoint saved in {self.run_dir / 'checkpoints'}",
                    hint="run the same command again to resume",
                )


def train(
    spec: RunSpec,
    spec_data: dict[str, Any],
    *,
    base_dir: Path,
    resume: bool | Path = False,
    progress: Progress | None = None,
) -> TrainResult:
    """Run (or resume) the distillation described by `spec` in its output dir."""
    runtime = setup_runtime(spec.training.device)
    run_dir = spec.output_dir()
    lock = RunLock.acquire(run_dir) if runtime.main else None
    try:
        return _train(spec, spec_data, run_dir, runtime, base_dir, resume, progress)
    finally:
        if lock is not None:
            lock.release(keep=holds_run(run_dir))


def _train(
    spec: RunSpec,
    spec_data: dict[str, Any],
    run_dir: Path,
    runtime: Runtime,
    base_dir: Path,
    resume: bool | Path,
    progress: Progress | None,
) -> TrainResult:
    checkpoint = None
    if holds_run(run_dir):
        if (run_dir / "results.json").exists():
            raise KvdError(
                f"output.dir {run_dir}: already holds a finished run",
                hint="pick another dir with --set output.dir=...",
            )
        resume = resume or True
        checkpoint = resume_point(run_dir, resume if isinstance(resume, Path) else None)
        # the same command again continues an unfinished run
        written = written_by(checkpoint) if checkpoint else None
        check_same_run(run_dir, spec, runtime.world, written)
        if runtime.main:
            step = int(checkpoint.name.removeprefix("step-")) if checkpoint else 0
            print(f"kvd: resuming the run in {run_dir} from step {step}", file=sys.stderr)
    elif resume:
        raise KvdError(f"output.dir {run_dir}: holds no run to resume")
    elif runtime.main:
        check_new_run_dir(run_dir)
    # models and data are checked before anything is written: bad input leaves no run dir
    check_trackers(spec.output.trackers)
    trainer = Trainer(spec, run_dir, runtime, base_dir)
    if resume:
        if checkpoint is not None:
            trainer.checkpoints.restore(checkpoint)
        if runtime.main:  # steps after the checkpoint are done again: drop their records
            truncate_metrics(run_dir / "metrics.jsonl", trainer.state.step)
    elif runtime.main:
        create_run_dir(run_dir)
        write_spec(run_dir, spec_data, spec.model_dump(mode="json"))
        write_environment(run_dir)
        write_manifest(trainer.data.manifest, run_dir / "split.json")
    log = None
    if runtime.main:
        trackers = open_trackers(
            spec.output.trackers, run_dir, spec.name, spec.model_dump(mode="json")
        )
        log = MetricsLog(run_dir / "metrics.jsonl", trackers)
    try:
        return trainer.run(log, progress or Progress(enabled=runtime.main))
    finally:
        if log:
            log.close()
