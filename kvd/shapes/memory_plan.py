"""The memory plan: bytes per rank of a run, estimated from its spec before any GPU time.

`kvd check-shapes SPEC --gpus 8 --gpu-memory 80GB` prints it. Parameters are counted exactly
(each model's transformers config instantiated on the meta device: no weights); activations
and targets follow from the spec's micro-batch (training.batch_size x data.seq_len):

- teachers: weights in their spec dtype; one teacher runs at a time, holding the K/V of its
  distilled layers and, when a loss reads them, its logits (model dtype, then fp32
  log-probabilities); nothing when training.teacher_cache is set (`kvd cache-teachers` held
  them while it built the cache);
- teacher targets: each teacher's aligned K/V of the distilled layers and, for logit losses,
  its logits over the vocabulary the loss compares (fp32);
- student and projectors: fp32 weights, gradients and AdamW's two moments (16 bytes a
  parameter); DDP adds its gradient buckets (4 bytes a parameter) when ranks > 1; FSDP shards
  all of it over the ranks and gathers the group of embeddings, norm and head (for the whole
  step) and one decoder layer at a time, weights and gradients;
- teachers whole on every rank, or with training.teacher_parallel: fsdp (the third plan) 1/ranks
  of each teacher, plus, while one runs, its gathered root group (final norm; embeddings and
  head when tied), the larger of its untied embeddings and head (each a group gathered for its
  own call only, kvd.modeling.sharding) and two decoder layers (the one running and the next,
  prefetched), twice (FSDP's all-gather buffer and the parameters copied out of it);
- student activations kept for backward, per decoder layer and token: 4 hidden_size (norm
  inputs and outputs) + 3 q + 4 kv (projections before and after RoPE) + 4 intermediate_size
  (gate, up, activation, product) values, in bf16 under bf16 autocast else fp32, assuming fused
  attention (SDPA's flash or memory-efficient kernels; eager attention adds heads x seq_len
  values a token); plus the fp32 logits and the one gradient buffer that CE and logit KD share
  (kvd.losses.rowwise forms it in chunks, with no other [tokens, vocab] tensor).

The teachers' forward and the student's step (activations, gradients, DDP buckets, FSDP's
gathered layer) do not live at the same time: the total counts the larger of the two phases
beside what lives throughout (weights, optimizer state, the step's teacher targets).

On GPUs a runtime line adds the CUDA context and allocator slack (1 GiB + 10%). The estimate's
error against measured peaks is in benchmarks/RESULTS.md ("Memory plan").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from kvd.core.errors import KvdError
from kvd.modeling.sharding import untied_embeddings
from kvd.shapes.plan import BF16, Plan
from kvd.spec.geometry import ModelGeometry
from kvd.spec.runspec import RunSpec
from kvd.step.curriculum import logit_teachers, student_vocab_teachers

PARALLELS = (("ddp", "replicate"), ("fsdp", "replicate"), ("fsdp", "fsdp"))
"""The plans compared: (training.parallel, training.teacher_parallel)."""
FP32 = 4
ADAMW_STATE = 2 * FP32
RUNTIME = "CUDA runtime"
CUDA_CONTEXT = 1 << 30
ALLOCATOR_SLACK = 0.10
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


@dataclass(frozen=True)
class ModelSize:
    """Parameters of a model (tied weights once), of its largest decoder layer, and of its input
    embeddings and LM head when untied (() when tied)."""

    params: int
    layer_params: int
    untied_params: tuple[int, ...] = ()


@dataclass(frozen=True)
class MemoryItem:
    """One line of a memory plan: bytes per rank and how they were counted. phase: "teacher"
    or "student" for what lives only while the teachers run or while the student steps (the
    plan's total counts the larger phase), None for what lives throughout."""

    name: str
    bytes: int
    note: str
    phase: str | None = None


@dataclass
class MemoryPlan:
    """Bytes per rank of one plan on `ranks` ranks: training.parallel (`ddp` or `fsdp`) and
    training.teacher_parallel (`replicate` or `fsdp`)."""

    parallel: str
    ranks: int
    items: list[MemoryItem]
    budget: int | None = None
    teacher_parallel: str = "replicate"

    @property
    def label(self) -> str:
        """The spec settings of this plan, as `--set` would take them."""
        return f"parallel={self.parallel}, teacher_parallel={self.teacher_parallel}"

    @property
    def total(self) -> int:
        """Bytes that live throughout, plus the larger of the teacher and the student phase."""
        phases: dict[str | None, int] = {}
        for item in self.items:
            phases[item.phase] = phases.get(item.phase, 0) + item.bytes
        always = phases.pop(None, 0)
        return always + max(phases.values(), default=0)

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "parallel": self.parallel,
            "teacher_parallel": self.teacher_parallel,
            "ranks": self.ranks,
            "items": {i.name: i.bytes for i in self.items},
            "total_bytes": self.total,
            "budget_bytes": self.budget,
            "fits": self.fits,
        }


