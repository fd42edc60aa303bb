"""The training loop of `kvd train`: build the run from a spec, then distil step by step.

Reads top to bottom like a recipe: models -> alignment plans -> data -> learned parts ->
optimizer -> loop (teacher targets, student step, update, log, validate, checkpoint) -> outputs.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from kvd.align.base import LayerAligner, LayerPlan, TokenAligner
from kvd.align.rope import RopeAligner
from kvd.build import (
    build_stages,
    check_lengths,
    kv_shape,
    layer_plans,
    load_model,
    uses_teachers,
)
from kvd.checkpoint import (
    load_checkpoint,
    prune,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from kvd.data import Data, build_data, write_manifest
from kvd.data.packing import BatchStream, DataState
from kvd.distill import DistillModel
from kvd.errors import KvdError
from kvd.evaluate import LMMetrics, evaluate_lm
from kvd.files import atomic_path, json_text, write_atomic
from kvd.head import OutputHead
from kvd.progress import Progress
from kvd.resume import check_same_run, resume_point
from kvd.rundir import (
    MetricsLog,
    RunLock,
    check_new_run_dir,
    create_run_dir,
    holds_run,
    tensorboard_writer,
    truncate_metrics,
    write_environment,
    write_spec,
)
from kvd.runtime import Preempted, PreemptionFlag, Runtime, setup_runtime
from kvd.schedule import lr_factor
from kvd.spec import RunSpec
from kvd.targets import TeacherRuntime, TeacherTargets, teacher_targets
from kvd.teacher_cache import FORMAT, CacheWriter, TeacherCache, pack
from kvd.tokenize import tokenize
from kvd.types import KVShape, TokenBatch


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
        torch.manual_seed(spec.seed)
        dev = runtime.device
        # 1. the student, and the teachers' geometry (weights are loaded in step 3 unless an
        #    offline teacher cache holds their work)
        self.student = load_model(spec.student, dev, "student", spec.seed)
        refs = list(spec.teachers) if uses_teachers(spec) else []
        geometries = {ref.id: ref.build().geometry() for ref in refs}
        check_lengths(spec, {"student": self.student.geometry} | geometries)
        self.student.model.train()
        if spec.training.activation_checkpointing:
            # non-reentrant: K/V captured in the first forward keep their graph (kvd.capture)
            self.student.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        # 2. data, split by content hash; windows cut in student tokens
        self.data: Data = build_data(
            spec.data,
            student_tokenizer=self.student.tokenizer,
            base_dir=base_dir,
            add_bos=self.student.geometry.adds_bos,
            min_tokens=spec.data.min_tokens,
        )
        # 3. teachers (or their cached work) and the parameter-free alignment
        self.token_aligner: TokenAligner = spec.alignment.tokens.component(
            spec.alignment.tokens.config
        )
        self.rope: RopeAligner = spec.alignment.rope.component(spec.alignment.rope.config)
        self.cache: TeacherCache | None = None
        if spec.training.teacher_cache and use_cache and refs:
            self.cache = TeacherCache.open(Path(spec.training.teacher_cache), self.fingerprint())
        loaded = (
            {}
            if self.cache
            else {
                ref.id: load_model(ref, dev, f"teachers.{i}", spec.seed)
                for i, ref in enumerate(refs)
            }
        )
        for model in loaded.values():
            # eval and no_grad (in teacher_targets) keep teachers frozen. Not requires_grad_(False):
            # on CPU it sends a bf16 tied LM head down a path that copies the whole weight per call
            # (Gemma-3: 0.4 s -> 4.7 s per forward, measured).
            model.model.eval()
        if self.cache is not None:
            plans = {
                tid: LayerPlan([tuple((int(t), w) for t, w in pairs) for pairs in sources])
                for tid, sources in self.cache.plans.items()
            }
        else:
            layer_aligner: LayerAligner = spec.alignment.layers.component(
                spec.alignment.layers.config
            )
            calibration = [w.text for w in self.data.validation[: spec.training.batch_size]]
            plans = layer_plans(
                layer_aligner,
                [(ref, loaded[ref.id]) for ref in refs],
                self.student,
                calibration,
                self.token_aligner,
                self.rope,
                dev,
            )
        self.teachers = [
            TeacherRuntime(
                ref.id, ref.weight, loaded.get(ref.id), plans[ref.id], geometries[ref.id].adds_bos
            )
            for ref in refs
        ]
        teacher_shapes = {
            ref.id: KVShape(geometries[ref.id].num_kv_heads, geometries[ref.id].head_dim)
            for ref in refs
        }
        # 4. learned parts: projectors per (teacher, layer), fusion, losses
        ids = [t.id for t in spec.teachers]  # loaded or not (a CE-only run loads none)
        n_layers = len({j for p in plans.values() for j in p.student_layers})
        s_shape = kv_shape(self.student.geometry)
        self.model = DistillModel(
            self.student.model,
            s_shape,
            teacher_shapes=teacher_shapes,
            teacher_layers={t.id: t.plan.student_layers for t in self.teachers},
            teacher_weights={t.id: t.weight for t in self.teachers},
            projector_cls=spec.projector.component,
            projector_config=spec.projector.config,
            direction=spec.projector.direction,
            stages=build_stages(spec, n_layers, s_shape.head_dim, len(self.data.tasks), ids),
            rope=self.rope,
        ).to(dev)
        self.wrapped: Any = self.model
        if runtime.world > 1:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[dev.index] if dev.type == "cuda" else None,
                find_unused_parameters=len(self.model.stages) > 1,
            )
        # 5. optimizer: separate learning rates for the student and the heads
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
        self.stream = BatchStream(self.data.train, tr.batch_size * runtime.world, seed=spec.seed)
        self.step = 0
        self.tokens = 0
        self.nonfinite = 0
        self.best: tuple[float, Path] | None = None
        self.validated: tuple[int, LMMetrics] | None = None  # the latest (step, metrics)

    # -- one optimizer step ------------------------------------------------------------------

    def micro_batch(self) -> tuple[list[str], list[str], TokenBatch]:
        """This rank's share of the next global batch: texts, task labels, student tokens."""
        batch = next(self.stream)
        texts = batch.texts[self.rt.rank :: self.rt.world]
        tasks = batch.tasks[self.rt.rank :: self.rt.world]
        s_batch = tokenize(
            self.student.tokenizer,
            texts,
            max_length=self.spec.data.seq_len,
            add_bos=self.student.geometry.adds_bos,
        )
        return texts, tasks, s_batch

    def cached_targets(self, micro: int) -> dict[str, TeacherTargets]:
        """This step's targets from the offline cache, for the teachers active now."""
        assert self.cache is not None
        cached = self.cache.get(self.step, micro, self.rt.device)
        active = self.model.stage.teachers
        missing = [
            tid for tid in active if tid in {t.id for t in self.teachers} and tid not in cached
        ]
        if missing:
            raise KvdError(
                f"training.teacher_cache {self.cache.root}: has no targets of {', '.join(missing)} "
                f"at step {self.step + 1} (the stages changed since it was built)",
                hint="rebuild it with `kvd cache-teachers SPEC`",
            )
        readers = self.logit_readers()
        reads_kv = self.reads_kv()
        for tid in active:
            t = cached.get(tid)
            lacks = None
            if t is not None and tid in readers and t.logits is None:
                lacks = "logits"
            elif t is not None and self.model.fusion.needs_teacher_ce and t.ce is None:
                lacks = "per-sequence CE"
            elif t is not None and reads_kv and self.model.teacher_layers[tid] and not t.keys:
                lacks = "K/V"
            if lacks:
                raise KvdError(
                    f"training.teacher_cache {self.cache.root}: has no {lacks} of teacher {tid!r} "
                    "(the losses or fusion changed since it was built)",
                    hint="rebuild it with `kvd cache-teachers SPEC`",
                )
        return {tid: t for tid, t in cached.items() if tid in active}

    def reads_kv(self) -> bool:
        """Whether a loss of the current stage reads the teachers' K/V."""
        return any(t.module.inputs in ("kv", "kv_raw") for t in self.model.loss_terms)

    def logit_readers(self) -> set[str]:
        """Teachers whose logits a loss of the current stage reads."""
        return {
            tid for t in self.model.loss_terms if t.module.inputs == "logits" for tid in t.teachers
        }

    def fingerprint(self) -> dict[str, Any]:
        """Everything the teachers' targets depend on; a cache must match it exactly."""
        s = self.spec
        g = self.student.geometry
        return {
            "format": FORMAT,
            "teachers": {t.id: t.model_dump(mode="json", exclude={"weight"}) for t in s.teachers},
            "student_tokenizer": {
                "family": g.tokenizer_family,
                "hash": g.tokenizer_hash,
                "adds_bos": g.adds_bos,
            },
            "data": s.data.model_dump(mode="json"),
            "split": self.data.manifest.digest,
            "alignment": s.alignment.model_dump(mode="json"),
            "seed": s.seed,
            "batch_size": s.training.batch_size,
            "grad_accum": s.training.grad_accum,
            "world": self.rt.world,
        }

    def build_cache(self, writer: CacheWriter, progress: Progress) -> TeacherCache:
        """Run the teachers over every batch of the run and store their targets; logits as
        hidden states for the teachers whose head reproduces them exactly (kvd.head), checked
        on the first batch against the teachers' own logits."""
        progress.start(self.spec.training.max_steps, 0)
        readers = self.logit_readers()
        heads: dict[str, OutputHead] = {}
        for t in self.teachers:
            head = OutputHead.of(t.loaded.model) if t.id in readers and t.loaded else None
            if head is not None:
                heads[t.id] = head
        for step in range(self.spec.training.max_steps):
            self.model.set_step(step)
            tensors: dict[str, torch.Tensor] = {}
            for micro in range(self.spec.training.grad_accum):
                texts, _, s_batch = self.micro_batch()
                targets = self.targets(texts, s_batch, hidden_logits=set(heads))
                if step == 0 and micro == 0:
                    targets = self._check_heads(heads, targets, texts, s_batch)
                tensors |= pack(targets, micro)
            writer.put(step, tensors)
            progress.update(step + 1, {"cache_mb": writer.bytes / 2**20})
        progress.stop()
        plans = {
            t.id: [[[j, w] for j, w in pairs] for pairs in t.plan.sources] for t in self.teachers
        }
        return writer.finish(self.spec.training.max_steps, plans, heads)

    def _check_heads(
        self,
        heads: dict[str, OutputHead],
        targets: dict[str, TeacherTargets],
        texts: list[str],
        student_batch: Any,
    ) -> dict[str, TeacherTargets]:
        """Keep in `heads` only the teachers whose stored hidden states give exactly their
        aligned logits on this batch; the others' targets get their logits instead."""
        plain = self.targets(texts, student_batch)
        for tid in list(heads):
            got, want = targets[tid], plain[tid].logits
            computed = got.with_logits(heads[tid]).logits if got.hidden is not None else None
            if computed is None or want is None or not torch.equal(computed, want):
                del heads[tid]
                targets[tid] = plain[tid]
        return targets

    def targets(
        self, texts: list[str], student_batch: Any, hidden_logits: Iterable[str] = ()
    ) -> dict[str, TeacherTargets]:
        """Targets of the teachers active in this stage; logits only for teachers a logit loss
        reads (the LM head of a 262k vocabulary costs more than the rest of a small model),
        as hidden states for the teachers in `hidden_logits` (the offline cache)."""
        active = set(self.model.stage.teachers)
        logit_readers = self.logit_readers()
        want_ce = self.model.fusion.needs_teacher_ce
        want_kv = self.reads_kv()
        out = {}
        for t in self.teachers:
            if t.id not in active:
                continue
            with self.oom_guard(f"teacher {t.id!r}", student_batch):
                out[t.id] = teacher_targets(
                    t,
                    texts,
                    student_batch,
                    token_aligner=self.token_aligner,
                    rope=self.rope,
                    want_logits=t.id in logit_readers,
                    want_ce=want_ce,
                    device=self.rt.device,
                    hidden_logits=t.id in hidden_logits,
                    want_kv=want_kv,
                )
        return out

    @contextmanager
    def oom_guard(self, what: str, batch: TokenBatch) -> Iterator[None]:
        """Out of memory becomes an error naming the model and the batch, not a traceback."""
        try:
            yield
        except torch.OutOfMemoryError:
            b, t = batch.input_ids.shape
            raise KvdError(
                f"out of memory in {what} on {self.rt.device} with a batch of {b} x {t} tokens "
                f"(step {self.step + 1})",
                hint="lower training.batch_size (raise grad_accum to keep the batch), "
                "data.seq_len, use dtype: bfloat16 for teachers, or activation_checkpointing",
            ) from None

    def train_step(self) -> dict[str, Any]:
        """Gradient accumulation over micro-batches, NaN guard, clipping, update."""
        tr = self.spec.training
        factor = lr_factor(
            self.step, warmup=tr.warmup_steps, total=tr.max_steps, schedule=tr.schedule
        )
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        started = time.perf_counter()
        parts: dict[str, float] = {}
        routing: dict[int, torch.Tensor] = {}
        tokens = 0
        for micro in range(tr.grad_accum):
            texts, tasks, s_batch = self.micro_batch()
            if self.cache is not None:
                targets = self.cached_targets(micro)
            else:
                targets = self.targets(texts, s_batch)
            task = self.data.tasks.ids(tasks).to(self.rt.device)
            with (
                self.oom_guard("the student step", s_batch),
                torch.autocast(
                    self.rt.device.type, dtype=torch.bfloat16, enabled=tr.precision == "bf16"
                ),
            ):
                out = self.wrapped(
                    s_batch.input_ids.to(self.rt.device),
                    s_batch.attention_mask.to(self.rt.device),
                    targets,
                    task,
                )
                # backward needs no teacher tensor the graph does not hold itself (the logit
                # losses formed their gradients in forward): free aligned logits first
                del targets
                (out.total / tr.grad_accum).backward()
            tokens += int(s_batch.attention_mask.sum())
            for key, value in out.parts.items():
                parts[key] = parts.get(key, 0.0) + value / tr.grad_accum
            routing = out.routing
        if self.rt.world > 1:  # log the mean over ranks and all ranks' tokens
            names = sorted(parts)
            summed = torch.tensor([*(parts[n] for n in names), tokens], device=self.rt.device)
            dist.all_reduce(summed)
            *means, total = summed.tolist()
            parts = {n: m / self.rt.world for n, m in zip(names, means, strict=True)}
            tokens = int(total)
        grad_norm = self._clip()
        finite = math.isfinite(parts["loss/total"]) and math.isfinite(grad_norm)
        finite = self._all_ranks(finite)
        if finite:
            self.optimizer.step()
            self.nonfinite = 0
        else:
            self.nonfinite += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens += tokens
        elapsed = time.perf_counter() - started
        record: dict[str, Any] = {
            "step": self.step + 1,
            "tokens": self.tokens,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "step_s": elapsed,
            "skipped": not finite,
            **parts,
        }
        record.update(self._routing_record(routing, tasks))
        if self.rt.device.type == "cuda":
            record["peak_mem_mb"] = torch.cuda.max_memory_allocated(self.rt.device) / 2**20
        else:
            import resource

            record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return record

    def _clip(self) -> float:
        clip = self.spec.training.clip_grad_norm
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
        return float(norm)

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` holds on any of them."""
        if self.rt.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _all_ranks(self, flag: bool) -> bool:
        """Every rank agrees: True only if `flag` holds on all of them."""
        if self.rt.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)

    def _routing_record(
        self, routing: dict[int, torch.Tensor], tasks: list[str]
    ) -> dict[str, float]:
        """Mean routing weight per layer and teacher, and per task and teacher."""
        out: dict[str, float] = {}
        ids = [t.id for t in self.spec.teachers]
        per_task: dict[str, list[torch.Tensor]] = {}
        for layer, w in routing.items():  # w: [B, T, N]
            valid = w.sum(-1) > 0  # [B, T]
            mean = (w * valid[..., None]).sum((0, 1)) / valid.sum().clamp_min(1)
            for n, tid in enumerate(ids):
                out[f"route/L{layer}/{tid}"] = float(mean[n])
            for b, task in enumerate(tasks):
                row = (w[b] * valid[b, :, None]).sum(0) / valid[b].sum().clamp_min(1)
                per_task.setdefault(task, []).append(row)
        for task, rows in per_task.items():
            mean = torch.stack(rows).mean(0)
            for n, tid in enumerate(ids):
                out[f"route/task/{task}/{tid}"] = float(mean[n])
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

    def checkpoint(self, val_bpb: float | None) -> None:
        """Save an atomic checkpoint (rank 0 writes; every rank's RNG states go in it)."""
        rngs: list[Any] = [rng_state()]
        if self.rt.world > 1:
            rngs = [None] * self.rt.world
            dist.all_gather_object(rngs, rng_state())
        if not self.rt.main:
            return
        root = self.run_dir / "checkpoints"
        state = {
            "tokens": self.tokens,
            "data": {"epoch": self.stream.state.epoch, "position": self.stream.state.position},
            "stage": self.model.stage_index,
            "val_bits_per_byte": val_bpb,
            "world": self.rt.world,
        }
        try:
            info = save_checkpoint(
                root,
                self.step,
                model=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(),
                state=state,
                rng=rngs,
            )
        except OSError as exc:
            raise KvdError(
                f"could not write the step-{self.step} checkpoint in {root}: {exc}; the previous "
                "checkpoints are intact",
                hint="free disk space, then run the same command again to resume",
            ) from None
        if val_bpb is not None and (self.best is None or val_bpb < self.best[0]):
            self.best = (val_bpb, info.path)
            write_atomic(
                self.run_dir / "best.json",
                json_text(
                    {"step": self.step, "val_bits_per_byte": val_bpb, "path": info.path.name}
                ),
            )
        prune(root, self.spec.training.keep_checkpoints, {self.best[1]} if self.best else set())

    def restore(self, path: Path) -> None:
        saved = load_checkpoint(path)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.stream = BatchStream(
            self.data.train,
            self.spec.training.batch_size * self.rt.world,
            seed=self.spec.seed,
            state=DataState(**state["data"]),
        )
        self.model.set_step(self.step)
        if len(saved["rng"]) != self.rt.world:
            raise KvdError(
                f"{path}: written by {len(saved['rng'])} process(es), resumed with {self.rt.world}",
                hint="resume with the same number of processes (torchrun --nproc_per_node)",
            )
        set_rng_state(saved["rng"][self.rt.rank])
        best = self.run_dir / "best.json"
        if best.exists():
            info = json.loads(best.read_text())
            self.best = (float(info["val_bits_per_byte"]), path.parent / info["path"])

    def save_outputs(self, metrics: LMMetrics) -> None:
        """The student in HF format with its tokenizer, the heads, and the final metrics
        (results.json, last: it marks the run finished). Each is written whole or not at all;
        a failed write (a full disk) is a KvdError and the checkpoints stay as they were."""
        if not self.rt.main:
            return
        try:
            self._save_outputs(metrics)
        except OSError as exc:
            raise KvdError(
                f"could not write the run's outputs in {self.run_dir}: {exc.strerror or exc}; "
                "the checkpoints are intact",
                hint="free disk space, then run the same command again to finish the run",
            ) from None

    def _save_outputs(self, metrics: LMMetrics) -> None:
        with atomic_path(self.run_dir / "student", directory=True) as out:
            self.model.student.save_pretrained(out)
            self.student.tokenizer.save_pretrained(out)
            # the BOS the student was trained with, which not every tokenizer class records
            config = out / "tokenizer_config.json"
            data = json.loads(config.read_text()) if config.exists() else {}
            data["add_bos_token"] = self.student.geometry.adds_bos
            config.write_text(json.dumps(data, indent=2))
        heads = {
            k: v.detach().cpu().clone()
            for k, v in self.model.state_dict().items()
            if not k.startswith("student.")
        }
        if heads:
            with atomic_path(self.run_dir / "heads.safetensors", directory=False) as path:
                save_file(heads, path)
        results = {"step": self.step, "tokens": self.tokens, "validation": metrics.as_dict()}
        write_atomic(self.run_dir / "results.json", json_text(results))

    def run(self, log: MetricsLog | None, progress: Progress) -> TrainResult:
        """Train to max_steps (or max_tokens); SIGTERM / SIGUSR1 save and stop at a step end."""
        max_steps = self.spec.training.max_steps
        progress.start(max_steps, self.step)
        with PreemptionFlag() as preempt:
            self._loop(log, progress, preempt)
        progress.stop()
        # the loop validates at max_steps; a run stopped early (max_tokens) has not yet
        final = self.validated[1] if self.validated and self.validated[0] == self.step else None
        final = final or self.validate()
        self.save_outputs(final)
        return TrainResult(self.run_dir, self.step, final)

    def _loop(self, log: MetricsLog | None, progress: Progress, preempt: PreemptionFlag) -> None:
        tr = self.spec.training
        ev = self.spec.evaluation
        max_steps = tr.max_steps
        while self.step < max_steps:
            if tr.max_tokens is not None and self.tokens >= tr.max_tokens:
                break
            if self.model.set_step(self.step) and log:
                log.write({"step": self.step, "event": "stage", "stage": self.model.stage_index})
            record = self.train_step()
            self.step += 1
            val = None
            if self.step % ev.every == 0 or self.step == max_steps:
                metrics = self.validate()
                self.validated = (self.step, metrics)
                val = metrics.bits_per_byte
                record.update(
                    {
                        "val/bits_per_byte": metrics.bits_per_byte,
                        "val/perplexity": metrics.perplexity,
                        "val/accuracy": metrics.accuracy,
                    }
                )
            if log and (self.step % tr.log_every == 0 or val is not None):
                log.write(record)
            progress.update(self.step, record)
            if self.nonfinite >= tr.max_nonfinite:
                progress.stop()
                raise KvdError(
                    f"training stopped: {self.nonfinite} non-finite losses or gradients in a row "
                    f"(step {self.step}); the last good checkpoint is intact",
                    hint="lower training.lr or check the data",
                )
            stop = self._any_rank(preempt.signal is not None)
            if self.step % tr.checkpoint_every == 0 or self.step == max_steps or stop:
                self.checkpoint(val)
            if stop:
                progress.stop()
                raise Preempted(
                    f"stopped by {preempt.signal or 'a signal on another rank'} after step "
                    f"{self.step}; checkpoint saved in {self.run_dir / 'checkpoints'}",
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
        check_same_run(run_dir, spec)  # the same command again continues an unfinished run
        resume = resume or True
        checkpoint = resume_point(run_dir, resume if isinstance(resume, Path) else None)
        if runtime.main:
            step = int(checkpoint.name.removeprefix("step-")) if checkpoint else 0
            print(f"kvd: resuming the run in {run_dir} from step {step}", file=sys.stderr)
    elif resume:
        raise KvdError(f"output.dir {run_dir}: holds no run to resume")
    elif runtime.main:
        check_new_run_dir(run_dir)
    # models and data are checked before anything is written: bad input leaves no run dir
    trainer = Trainer(spec, run_dir, runtime, base_dir)
    if resume:
        if checkpoint is not None:
            trainer.restore(checkpoint)
        if runtime.main:  # steps after the checkpoint are done again: drop their records
            truncate_metrics(run_dir / "metrics.jsonl", trainer.step)
    elif runtime.main:
        create_run_dir(run_dir)
        write_spec(run_dir, spec_data, spec.model_dump(mode="json"))
        write_environment(run_dir)
        write_manifest(trainer.data.manifest, run_dir / "split.json")
    log = None
    if runtime.main:
        log = MetricsLog(run_dir / "metrics.jsonl", tensorboard_writer(run_dir / "tensorboard"))
    try:
        return trainer.run(log, progress or Progress(enabled=runtime.main))
    finally:
        if log:
            log.close()
