"""The curriculum: which teachers are active and what each loss reads, step by step.

Both halves of a step ask it: the teacher side (which teachers to run, whether K/V, logits or
per-sequence CE are needed) and the student side (which losses to compute, with which fusion).
It is the one place that interprets a loss's `inputs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from kvd.fusion.base import Fusion
from kvd.losses.base import KV_INPUTS, Loss
from kvd.spec.runspec import FusionRef, LossRef, RunSpec


def reads_kv(loss: type[Loss] | Loss) -> bool:
    """Whether the loss compares K/V (projected, "kv", or each side in its own geometry)."""
    return loss.inputs in KV_INPUTS


def reads_projected_kv(loss: type[Loss] | Loss) -> bool:
    """Whether the loss compares student and teacher K/V in one (projected) geometry."""
    return loss.inputs == "kv"


def reads_raw_kv(loss: type[Loss] | Loss) -> bool:
    """Whether the loss takes student and teacher K/V each in its own geometry."""
    return loss.inputs == "kv_raw"


def is_ce(loss: type[Loss] | Loss) -> bool:
    """Whether the loss is on the student's logits and the text alone (no teacher)."""
    return loss.inputs == "ce"


def reads_logits(loss: type[Loss] | Loss) -> bool:
    """Whether the loss compares the student's logits with a teacher's."""
    return loss.inputs == "logits"


def reads_teachers(loss: type[Loss] | Loss) -> bool:
    """Whether the loss reads any teacher output (all but CE)."""
    return not is_ce(loss)


@dataclass
class LossTerm:
    """One configured loss: its module, weight in the total, the teachers it applies to and,
    for a K/V loss, the student layers it compares (None: every distilled layer)."""

    name: str
    module: Loss
    weight: float
    teachers: list[str]
    layers: list[int] | None = None

    def reads_layer(self, layer: int) -> bool:
        """Whether this term compares K/V at student layer `layer`."""
        return self.layers is None or layer in self.layers


@dataclass
class Stage:
    """A curriculum stage from `start_step` on: the active teachers, fusion and losses."""

    start_step: int
    teachers: list[str]
    fusion: Fusion
    losses: list[LossTerm]

    @property
    def reads_kv(self) -> bool:
        """Whether a loss of this stage reads the teachers' K/V."""
        return any(reads_kv(t.module) for t in self.losses)

    @property
    def logit_readers(self) -> set[str]:
        """Teachers whose logits a loss of this stage reads."""
        return {tid for t in self.losses if reads_logits(t.module) for tid in t.teachers}


class Curriculum:
    """The stages of a run and the one in force; `set_step` moves between them."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self.index = 0

    @property
    def stage(self) -> Stage:
        return self.stages[self.index]

    def set_step(self, step: int) -> bool:
        """Select the stage in force at optimizer step `step`; True when it changed."""
        index = max(i for i, s in enumerate(self.stages) if s.start_step <= step)
        changed = index != self.index
        self.index = index
        return changed

    def modules(self) -> tuple[nn.ModuleList, nn.ModuleList]:
        """Every stage's fusion and every loss module, to register on the trained model."""
        fusions = nn.ModuleList(stage.fusion for stage in self.stages)
        losses = nn.ModuleList(t.module for stage in self.stages for t in stage.losses)
        return fusions, losses


def loss_terms(refs: list[LossRef], teacher_ids: list[str]) -> list[LossTerm]:
    """Loss modules from their spec entries (each built from its own Config); a name used twice
    is logged with its index."""
    names = [ref.name for ref in refs]
    return [
        LossTerm(
            ref.name if names.count(ref.name) == 1 else f"{ref.name}{i}",
            ref.component(ref.config),
            ref.weight,
            ref.teachers or teacher_ids,
            ref.layers,
        )
        for i, ref in enumerate(refs)
    ]


def build_curriculum(
    spec: RunSpec, n_layers: int, kv_dim: int, n_tasks: int, teacher_ids: list[str]
) -> Curriculum:
    """The base stage from the spec's fusion/losses, then each training.stages entry."""
    weights = [t.weight for t in spec.teachers]

    def fusion_of(ref: FusionRef) -> Any:
        return ref.component(
            ref.config,
            n_teachers=len(teacher_ids),
            n_layers=max(n_layers, 1),
            kv_dim=kv_dim,
            n_tasks=n_tasks,
            teacher_weights=weights,
        )

    stages = [Stage(0, teacher_ids, fusion_of(spec.fusion), loss_terms(spec.losses, teacher_ids))]
    for entry in spec.training.stages:
        prev = stages[-1]
        if entry.start_step == 0:
            stages.pop()
        stages.append(
            Stage(
                entry.start_step,
                entry.teachers or prev.teachers,
                fusion_of(entry.fusion) if entry.fusion else prev.fusion,
                loss_terms(entry.losses, teacher_ids) if entry.losses else prev.losses,
            )
        )
    return Curriculum(stages)


def spec_losses(spec: RunSpec) -> list[LossRef]:
    """The loss entries of every stage of the spec (before anything is built)."""
    return list(spec.losses) + [x for st in spec.training.stages for x in st.losses or []]


def uses_teachers(spec: RunSpec) -> bool:
    """Whether any loss of any stage reads teacher outputs (a CE-only run loads no teacher)."""
    return any(reads_teachers(ref.component) for ref in spec_losses(spec))


def kv_layers_by_teacher(spec: RunSpec) -> dict[str, list[int] | None]:
    """Per teacher some K/V loss of some stage reads: the student layers those losses compare
    (sorted; None when one of them compares every distilled layer). Teachers no K/V loss reads
    are left out."""
    ids = [t.id for t in spec.teachers]
    out: dict[str, list[int] | None] = {}
    for ref in spec_losses(spec):
        if not reads_kv(ref.component):
            continue
        for tid in ref.teachers or ids:
            known = out.get(tid, [])
            if known is None or ref.layers is None:
                out[tid] = None
            else:
                out[tid] = sorted({*known, *ref.layers})
    return out


def student_vocab_teachers(spec: RunSpec) -> list[str]:
    """Sorted ids of the teachers some loss compares with the student token by token
    (Loss.needs_student_vocab)."""
    return _teachers_read(spec, lambda loss: loss.needs_student_vocab)


def logit_teachers(spec: RunSpec) -> list[str]:
    """Sorted ids of the teachers whose logits some loss of some stage reads."""
    return _teachers_read(spec, reads_logits)


def _teachers_read(spec: RunSpec, by: Callable[[type[Loss]], bool]) -> list[str]:
    """Sorted ids of the teachers read by the losses of any stage whose class satisfies `by`
    (a loss without `teachers:` reads them all)."""
    ids = [t.id for t in spec.teachers]
    return sorted({t for r in spec_losses(spec) if by(r.component) for t in r.teachers or ids})