def parse_size(text: str, *, where: str = "--gpu-memory") -> int:
    """Bytes of `80GB` (10^9), `80GiB` (2^30), `81920MiB`, `512MB` or a plain byte count."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise KvdError(
            f"{where}: cannot read {text!r} as a size", hint="write e.g. 80GB, 80GiB or 81920MiB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def model_size(geometry: ModelGeometry) -> ModelSize:
    """Exact parameter counts from the model's transformers config, on the meta device."""
    from transformers import AutoModelForCausalLM

    if geometry.hf_config is None:
        raise KvdError(f"{geometry.name}: no transformers config to count its parameters")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(geometry.hf_config)
    params = sum(p.numel() for p in model.parameters())
    layers = getattr(model.get_decoder(), "layers", None)
    if layers:
        layer = max(sum(p.numel() for p in m.parameters()) for m in layers)
    else:
        layer = math.ceil(params / geometry.num_layers)
    untied = tuple(sum(p.numel() for p in m.parameters()) for m in untied_embeddings(model))
    return ModelSize(params, layer, untied)


def memory_plans(
    spec: RunSpec, plan: Plan, *, ranks: int, budget: int | None, cuda_runtime: bool = True
) -> list[MemoryPlan]:
    """The memory plans (PARALLELS) of `spec` (whose check-shapes plan is `plan`) per rank.
    cuda_runtime: add the CUDA context and allocator slack line (False: tensors only)."""
    if ranks < 1:
        raise KvdError(f"--gpus must be at least 1, got {ranks}")
    teachers = {m.id: m.geometry for m in plan.models if m.role == "teacher"}
    student = next(m.geometry for m in plan.models if m.role == "student")
    sizes = {name: model_size(g) for name, g in teachers.items()}
    s_size = model_size(student)
    tokens = spec.training.batch_size * spec.data.seq_len
    shared = [
        _targets_item(spec, plan, teachers, student, tokens),
        _activations_item(spec, student, tokens),
    ]
    learned = s_size.params + plan.projector_params
    plans = []
    for parallel, teacher_parallel in PARALLELS:
        ranks_teachers = ranks if teacher_parallel == "fsdp" else 1
        items = [
            *_teacher_items(spec, plan, sizes, tokens, ranks_teachers),
            *shared,
            *_learned_items(parallel, learned, _gathered(s_size, student), ranks),
        ]
        if cuda_runtime:
            slack = CUDA_CONTEXT + int(ALLOCATOR_SLACK * MemoryPlan(parallel, ranks, items).total)
            items.append(MemoryItem(RUNTIME, slack, "context 1 GiB + 10% allocator slack"))
        plans.append(MemoryPlan(parallel, ranks, items, budget, teacher_parallel))
    return plans


