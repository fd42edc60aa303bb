"""A run's parts from its spec, in the order they depend on each other:
student -> data -> teacher side (teachers or their cache, alignment, layer plans) ->
curriculum (stages: fusions, losses) -> the batches the run draws.

Training adds the learned parts on top (kvd.run.train); the teacher cache commands need only these.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvd.core.progress import Progress
from kvd.core.runtime import Runtime, node_first
from kvd.data import Data, build_data
from kvd.data.batches import StudentBatches
from kvd.modeling.sharding import decoder_layers
from kvd.sources.build import check_lengths, load_model
from kvd.spec.geometry import ModelGeometry
from kvd.spec.models import LoadedModel
from kvd.spec.runspec import RunSpec
from kvd.step.curriculum import Curriculum, build_curriculum
from kvd.step.teacher_cache import CacheWriter, TeacherCache
from kvd.step.teacher_side import TeacherSide, teacher_geometries


@dataclass
class RunParts:
    """Everything of a run that is not learned besides the student's weights."""

    student: LoadedModel
    data: Data
    teachers: TeacherSide
    curriculum: Curriculum
    batches: StudentBatches


def checkpoint_activations(model: Any) -> None:
    """Recompute each decoder layer's activations in backward, non-reentrant: K/V captured in
    the first forward keep their graph (kvd.modeling.capture). transformers >= 5.2x names it
    activation_checkpointing_enable (gradient_checkpointing_enable, deprecated there, is the
    only name before)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_layers(model: Any) -> None:
    """torch.compile each decoder layer of `model` in place (its state dict keeps its names),
    with dynamic shapes: batches differ in length. K/V capture and RoPE work through it (the
    same losses as uncompiled, tests/test_train.py)."""
    for layer in decoder_layers(model):
        layer.compile(dynamic=True)


def assemble(
    spec: RunSpec,
    runtime: Runtime,
    base_dir: Path,
    *,
    use_cache: bool = True,
    only: Collection[str] | None = None,
) -> RunParts:
    """Build the parts; models and data are checked before anything is written, so bad input
    leaves nothing behind. use_cache: read the teachers' work from training.teacher_cache
    when it matches (False: load the teachers, e.g. to build that cache). only: the ids of the
    teachers this process loads (None: all; benchmarks/teacher_placement.py places each on one
    rank); layer plans and targets are per teacher, so each gives the targets it gives in full."""
    torch.manual_seed(spec.seed)
    student = load_model(spec.student, runtime.device, "student", spec.seed)
    geometries: dict[str, ModelGeometry] = {}  # a split GGUF is assembled into the cache here
    node_first(runtime, lambda: geometries.update(teacher_geometries(spec)))
    check_lengths(spec, {"student": student.geometry} | geometries)
    student.model.train()
    if spec.training.activation_checkpointing:
        checkpoint_activations(student.model)
    if spec.training.compile:
        compile_layers(student.model)
    # data, split by content hash; windows cut in student tokens
    data = build_data(
        spec.data,
        student_tokenizer=student.tokenizer,
        base_dir=base_dir,
        add_bos=student.geometry.adds_bos,
        min_tokens=spec.data.min_tokens,
    )
    mine = {tid: g for tid, g in geometries.items() if only is None or tid in only}
    teachers = TeacherSide(spec, student, data, runtime, mine, use_cache=use_cache)
    curriculum = build_curriculum(
        spec,
        teachers.n_layers,
        student.geometry.head_dim,
        len(data.tasks),
        [t.id for t in spec.teachers],  # loaded or not (a CE-only run loads none)
    )
    batches = StudentBatches(
        data.train,
        student.tokenizer,
        runtime,
        batch_size=spec.training.batch_size,
        seq_len=spec.data.seq_len,
        add_bos=student.geometry.adds_bos,
        seed=spec.seed,
        append_eos=spec.data.append_eos,
    )
    return RunParts(student, data, teachers, curriculum, batches)


def build_teacher_cache(
    spec: RunSpec, runtime: Runtime, base_dir: Path, root: Path, progress: Progress
) -> TeacherCache:
    """Run the spec's teachers over every batch of its run and store their targets in `root`
    (kvd.step.teacher_cache); builds the teacher side only: no learned part, no optimizer."""
    parts = assemble(spec, runtime, base_dir, use_cache=False)
    writer = CacheWriter(root, parts.teachers.fingerprint())
    return parts.teachers.build_cache(writer, progress, parts.curriculum, parts.batches)
