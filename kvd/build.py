"""Building a run's parts from its spec: models, layer plans, loss terms and stages."""

from __future__ import annotations

from typing import Any

import torch

from kvd.align.base import LayerAligner, LayerPlan, TokenAligner
from kvd.align.rope import RopeAligner
from kvd.distill import LossTerm, Stage
from kvd.errors import KvdError, PlanError
from kvd.geometry import ModelGeometry
from kvd.models import LoadedModel
from kvd.spec import FusionRef, LossRef, RunSpec, TeacherRef
from kvd.types import KVShape

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_model(ref: Any, device: torch.device, where: str, seed: int = 0) -> LoadedModel:
    """Load a teacher or the student, turning load failures into errors that name the model;
    with `reinit` its weights are replaced by a random init of the same architecture (`seed`)."""
    source = ref.build()
    try:
        loaded = source.load(device=device, dtype=DTYPES[ref.dtype])
        if ref.reinit:
            from kvd.sources.tiny import random_model

            model = random_model(loaded.model.config, seed=seed, dtype=DTYPES[ref.dtype])
            loaded.model = model.to(device)
        return loaded
    except torch.OutOfMemoryError:
        raise KvdError(
            f"{where}: out of memory loading {source.describe()} on {device}",
            hint="use dtype: bfloat16, fewer teachers, or a bigger device",
        ) from None


def kv_shape(geometry: ModelGeometry) -> KVShape:
    return KVShape(geometry.num_kv_heads, geometry.head_dim)


def layer_plans(
    aligner: LayerAligner,
    teachers: list[tuple[TeacherRef, LoadedModel]],
    student: LoadedModel,
    calibration_texts: list[str],
    token_aligner: TokenAligner,
    rope: RopeAligner,
    device: torch.device,
) -> dict[str, LayerPlan]:
    """One layer plan per teacher; CKA plans are computed on a calibration batch."""
    plans = {}
    n_student = student.geometry.num_layers
    for ref, loaded in teachers:
        n_teacher = loaded.geometry.num_layers
        calibration = None
        if aligner.needs_calibration:
            from kvd.calibrate import layer_calibration

            calibration = layer_calibration(
                loaded, student, calibration_texts, token_aligner, rope, device
            )
        try:
            plans[ref.id] = aligner.plan(n_teacher, n_student, calibration)
        except PlanError as exc:
            raise PlanError(f"alignment.layers for teacher {ref.id!r}: {exc.message}") from None
    return plans


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
        )
        for i, ref in enumerate(refs)
    ]


def build_stages(
    spec: RunSpec, n_layers: int, kv_dim: int, n_tasks: int, teacher_ids: list[str]
) -> list[Stage]:
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
    return stages


def uses_teachers(spec: RunSpec) -> bool:
    """Whether any loss of any stage reads teacher outputs (a CE-only run loads no teacher)."""
    refs = list(spec.losses) + [x for st in spec.training.stages for x in st.losses or []]
    return any(ref.component.inputs != "ce" for ref in refs)


def check_lengths(spec: RunSpec, models: dict[str, ModelGeometry]) -> None:
    """A sequence length beyond what a model's positions allow is bad input, named by model."""
    for where, geometry in models.items():
        limit = geometry.max_position
        if limit is not None and spec.data.seq_len > limit:
            raise KvdError(
                f"data.seq_len {spec.data.seq_len} exceeds {where}'s {limit} positions",
                hint=f"set data.seq_len <= {limit}",
            )