def _teacher_items(
    spec: RunSpec,
    plan: Plan,
    sizes: dict[str, ModelSize],
    tokens: int,
    shards: int,
) -> list[MemoryItem]:
    """Teachers' weights (whole, or 1/`shards` each when sharded) and the largest teacher
    forward: its distilled layers' K/V (`use_cache=False` keeps no others), its logits when a
    loss reads them, a layer's hidden and MLP transients, and when sharded the gathered
    weights (see the module's docstring)."""
    if spec.training.teacher_cache is not None:
        note = "read from training.teacher_cache (its build holds the teachers)"
        return [MemoryItem("teachers", 0, note), MemoryItem("teacher forward", 0, note)]
    dtype = {t.id: _DTYPE_BYTES[t.dtype] for t in spec.teachers}
    geometry = {m.id: m.geometry for m in plan.models if m.role == "teacher"}
    weights = sum(math.ceil(sizes[t].params / shards) * dtype[t] for t in sizes)
    note = "whole on every rank, spec dtype" if shards == 1 else f"1/{shards} each, spec dtype"
    reads_logits = set(logit_teachers(spec))
    forward = 0
    for pair in plan.pairs:
        g, b = geometry[pair.teacher], dtype[pair.teacher]
        per_token = pair.cache_bytes_per_token // BF16 * b
        per_token += 2 * (g.hidden_size + _intermediate(g)) * b
        if pair.teacher in reads_logits:
            per_token += g.vocab_size * (b + FP32)
        size = sizes[pair.teacher]
        root = size.params - g.num_layers * size.layer_params - sum(size.untied_params)
        at_once = root + max(size.untied_params, default=0) + 2 * size.layer_params
        gathered = 0 if shards == 1 else 2 * at_once * b
        forward = max(forward, tokens * per_token + gathered)
    return [
        MemoryItem("teachers", weights, note),
        MemoryItem(
            "teacher forward", forward, "largest: distilled K/V (+ logits if read)", "teacher"
        ),
    ]


def _intermediate(g: ModelGeometry) -> int:
    return int(getattr(g.hf_config.get_text_config(decoder=True), "intermediate_size", 0) or 0)


def _targets_item(
    spec: RunSpec,
    plan: Plan,
    teachers: dict[str, ModelGeometry],
    student: ModelGeometry,
    tokens: int,
) -> MemoryItem:
    kv = sum(p.cache_bytes_per_token // BF16 * FP32 for p in plan.pairs)
    own_vocab = set(student_vocab_teachers(spec))
    logits = sum(
        (student.vocab_size if t in own_vocab else teachers[t].vocab_size) * FP32
        for t in logit_teachers(spec)
    )
    return MemoryItem("teacher targets", tokens * (kv + logits), "aligned K/V + logits, fp32")


def _activations_item(spec: RunSpec, g: ModelGeometry, tokens: int) -> MemoryItem:
    act = 2 if spec.training.precision == "bf16" else FP32
    q, kv = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
    per_layer = 4 * g.hidden_size + 3 * q + 4 * kv + 4 * _intermediate(g)
    total = tokens * (g.num_layers * per_layer * act + 2 * g.vocab_size * FP32)
    return MemoryItem("student activations", total, "one micro-batch, fused attention", "student")


def _gathered(size: ModelSize, g: ModelGeometry) -> int:
    """Parameters of a sharded student gathered at once: the group of its embeddings, final norm
    and head (gathered through the whole forward and backward) and one decoder layer."""
    return size.params - (g.num_layers - 1) * size.layer_params


def _learned_items(parallel: str, params: int, gathered: int, ranks: int) -> list[MemoryItem]:
    if parallel == "ddp":
        items = [
            MemoryItem("student + projectors", params * FP32, "fp32 weights, whole"),
            MemoryItem("gradients", params * FP32, "fp32", "student"),
            MemoryItem("optimizer state", params * ADAMW_STATE, "AdamW, two fp32 moments"),
        ]
        if ranks > 1:
            items.append(
                MemoryItem("DDP buckets", params * FP32, "a flat copy of the gradients", "student")
            )
        return items
    shard = math.ceil(params / ranks)
    return [
        MemoryItem("student + projectors", shard * FP32, f"fp32 weights, 1/{ranks}"),
        MemoryItem("gradients", shard * FP32, f"fp32, 1/{ranks}", "student"),
        MemoryItem("optimizer state", shard * ADAMW_STATE, f"AdamW, 1/{ranks}"),
        MemoryItem(
            "FSDP gather",
            2 * gathered * FP32,
            "embeddings, norm, head and one layer: weights and gradients",
            "student",
        ),
    ]
