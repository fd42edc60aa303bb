"""The teacher half of a run: the teachers (or the offline cache of their work), the
parameter-free alignment onto the student, and the cache's fingerprint.

`targets` gives what the student side compares against at a step: each active teacher's K/V at
the student layers of its plan and at student positions, its aligned logits where a loss reads
them, its per-sequence CE where the fusion routes on it (kvd.step.targets). `build_cache` runs the
teachers over every batch of the run once and stores exactly those targets.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from kvd.align.base import LayerAligner, LayerPlan, TokenAligner
from kvd.align.rope import RopeAligner
from kvd.align.vocab import VocabAligner
from kvd.core.errors import KvdError
from kvd.core.progress import Progress
from kvd.core.runtime import Runtime, node_first, oom_guard
from kvd.core.types import TokenBatch
from kvd.data import Data
from kvd.data.batches import StudentBatches
from kvd.modeling.head import OutputHead
from kvd.modeling.sharding import process_mesh, shard_frozen
from kvd.sources.build import layer_plans, load_model
from kvd.spec.geometry import ModelGeometry
from kvd.spec.models import LoadedModel
from kvd.spec.runspec import RunSpec, TeacherRef
from kvd.step.curriculum import Curriculum, Stage, logit_teachers, uses_teachers
from kvd.step.targets import TeacherRuntime, TeacherTargets, teacher_targets
from kvd.step.teacher_cache import FORMAT, CacheWriter, TeacherCache, pack


def teacher_geometries(spec: RunSpec) -> dict[str, ModelGeometry]:
    """Each teacher's geometry, read without loading weights; none for a run that reads no
    teacher (CE only)."""
    refs = list(spec.teachers) if uses_teachers(spec) else []
    return {ref.id: ref.build().geometry() for ref in refs}


class TeacherSide:
    """The run's teachers, loaded unless an offline cache that matches the fingerprint holds
    their work (use_cache), with their layer plans onto the student and their KV shapes."""

    def __init__(
        self,
        spec: RunSpec,
        student: LoadedModel,
        data: Data,
        runtime: Runtime,
        geometries: dict[str, ModelGeometry],
        *,
        use_cache: bool = True,
    ) -> None:
        self.spec = spec
        self.student = student
        self.data = data
        self.rt = runtime
        refs = [ref for ref in spec.teachers if ref.id in geometries]
        align = spec.alignment
        self.token_aligner = align.tokens.component_of(TokenAligner)(align.tokens.config)
        self.rope = align.rope.component_of(RopeAligner)(align.rope.config)
        self.cache: TeacherCache | None = None
        if spec.training.teacher_cache and use_cache and refs:
            self.cache = TeacherCache.open(Path(spec.training.teacher_cache), self.fingerprint())
        loaded = {} if self.cache else self._load(refs)
        if self.cache is not None:
            plans = {
                tid: LayerPlan([tuple((int(t), w) for t, w in pairs) for pairs in sources])
                for tid, sources in self.cache.plans.items()
            }
        else:
            layer_aligner = align.layers.component_of(LayerAligner)(align.layers.config)
            calibration = [w.text for w in data.validation[: spec.training.batch_size]]
            plans = layer_plans(
                layer_aligner,
                [(ref, loaded[ref.id]) for ref in refs],
                student,
                calibration,
                self.token_aligner,
                self.rope,
                runtime.device,
            )
        self.teachers = [
            TeacherRuntime(
                ref.id, ref.weight, loaded.get(ref.id), plans[ref.id], geometries[ref.id].adds_bos
            )
            for ref in refs
        ]
        self._map_vocabularies(geometries)
        self.shapes = {tid: g.kv_shape for tid, g in geometries.items()}
        """KV shape per teacher id."""
        self._heads: dict[str, OutputHead] | None = None  # step_targets' checked heads

    def _load(self, refs: list[TeacherRef]) -> dict[str, LoadedModel]:
        """Load each teacher (sharded right after it loads under teacher_parallel: fsdp, so a
        process never holds more than one whole teacher)."""
        mesh = None
        if self.spec.training.teacher_parallel == "fsdp" and self.rt.world > 1:
            mesh = process_mesh(self.rt.device.type, self.rt.world)
        index = {ref.id: i for i, ref in enumerate(self.spec.teachers)}

        def prepare() -> None:  # conversions first: their peak memory never adds to loaded ones
            for ref in refs:
                ref.build().prepare()

        node_first(self.rt, prepare)
        loaded = {}
        for ref in refs:
            model = load_model(ref, self.rt.device, f"teachers.{index[ref.id]}", self.spec.seed)
            # eval and no_grad (in teacher_targets) keep teachers frozen. Not requires_grad_(False):
            # on CPU it sends a bf16 tied LM head down a path that copies the whole weight per call
            # (Gemma-3: 0.4 s -> 4.7 s per forward, measured).
            model.model.eval()
            if mesh is not None:
                shard_frozen(model.model, mesh)
            loaded[ref.id] = model
        return loaded

    def _map_vocabularies(self, geometries: dict[str, ModelGeometry]) -> None:
        """Give each loaded teacher whose logits a loss reads its map onto the student's
        vocabulary (alignment.vocab; None keeps its own)."""
        ref = self.spec.alignment.vocab
        aligner = ref.component_of(VocabAligner)(ref.config)
        readers = set(logit_teachers(self.spec))
        for t in self.teachers:
            if t.loaded is not None and t.id in readers:
                t.vocab = aligner.map(
                    t.loaded.tokenizer,
                    self.student.tokenizer,
                    geometries[t.id].vocab_size,
                    self.student.geometry.vocab_size,
                )

    @property
    def n_layers(self) -> int:
        """How many student layers some teacher's plan distils."""
        return len({j for t in self.teachers for j in t.plan.student_layers})

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
            "data": s.data.fingerprint(),
            "split": self.data.manifest.digest,
            "alignment": s.alignment.fingerprint(),
            "seed": s.seed,
            "batch_size": s.training.batch_size,
            "grad_accum": s.training.grad_accum,
            "world": self.rt.world,
        }

    # -- one step's targets ----------------------------------------------------------------

    def targets(
        self,
        stage: Stage,
        texts: list[str],
        student_batch: TokenBatch,
        *,
        step: int,
        heads: Mapping[str, OutputHead] = MappingProxyType({}),
    ) -> dict[str, TeacherTargets]:
        """Targets of the teachers active in `stage` for these texts; logits only for teachers
        a logit loss reads (the LM head of a 262k vocabulary costs more than the rest of a small
        model), as hidden states and head for the teachers in `heads` (checked ones:
        `checked_heads`)."""
        active = set(stage.teachers)
        logit_readers = stage.logit_readers
        out = {}
        for t in self.teachers:
            if t.id not in active:
                continue
            with oom_guard(f"teacher {t.id!r}", student_batch, self.rt.device, step):
                out[t.id] = teacher_targets(
                    t,
                    texts,
                    student_batch,
                    token_aligner=self.token_aligner,
                    rope=self.rope,
                    want_logits=t.id in logit_readers,
                    want_ce=stage.fusion.needs_teacher_ce,
                    device=self.rt.device,
                    head=heads.get(t.id),
                    want_kv=stage.reads_kv,
                )
        return out

    def step_targets(
        self, stage: Stage, texts: list[str], student_batch: TokenBatch, *, step: int
    ) -> dict[str, TeacherTargets]:
        """The targets a training step reads: as `targets`, with the logits as hidden states
        wherever the teacher's head gives them exactly (checked on the first batch), so a step
        never holds a [B, Ts, V] tensor of teacher logits for the row-wise losses."""
        if self._heads is None:
            self._heads, got = self.checked_heads(stage, texts, student_batch, step=step)
            return got
        return self.targets(stage, texts, student_batch, step=step, heads=self._heads)

    def cached_targets(self, stage: Stage, step: int, micro: int) -> dict[str, TeacherTargets]:
        """The targets of optimizer step `step` (0-based), micro-batch `micro`, from the
        offline cache, for the teachers active in `stage`; an error names what the cache lacks."""
        assert self.cache is not None
        cached = self.cache.get(step, micro, self.rt.device)
        active = stage.teachers
        ours = {t.id: t for t in self.teachers}
        missing = [tid for tid in active if tid in ours and tid not in cached]
        if missing:
            raise KvdError(
                f"training.teacher_cache {self.cache.root}: has no targets of {', '.join(missing)} "
                f"at step {step + 1} (the stages changed since it was built)",
                hint="rebuild it with `kvd cache-teachers SPEC`",
            )
        readers = stage.logit_readers
        for tid in active:
            t = cached.get(tid)
            lacks = None
            if t is not None and tid in readers and not t.has_logits:
                lacks = "logits"
            elif t is not None and stage.fusion.needs_teacher_ce and t.ce is None:
                lacks = "per-sequence CE"
            elif t is not None and stage.reads_kv and ours[tid].plan.student_layers and not t.keys:
                lacks = "K/V"
            if lacks:
                raise KvdError(
                    f"training.teacher_cache {self.cache.root}: has no {lacks} of teacher {tid!r} "
                    "(the losses or fusion changed since it was built)",
                    hint="rebuild it with `kvd cache-teachers SPEC`",
                )
        return {tid: t for tid, t in cached.items() if tid in active}

    # -- the offline cache -----------------------------------------------------------------

    def build_cache(
        self,
        writer: CacheWriter,
        progress: Progress,
        curriculum: Curriculum,
        batches: StudentBatches,
    ) -> TeacherCache:
        """Run the teachers over every batch of the run (the batches the training loop will
        draw, stage by stage) and store their targets; logits as hidden states for the teachers
        whose head reproduces them exactly (kvd.modeling.head), checked on the first batch against
        the teachers' own logits."""
        tr = self.spec.training
        progress.start(tr.max_steps, 0)
        curriculum.set_step(0)
        heads: dict[str, OutputHead] = {}
        for step in range(tr.max_steps):
            curriculum.set_step(step)
            tensors: dict[str, torch.Tensor] = {}
            for micro in range(tr.grad_accum):
                texts, _, s_batch = batches.next()
                if step == 0 and micro == 0:
                    heads, targets = self.checked_heads(curriculum.stage, texts, s_batch, step=0)
                else:
                    targets = self.targets(curriculum.stage, texts, s_batch, step=step, heads=heads)
                tensors |= pack(targets, micro)
            writer.put(step, tensors)
            progress.update(step + 1, {"cache_mb": writer.bytes / 2**20})
        progress.stop()
        plans = {
            t.id: [[[j, w] for j, w in pairs] for pairs in t.plan.sources] for t in self.teachers
        }
        return writer.finish(tr.max_steps, plans, heads)

    def checked_heads(
        self, stage: Stage, texts: list[str], student_batch: TokenBatch, *, step: int
    ) -> tuple[dict[str, OutputHead], dict[str, TeacherTargets]]:
        """The heads of the teachers whose logits some loss reads (in any stage) and whose
        hidden states give exactly their aligned logits, checked on this batch against the
        teachers' own logits, and this batch's targets with those heads (the others' targets
        hold their logits)."""
        readers = set(logit_teachers(self.spec))
        sharded = self.spec.training.teacher_parallel == "fsdp" and self.rt.world > 1
        heads = {}
        for t in self.teachers:
            # a sharded teacher's head is a shard: its own forward gathers it
            head = OutputHead.of(t.loaded.model) if t.loaded and not sharded else None
            if head is not None and t.id in readers and t.vocab is None:
                heads[t.id] = head
        targets = self.targets(stage, texts, student_batch, step=step, heads=heads)
        if not heads:
            return heads, targets
        plain = self.targets(stage, texts, student_batch, step=step)
        for tid in list(heads):
            got, want = targets.get(tid), plain.get(tid)
            computed = got.dense_logits() if got is not None and got.hidden is not None else None
            known = want.logits if want is not None else None
            if known is not None and computed is not None and torch.equal(computed, known):
                continue
            del heads[tid]  # wrong, or not checked (no logits read in this stage): not used
            if want is not None:
                targets[tid] = want
        return heads, targets
