"""Building a run's parts from its spec: models and layer plans."""

from __future__ import annotations

import torch

from kvd.align.base import LayerAligner, LayerPlan, TokenAligner
from kvd.align.rope import RopeAligner
from kvd.core.errors import KvdError, PlanError
from kvd.spec.geometry import ModelGeometry
from kvd.spec.models import LoadedModel
from kvd.spec.runspec import ModelRef, RunSpec, TeacherRef

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_model(ref: ModelRef, device: torch.device, where: str, seed: int = 0) -> LoadedModel:
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
            from kvd.sources.calibrate import layer_calibration

            calibration = layer_calibration(
                loaded, student, calibration_texts, token_aligner, rope, device
            )
        try:
            plans[ref.id] = aligner.plan(n_teacher, n_student, calibration)
        except PlanError as exc:
            raise PlanError(f"alignment.layers for teacher {ref.id!r}: {exc.message}") from None
    return plans


def check_lengths(spec: RunSpec, models: dict[str, ModelGeometry]) -> None:
    """A sequence length beyond what a model's positions allow is bad input, named by model."""
    for where, geometry in models.items():
        limit = geometry.max_position
        if limit is not None and spec.data.seq_len > limit:
            raise KvdError(
                f"data.seq_len {spec.data.seq_len} exceeds {where}'s {limit} positions",
                hint=f"set data.seq_len <= {limit}",
            )
