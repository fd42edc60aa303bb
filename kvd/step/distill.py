"""The learned half of a step: student forward, projection, fusion and losses, in one module.

`DistillModel` holds everything that trains (the student, a K/V projector per teacher and
distilled layer, the fusion) so one DDP wrapper synchronises all of it. Its forward takes the
teachers' targets (see kvd.step.targets) and returns the weighted total loss with its parts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kvd.align.rope import RopeAligner
from kvd.core.errors import PlanError
from kvd.core.phases import phase
from kvd.core.types import KVShape
from kvd.fusion.base import Fusion, FusionInput, fuse, fused_mask
from kvd.losses.base import Loss, masked_mean
from kvd.losses.kv import KVLoss
from kvd.losses.rowwise import RowTerm, rowwise_group
from kvd.modeling.capture import capture_kv, unpack_rows
from kvd.project.base import KVProjector, Projector
from kvd.spec.models import LoadedModel
from kvd.spec.runspec import ProjectorRef
from kvd.step.curriculum import (
    Curriculum,
    LossTerm,
    Stage,
    is_ce,
    reads_logits,
    reads_projected_kv,
    reads_raw_kv,
)
from kvd.step.targets import TeacherRuntime, TeacherTargets

Direction = Literal["teacher_to_student", "student_to_teacher"]


@dataclass
class StepOutput:
    """total: the scalar to backpropagate; parts: detached 0-dim tensors by name for logging
    (`loss/<name>`, `loss/<name>/<teacher>`, `loss/<name>/L<layer>`), left on the device: a
    GPU step never waits for them; `numbers()` reads them all in one transfer."""

    total: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    routing: dict[int, Tensor] = field(default_factory=dict)

    def numbers(self) -> dict[str, float]:
        return read_numbers(self.parts)


def read_numbers(tensors: dict[str, Tensor]) -> dict[str, float]:
    """0-dim tensors by name -> floats, with one device-to-host transfer."""
    if not tensors:
        return {}
    names = list(tensors)
    values = torch.stack([tensors[n].detach().float() for n in names]).tolist()
    return dict(zip(names, values, strict=True))


def projector_key(teacher: str, layer: int) -> str:
    return f"{teacher}__L{layer}"


def kv_parts(
    loss: Loss,
    keys: tuple[Tensor, Tensor],
    values: tuple[Tensor, Tensor],
    mask: Tensor,
    *,
    per_position: bool = False,
) -> Tensor:
    """A KV loss on (student, target) keys and values: the mean of both, or only the part its
    `parts` names ("k" or "v"). per_position: the KVLoss's loss per position [B, T] instead of
    the scalar."""
    fn: Callable[[Tensor, Tensor, Tensor], Tensor] = loss
    if per_position:
        if not isinstance(loss, KVLoss):
            raise PlanError(
                f"{type(loss).__name__} gives no loss per position (subclass kvd.losses.KVLoss)",
                hint="use fusion combine: targets with this loss",
            )
        fn = loss.per_position
    if loss.parts == "k":
        return fn(*keys, mask)
    if loss.parts == "v":
        return fn(*values, mask)
    return 0.5 * (fn(*keys, mask) + fn(*values, mask))


def check_loss_layers(
    terms: list[LossTerm], distilled: list[int], teacher_layers: dict[str, list[int]]
) -> None:
    """Every K/V term's `layers` are distilled student layers, and each of its teachers teaches
    at least one of them (PlanError otherwise)."""
    for term in terms:
        if term.layers is None:
            continue
        outside = sorted(set(term.layers) - set(distilled))
        if outside:
            raise PlanError(
                f"loss {term.name}: layers {outside} are not distilled student layers "
                f"(these are {distilled})",
                hint="list layers from alignment.layers.student_layers in the loss's `layers`",
            )
        idle = [
            tid
            for tid in term.teachers
            if tid in teacher_layers and not set(term.layers) & set(teacher_layers[tid])
        ]
        if idle:
            raise PlanError(
                f"loss {term.name}: teacher(s) {idle} teach none of its layers {term.layers}",
                hint="give the loss `teachers` that map those layers, or other `layers`",
            )


class DistillModel(nn.Module):
    """Student + projectors + fusion + losses.

    teacher_shapes: KV shape per teacher id; teacher_layers: the student layers each teacher's
    plan distils; teacher_weights: spec weights (per-teacher losses are weighted by them,
    normalised over the teachers a loss uses); curriculum: the stages, whose fusions and losses
    this module holds (so one DDP wrapper synchronises them), and the one in force.
    """

    def __init__(
        self,
        student: Any,
        student_shape: KVShape,
        *,
        teacher_shapes: dict[str, KVShape],
        teacher_layers: dict[str, list[int]],
        teacher_weights: dict[str, float],
        projector_cls: type[Projector],
        projector_config: Any,
        direction: Direction,
        curriculum: Curriculum,
        rope: RopeAligner,
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher_ids = list(teacher_shapes)
        self.teacher_layers = teacher_layers
        self.teacher_weights = teacher_weights
        self.direction = direction
        self.rope = rope
        self.layers = sorted({j for layers in teacher_layers.values() for j in layers})
        self.curriculum = curriculum
        self.stage_fusions, self.loss_modules = curriculum.modules()
        self.real_token_head = True
        """Run the student's LM head on real tokens only (False: on every position, padding
        included, as a plain transformers forward does; benchmarks/ measure both)."""
        projectors = {}
        for tid, shape in teacher_shapes.items():
            source, target = (
                (shape, student_shape)
                if direction == "teacher_to_student"
                else (student_shape, shape)
            )
            for j in teacher_layers[tid]:
                projectors[projector_key(tid, j)] = KVProjector(
                    projector_cls, projector_config, source, target
                )
        self.projectors = nn.ModuleDict(projectors)
        self.student_shape = student_shape
        for stage in curriculum.stages:
            check_loss_layers(stage.losses, self.layers, teacher_layers)
            if direction == "student_to_teacher" and stage.fusion.routes_on_features:
                raise PlanError(
                    "projector.direction student_to_teacher compares in each teacher's own "
                    f"space, where fusion {type(stage.fusion).__name__} cannot route",
                    hint="use fusion fixed or mean, or direction teacher_to_student",
                )

    @property
    def stage(self) -> Stage:
        return self.curriculum.stage

    @property
    def fusion(self) -> Fusion:
        return self.stage.fusion

    @property
    def loss_terms(self) -> list[LossTerm]:
        return self.stage.losses

    def heads_parameters(self) -> list[nn.Parameter]:
        """Learned parameters besides the student's (projectors, fusions, losses)."""
        mods = [self.projectors, self.stage_fusions, self.loss_modules]
        return [p for m in mods for p in m.parameters()]

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        targets: dict[str, TeacherTargets],
        task: Tensor | None = None,
        real_rows: Tensor | None = None,
    ) -> StepOutput:
        """input_ids, attention_mask [B, Ts] (student tokens) and active teachers' targets.
        real_rows [N]: the flat positions of the real tokens (attention_mask.flatten().nonzero()),
        if the caller has them without a device read (from the host's mask)."""
        need_kv = self.stage.reads_kv
        mask = attention_mask.bool()
        with phase("student/forward"):
            rows = None
            if self.real_token_head:
                rows = real_rows if real_rows is not None else mask.flatten().nonzero().squeeze(1)
            cap = capture_kv(
                self.student,
                input_ids,
                attention_mask,
                layers=self.layers if need_kv else [],
                grad=True,
                rows=rows,
            )
            assert cap.logits is not None
            kv = self.rope.apply(cap.kv, self.student) if need_kv else cap.kv
        s_keys = dict(zip(kv.layers, kv.keys, strict=True))
        s_values = dict(zip(kv.layers, kv.values, strict=True))
        out = StepOutput(total=cap.logits.new_zeros(()))
        with phase("loss/logits"):
            grouped = self._rowwise_terms(cap.logits, rows, input_ids, mask, targets, out)
        full: Tensor | None = None  # [B, Ts, V] for losses that are not row-wise kernels
        for term in self.loss_terms:
            if any(term is g for g in grouped):
                continue
            if (is_ce(term.module) or reads_logits(term.module)) and full is None:
                full = cap.logits if rows is None else unpack_rows(cap.logits, rows, mask.shape)
            with phase(f"loss/{term.name}"):
                if is_ce(term.module):
                    assert full is not None
                    value = term.module(full, input_ids, mask)
                elif reads_projected_kv(term.module) and self.direction == "teacher_to_student":
                    value = self._fused_kv(term, s_keys, s_values, targets, task, out)
                else:
                    value = self._per_teacher(term, full, s_keys, s_values, targets, out)
            out.parts[f"loss/{term.name}"] = value.detach()
            out.total = out.total + term.weight * value
        out.parts["loss/total"] = out.total.detach()
        return out

    def _rowwise_terms(
        self,
        logits: Tensor,
        rows: Tensor | None,
        input_ids: Tensor,
        mask: Tensor,
        targets: dict[str, TeacherTargets],
        out: StepOutput,
    ) -> list[LossTerm]:
        """The terms on the student logits that are row-wise kernels (CE, logit KD), run as one
        group: one pass over the logits, one gradient buffer (kvd.losses.rowwise). logits [N, V]
        are the student's at the flat positions `rows` [N] of input_ids and mask [B, Ts]
        ([B, Ts, V] when rows is None). Adds
        their weighted sum to out.total and their parts; returns the terms it handled."""
        found_rows: list[tuple[LossTerm, str | None, float, RowTerm]] = []
        handled: list[LossTerm] = []
        for term in self.loss_terms:
            if is_ce(term.module):
                row = term.module.row_term(logits, input_ids, mask)
                if row is not None:
                    found_rows.append((term, None, 1.0, row))
                    handled.append(term)
            elif reads_logits(term.module):
                active = [t for t in term.teachers if t in targets]
                found = []
                for tid, w in self._weights(active).items():
                    t = targets[tid]
                    t_logits = t.logit_rows() if term.module.reads_logit_rows else t.dense_logits()
                    if t_logits is not None:
                        valid = t.logit_valid
                        found.append((tid, w, term.module.row_term(logits, t_logits, valid)))
                if found and all(row is not None for *_, row in found):
                    found_rows += [(term, tid, w, row) for tid, w, row in found if row is not None]
                    handled.append(term)
        if not found_rows:
            return handled
        for term, _, w, row in found_rows:
            row.weight = term.weight * w
        total, means = rowwise_group(logits, [row for *_, row in found_rows], rows)
        out.total = out.total + total
        values: dict[str, Tensor] = {}
        for (term, teacher, w, _), mean in zip(found_rows, means, strict=True):
            if teacher is not None:
                out.parts[f"loss/{term.name}/{teacher}"] = mean.detach()
            part = w * mean.detach()
            values[term.name] = part + values[term.name] if term.name in values else part
        for name, value in values.items():
            out.parts[f"loss/{name}"] = value
        return handled

    # -- per-teacher terms ---------------------------------------------------------------------

    def _per_teacher(
        self,
        term: LossTerm,
        logits: Tensor | None,
        s_keys: dict[int, Tensor],
        s_values: dict[int, Tensor],
        targets: dict[str, TeacherTargets],
        out: StepOutput,
    ) -> Tensor:
        """A loss computed per teacher, weighted by the teachers' normalised spec weights."""
        active = [t for t in term.teachers if t in targets]
        total = out.total.new_zeros(())
        for tid, w in self._weights(active).items():
            t = targets[tid]
            if reads_logits(term.module):
                t_logits = t.dense_logits()
                if t_logits is None:
                    continue
                assert logits is not None
                value = term.module(logits, t_logits, t.logit_valid)
            elif reads_raw_kv(term.module):
                value = self._raw(term, s_keys, s_values, t)
            else:
                value = self._s2t(term, tid, t, s_keys, s_values, out)
            out.parts[f"loss/{term.name}/{tid}"] = value.detach()
            total = total + w * value
        return total

    def _weights(self, teachers: list[str]) -> dict[str, float]:
        total = sum(self.teacher_weights[t] for t in teachers)
        return {t: self.teacher_weights[t] / total for t in teachers} if total > 0 else {}

    def _raw(
        self,
        term: LossTerm,
        s_keys: dict[int, Tensor],
        s_values: dict[int, Tensor],
        t: TeacherTargets,
    ) -> Tensor:
        layers = [j for j in t.keys if j in s_keys and term.reads_layer(j)]
        values = [
            term.module(s_keys[j], s_values[j], t.keys[j].float(), t.values[j].float(), t.mask)
            for j in layers
        ]
        return torch.stack(values).mean()

    def _s2t(
        self,
        term: LossTerm,
        tid: str,
        t: TeacherTargets,
        s_keys: dict[int, Tensor],
        s_values: dict[int, Tensor],
        out: StepOutput,
    ) -> Tensor:
        values = []
        for j in filter(term.reads_layer, t.keys):
            pk, pv = self.projectors[projector_key(tid, j)](s_keys[j], s_values[j])
            value = kv_parts(
                term.module, (pk, t.keys[j].float()), (pv, t.values[j].float()), t.mask
            )
            out.parts[f"loss/{term.name}/{tid}/L{j}"] = value.detach()
            values.append(value)
        return torch.stack(values).mean()

    # -- fused teacher->student KV ------------------------------------------------------------

    def _fused_kv(
        self,
        term: LossTerm,
        s_keys: dict[int, Tensor],
        s_values: dict[int, Tensor],
        targets: dict[str, TeacherTargets],
        task: Tensor | None,
        out: StepOutput,
    ) -> Tensor:
        values = []
        targets = {tid: t for tid, t in targets.items() if tid in term.teachers}
        for index, j in enumerate(self.layers):
            if not term.reads_layer(j):
                continue
            sk, sv = s_keys[j], s_values[j]
            with phase("project"):
                tk, tv, tmask = self._projected_targets(j, sk, targets)
            with phase("fuse"):
                ce = None
                if self.fusion.needs_teacher_ce:
                    ce = torch.stack(
                        [self._teacher_ce(targets, tid, sk) for tid in self.teacher_ids]
                    )
                routed = self.fusion(
                    FusionInput(
                        teacher=tk,
                        student=sk.detach(),
                        mask=tmask,
                        layer=index,
                        task=task,
                        teacher_ce=ce,
                    )
                )
            if self.fusion.combine == "losses":
                value = self._fused_losses(
                    term, j, (sk, tk), (sv, tv), tmask, routed.weights, targets, out
                )
            else:
                value = kv_parts(
                    term.module,
                    (sk, fuse(tk, routed.weights)),
                    (sv, fuse(tv, routed.weights)),
                    fused_mask(tmask),
                )
                for n, tid in enumerate(self.teacher_ids):  # each teacher's own loss, logged
                    if tid in targets and j in targets[tid].keys:
                        pair_k = (sk.detach(), tk[n].detach())
                        pair_v = (sv.detach(), tv[n].detach())
                        own = kv_parts(term.module, pair_k, pair_v, tmask[n])
                        out.parts[f"loss/{term.name}/{tid}/L{j}"] = own.detach()
            value = value + routed.aux_loss
            out.parts[f"loss/{term.name}/L{j}"] = value.detach()
            out.routing[j] = routed.weights.detach()
            values.append(value)
        return torch.stack(values).mean()

    def _fused_losses(
        self,
        term: LossTerm,
        j: int,
        keys: tuple[Tensor, Tensor],
        values: tuple[Tensor, Tensor],
        mask: Tensor,
        weights: Tensor,
        targets: dict[str, TeacherTargets],
        out: StepOutput,
    ) -> Tensor:
        """Loss fusion at student layer j: each teacher's loss per position l_n [B, Ts] against
        its own projected target (keys, values: student [B, Hs, Ts, Ds] and teachers
        [N, B, Hs, Ts, Ds]; mask [N, B, Ts]), then sum_n a_n l_n with the routing weights
        a [B, Ts, N], averaged over the positions where any teacher is valid."""
        (sk, tk), (sv, tv) = keys, values
        losses = []
        for n, tid in enumerate(self.teacher_ids):
            t = targets.get(tid)
            if t is None or j not in t.keys:  # inactive, or not teaching layer j: weight 0
                losses.append(weights.new_zeros(weights.shape[:2]))
                continue
            loss = kv_parts(term.module, (sk, tk[n]), (sv, tv[n]), mask[n], per_position=True)
            out.parts[f"loss/{term.name}/{tid}/L{j}"] = masked_mean(loss, mask[n]).detach()
            losses.append(loss)
        per = torch.stack(losses, dim=-1)  # [B, Ts, N]
        return masked_mean((per * weights).sum(-1), fused_mask(mask))

    def _projected_targets(
        self, j: int, like: Tensor, targets: dict[str, TeacherTargets]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Every teacher's K, V at student layer j in student geometry: [N, B, Hs, Ts, Ds] each,
        and mask [N, B, Ts] (all False for teachers inactive now or not mapping layer j)."""
        ks, vs, masks = [], [], []
        for tid in self.teacher_ids:
            t = targets.get(tid)
            if t is None or j not in t.keys:
                ks.append(torch.zeros_like(like))
                vs.append(torch.zeros_like(like))
                masks.append(
                    torch.zeros(like.shape[0], like.shape[2], dtype=torch.bool, device=like.device)
                )
                continue
            pk, pv = self.projectors[projector_key(tid, j)](t.keys[j].float(), t.values[j].float())
            ks.append(pk)
            vs.append(pv)
            masks.append(t.mask)
        return torch.stack(ks), torch.stack(vs), torch.stack(masks)

    @staticmethod
    def _teacher_ce(targets: dict[str, TeacherTargets], tid: str, like: Tensor) -> Tensor:
        t = targets.get(tid)
        if t is None or t.ce is None:
            return torch.full((like.shape[0],), float("inf"), device=like.device)
        return t.ce


def build_distill_model(
    student: LoadedModel,
    teachers: Sequence[TeacherRuntime],
    teacher_shapes: dict[str, KVShape],
    curriculum: Curriculum,
    projector: ProjectorRef,
    rope: RopeAligner,
) -> DistillModel:
    """The DistillModel of a student and its teachers (their plans, KV shapes and weights),
    with the spec's projector; the curriculum's fusions and losses become its modules."""
    return DistillModel(
        student.model,
        student.geometry.kv_shape,
        teacher_shapes={t.id: teacher_shapes[t.id] for t in teachers},
        teacher_layers={t.id: t.plan.student_layers for t in teachers},
        teacher_weights={t.id: t.weight for t in teachers},
        projector_cls=projector.component,
        projector_config=projector.config,
        direction=projector.direction,
        curriculum=curriculum,
        rope=rope,
    )
