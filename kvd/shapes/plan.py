"""The teacher -> student plan: what each teacher's KV must go through to meet the student's.

Pure computation over geometries and the spec's choices (no weights): KV layouts, the layer map
(from the spec's layer aligner), head and head_dim plans (from the spec's projector, built on the
two KV shapes to count its parameters), RoPE, tokenizer, KV bytes, and whether it can work at
all. `kvd check-shapes` prints it; training builds the same objects from the same choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, cast

from pydantic import ValidationError

from kvd.align.base import LayerAligner
from kvd.core.component import ComponentConfig, config_class
from kvd.core.errors import KvdError, Problem, SpecError
from kvd.core.manager import component
from kvd.project.base import Projector
from kvd.spec.geometry import ModelGeometry
from kvd.spec.models import ModelSource
from kvd.spec.runspec import ModelRef, RunSpec
from kvd.step.curriculum import kv_layers_by_teacher, student_vocab_teachers

BF16 = 2
"""Bytes per value in reports (KV kept in bf16)."""
MILLION = 1_000_000


@dataclass(frozen=True)
class Choices:
    """The spec's choices a plan depends on (names of registered components and their configs).

    A config left None is the component's default config. `seq_len` (tokens per sequence) is
    known for a spec, not for `--teacher/--student` comparisons.
    """

    layer_aligner: str
    projector: str
    token_aligner: str
    rope_aligner: str
    direction: str = "teacher_to_student"
    layer_config: ComponentConfig | None = None
    projector_config: ComponentConfig | None = None
    seq_len: int | None = None
    vocab_aligner: str = "own"
    student_vocab_readers: tuple[str, ...] = ()
    """Teachers whose logits a loss compares with the student's token by token."""
    kv_layers: dict[str, list[int] | None] | None = None
    """Per teacher a K/V loss reads, the student layers compared (None: every distilled
    layer; `kvd.step.curriculum.kv_layers_by_teacher`); None when not planned from a spec."""

    @classmethod
    def from_spec(cls, spec: Any) -> Choices:
        """The choices of a resolved `kvd.spec.runspec.RunSpec`."""
        return cls(
            layer_aligner=spec.alignment.layers.name,
            projector=spec.projector.name,
            token_aligner=spec.alignment.tokens.name,
            rope_aligner=spec.alignment.rope.name,
            direction=spec.projector.direction,
            layer_config=spec.alignment.layers.config,
            projector_config=spec.projector.config,
            seq_len=spec.data.seq_len,
            vocab_aligner=spec.alignment.vocab.name,
            student_vocab_readers=tuple(student_vocab_teachers(spec)),
            kv_layers=kv_layers_by_teacher(spec),
        )

    @classmethod
    def defaults(cls, *, projector: str | None = None, layer_map: str | None = None) -> Choices:
        """The run spec's defaults, with an optional projector and layer aligner by name."""
        from kvd.spec.runspec import AlignmentSpec, ProjectorRef, RunSpec

        alignment = AlignmentSpec()
        default_projector = ProjectorRef.model_validate(
            RunSpec.model_fields["projector"].get_default(call_default_factory=True)
        )
        return cls(
            layer_aligner=layer_map or alignment.layers.name,
            projector=projector or default_projector.name,
            token_aligner=alignment.tokens.name,
            rope_aligner=alignment.rope.name,
        )


@dataclass(frozen=True)
class ModelEntry:
    """One model of the plan: role `teacher`/`student`, id (`t0`, `student`), source label."""

    role: str
    id: str
    source: str
    geometry: ModelGeometry


@dataclass
class PairPlan:
    """What one teacher's KV goes through to meet the student's.

    layer_map[j]: (teacher layer, weight) pairs student layer j reads (empty = not distilled);
    None when the layer aligner needs a calibration batch. projector_params counts K and V
    projectors of every distilled layer; cache_bytes_per_token: aligned teacher K and V of the
    mapped layers per student token in bf16 (what an offline teacher cache stores).
    """

    teacher: str
    layout: str
    layer_map: list[list[tuple[int, float]]] | None
    layer_map_text: str
    distilled_layers: int
    heads: str
    head_dim: str
    projector: str
    projector_params: int
    rope: str
    tokens: str
    cache_bytes_per_token: int
    kv_compared: str = ""
    """Where its K/V meets a loss (empty when not planned from a spec)."""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """The whole plan: every model, one PairPlan per teacher, and model-level problems."""

    choices: Choices
    models: list[ModelEntry]
    pairs: list[PairPlan]
    model_problems: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Every reason the plan cannot work; empty when it is sound."""
        return self.model_problems + [
            f"{p.teacher}: {msg}" for p in self.pairs for msg in p.problems
        ]

    @property
    def sound(self) -> bool:
        return not self.problems

    @property
    def projector_params(self) -> int:
        return sum(p.projector_params for p in self.pairs)

    @property
    def cache_bytes_per_million(self) -> int:
        """Disk for an offline cache of every teacher's aligned KV per 1M student tokens (bf16)."""
        return sum(p.cache_bytes_per_token for p in self.pairs) * MILLION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready facts (what `kvd check-shapes --json` prints)."""
        return {
            "sound": self.sound,
            "problems": self.problems,
            "choices": {
                f.name: _jsonable(getattr(self.choices, f.name))
                for f in dataclasses.fields(self.choices)
            },
            "models": [_model_dict(m) for m in self.models],
            "pairs": [dataclasses.asdict(p) for p in self.pairs],
            "totals": {
                "projector_params": self.projector_params,
                "cache_bytes_per_million_tokens": self.cache_bytes_per_million,
            },
        }


def _jsonable(value: Any) -> Any:
    return value.model_dump() if isinstance(value, ComponentConfig) else value


def _model_dict(entry: ModelEntry) -> dict[str, Any]:
    g = entry.geometry
    return {
        "role": entry.role,
        "id": entry.id,
        "source": entry.source,
        "kv_layout": g.kv_layout,
        "gqa_ratio": g.gqa_ratio,
        "kv_bytes_per_token": g.kv_bytes_per_token(BF16),
        **g.facts(),
    }


# --- planning -----------------------------------------------------------------------------------


def build_plan(teachers: list[ModelEntry], student: ModelEntry, choices: Choices) -> Plan:
    """The plan of every teacher against the student under `choices`.

    Unknown component names raise KvdError (bad input, exit 2); what cannot work is recorded as
    problems (an unsound plan, exit 1).
    """
    aligner_cls = component("aligners", choices.layer_aligner, LayerAligner)
    projector_cls = component("projectors", choices.projector, Projector)
    layer_config = choices.layer_config or _default_config(aligner_cls, choices.layer_aligner)
    projector_config = choices.projector_config or _default_config(projector_cls, choices.projector)
    choices = dataclasses.replace(
        choices, layer_config=layer_config, projector_config=projector_config
    )
    models = [*teachers, student]
    plan = Plan(choices, models, [], _model_problems(models, choices.seq_len))
    for teacher in teachers:
        plan.pairs.append(_pair(teacher, student, choices, aligner_cls, projector_cls))
    return plan


def _default_config(cls: Any, name: str) -> ComponentConfig:
    """`cls`'s Config with every option at its default; required options are a KvdError."""
    try:
        return config_class(cls).model_validate({})
    except ValidationError as exc:
        needed = ", ".join(str(e["loc"][0]) for e in exc.errors() if e["loc"])
        raise KvdError(
            f"component {name!r} needs options ({needed})",
            hint="give them in a run spec and run `kvd check-shapes SPEC`",
        ) from None


def _model_problems(models: list[ModelEntry], seq_len: int | None) -> list[str]:
    problems = []
    for m in models:
        g = m.geometry
        for layer_type, rope in sorted(g.rope.items()):
            dim = rope.rotary_dim(g.head_dim)
            if dim != int(dim) or int(dim) % 2:
                problems.append(
                    f"{m.id}: partial_rotary_factor {rope.partial_rotary_factor:g} of head_dim "
                    f"{g.head_dim} rotates {dim:g} channels on {layer_type} layers; RoPE "
                    "rotates channel pairs, so this must be an even integer"
                )
        if seq_len is not None and g.max_position is not None and seq_len > g.max_position:
            problems.append(
                f"{m.id}: data.seq_len {seq_len} exceeds max_position_embeddings "
                f"{g.max_position} of {g.name}"
            )
    return problems


def _pair(
    teacher: ModelEntry,
    student: ModelEntry,
    choices: Choices,
    aligner_cls: type[LayerAligner],
    projector_cls: type[Projector],
) -> PairPlan:
    t, s = teacher.geometry, student.geometry
    problems: list[str] = []
    notes: list[str] = []
    layer_map, distilled, layer_text = _layer_map(t, s, choices, aligner_cls, problems)
    projector_text, per_module = _projector(t, s, choices, projector_cls, problems)
    rope = _rope_text(t, s, choices.rope_aligner)
    same_tokens = same_tokenizer(t, s)
    if choices.rope_aligner == "none" and layer_map is not None:
        problems += _keep_rotated_problems(t, s, layer_map, same_tokens)
    if (
        teacher.id in choices.student_vocab_readers
        and choices.vocab_aligner == "own"
        and t.vocab_size != s.vocab_size
    ):
        problems.append(
            f"a logit loss compares its {t.vocab_size}-token vocabulary with the student's "
            f"{s.vocab_size} token by token: set alignment.vocab: {{name: first_token}} to map "
            "its logits onto the student's vocabulary, or use the loss 'uld'"
        )
    kv_compared = _kv_compared(teacher.id, layer_map, choices.kv_layers, problems)
    window = t.sliding_window
    if choices.seq_len is not None and window and choices.seq_len >= window:
        notes.append(
            f"sequences of {choices.seq_len} tokens reach the teacher's sliding window {window}: "
            f"its sliding layers cache only the last {window - 1} tokens"
        )
    return PairPlan(
        teacher=teacher.id,
        layout=f"{_layout(t)} -> {_layout(s)}",
        layer_map=layer_map,
        layer_map_text=layer_text,
        distilled_layers=distilled,
        heads=_heads_text(t, s, choices.direction),
        head_dim=_head_dim_text(t, s, choices.direction),
        projector=projector_text,
        projector_params=2 * per_module * distilled,
        rope=rope,
        tokens=_tokens_text(t, s, choices.token_aligner, same_tokens),
        cache_bytes_per_token=distilled * 2 * t.num_kv_heads * t.head_dim * BF16,
        kv_compared=kv_compared,
        problems=problems,
        notes=notes + _token_notes(t, s, same_tokens),
    )


def _layer_map(
    t: ModelGeometry,
    s: ModelGeometry,
    choices: Choices,
    aligner_cls: type[LayerAligner],
    problems: list[str],
) -> tuple[list[list[tuple[int, float]]] | None, int, str]:
    """(map, distilled student layers, text); no map for an aligner that needs calibration."""
    if getattr(aligner_cls, "needs_calibration", False):
        n = _selected_layers(choices.layer_config, s.num_layers)
        return None, n, f"computed on a calibration batch at train start ({n} student layers)"
    assert choices.layer_config is not None  # build_plan filled in the default
    try:
        layer_plan = aligner_cls(choices.layer_config).plan(t.num_layers, s.num_layers)
    except KvdError as exc:
        problems.append(f"layer map {choices.layer_aligner!r}: {exc.message}")
        return None, 0, "(none)"
    layer_map = [[(int(i), float(w)) for i, w in pairs] for pairs in layer_plan.sources]
    bad = sorted({i for pairs in layer_map for i, _ in pairs if not 0 <= i < t.num_layers})
    if len(layer_map) != s.num_layers or bad:
        problems.append(
            f"layer map {choices.layer_aligner!r} gave {len(layer_map)} student layers "
            f"(expected {s.num_layers}) and teacher layers out of range: {bad}"
        )
    distilled = sum(1 for pairs in layer_map if pairs)
    if not distilled:
        problems.append(f"layer map {choices.layer_aligner!r} distils no student layer")
    return layer_map, distilled, layer_plan.describe()


def _kv_compared(
    teacher: str,
    layer_map: list[list[tuple[int, float]]] | None,
    kv_layers: dict[str, list[int] | None] | None,
    problems: list[str],
) -> str:
    """Which student layers the K/V losses compare with this teacher's K/V; listed layers the
    layer map does not distil from it are problems (as at train start)."""
    if kv_layers is None:
        return ""
    if teacher not in kv_layers:
        return "none: no K/V loss reads this teacher"
    listed = kv_layers[teacher]
    if listed is None:
        return "every distilled layer"
    text = ", ".join(f"s{j}" for j in listed) + " (the K/V losses' `layers`)"
    if layer_map is not None:
        taught = {j for j, pairs in enumerate(layer_map) if pairs}
        outside = [j for j in listed if j not in taught]
        if outside:
            problems.append(
                f"a K/V loss compares student layers {outside} with this teacher's K/V, but the "
                "layer map distils none of them from it: change the loss's `layers` or "
                "alignment.layers"
            )
    return text


def _selected_layers(config: ComponentConfig | None, n_student: int) -> int:
    """Student layers a calibration-based aligner will distil (its `student_layers`, else all)."""
    selection = getattr(config, "student_layers", None)
    if selection is None:
        return n_student
    from kvd.align.layers import select_student_layers

    return len(select_student_layers(selection, n_student))


def _projector(
    t: ModelGeometry,
    s: ModelGeometry,
    choices: Choices,
    projector_cls: type[Projector],
    problems: list[str],
) -> tuple[str, int]:
    """(describe(), parameters of one K or V projector); PlanError -> a problem."""
    source, target = t.kv_shape, s.kv_shape
    if choices.direction == "student_to_teacher":
        source, target = target, source
    try:
        config = cast(Projector.Config, choices.projector_config)  # validated by build_plan
        module = projector_cls(config, source=source, target=target)
    except KvdError as exc:
        problems.append(exc.message)
        return "(cannot be built)", 0
    return module.describe(), sum(p.numel() for p in module.parameters())


def _layout(g: ModelGeometry) -> str:
    """`GQA 7:1 (28q/4kv)`."""
    return f"{g.kv_layout} {g.gqa_ratio}:1 ({g.num_heads}q/{g.num_kv_heads}kv)"


def _heads_text(t: ModelGeometry, s: ModelGeometry, direction: str) -> str:
    a, b = t.num_kv_heads, s.num_kv_heads
    if direction == "student_to_teacher":
        a, b = b, a
    if a == b:
        how = "same count"
    elif a % b == 0:
        how = f"merge groups of {a // b}"
    elif b % a == 0:
        how = f"replicate each {b // a}x"
    else:
        how = "learned mixing"
    return f"{a} -> {b} KV heads ({how})"


def _head_dim_text(t: ModelGeometry, s: ModelGeometry, direction: str) -> str:
    a, b = t.head_dim, s.head_dim
    if direction == "student_to_teacher":
        a, b = b, a
    return f"{a} -> {b}" + (" (same)" if a == b else "")


def _rope_by_type(g: ModelGeometry) -> str:
    if not g.rope:
        return "no rotary embedding"
    if len(g.rope) == 1:
        return next(iter(g.rope.values())).label()
    return ", ".join(
        f"{t.removesuffix('_attention')} {r.label()}" for t, r in sorted(g.rope.items())
    )


def _rope_text(t: ModelGeometry, s: ModelGeometry, rope_aligner: str) -> str:
    sides = f"teacher {_rope_by_type(t)} | student {_rope_by_type(s)}"
    if rope_aligner == "none":
        return f"{sides}: keys compared as cached (post-RoPE)"
    return (
        f"{sides}: '{rope_aligner}' (each side un-rotated with its own rotary, compared pre-RoPE)"
    )


def _keep_rotated_problems(
    t: ModelGeometry, s: ModelGeometry, layer_map: list[list[tuple[int, float]]], same_tokens: bool
) -> list[str]:
    """Post-RoPE keys are comparable only when both sides rotate alike at the same positions."""
    problems = []
    if not same_tokens:
        problems.append(
            "rope aligner 'none' compares post-RoPE keys, but different tokenizers put the same "
            "text at different positions; use 'unrotate'"
        )
    if t.head_dim != s.head_dim:
        problems.append(
            f"rope aligner 'none' with head_dim {t.head_dim} -> {s.head_dim}: a projection of "
            "rotated keys mixes rotation frequencies; use 'unrotate'"
        )
    for j, pairs in enumerate(layer_map):
        for i, _ in pairs:
            rt = t.rope.get(t.layer_types[i])
            rs = s.rope.get(s.layer_types[j])
            if rt != rs:
                problems.append(
                    f"rope aligner 'none': teacher layer {i} ({rt.label() if rt else 'no rope'}) "
                    f"and student layer {j} ({rs.label() if rs else 'no rope'}) rotate "
                    "differently; use 'unrotate'"
                )
                return problems
    return problems


def same_tokenizer(a: ModelGeometry, b: ModelGeometry) -> bool:
    """Identical token ids: equal vocabulary hashes, or (no hash on either side) equal families."""
    if a.tokenizer_hash or b.tokenizer_hash:
        return a.tokenizer_hash == b.tokenizer_hash
    return a.tokenizer_family == b.tokenizer_family and a.tokenizer_family != "unknown"


def _tokens_text(t: ModelGeometry, s: ModelGeometry, aligner: str, same: bool) -> str:
    if same:
        return f"same tokenizer ({t.tokenizer_family}): identity alignment possible"
    return (
        f"{t.tokenizer_family} ({t.vocab_size}) -> {s.tokenizer_family} ({s.vocab_size}): "
        f"character-offset alignment with '{aligner}'"
    )


def _token_notes(t: ModelGeometry, s: ModelGeometry, same: bool) -> list[str]:
    notes = []
    if t.adds_bos != s.adds_bos:
        who = "teacher" if t.adds_bos else "student"
        notes.append(f"BOS asymmetry: only the {who} adds BOS (it covers no text, so no target)")
    if same and t.vocab_size != s.vocab_size:
        notes.append(f"embedding rows differ ({t.vocab_size} vs {s.vocab_size}) on one tokenizer")
    return notes


Sourced = tuple[str, str, ModelSource, ModelGeometry]
"""(role, id, source, geometry) of one model."""


def spec_sources(spec: RunSpec, where: str) -> list[Sourced]:
    """Each teacher's and the student's source and geometry (no weights); every model that
    cannot be read is a problem at its spec location, together in one SpecError of `where`."""
    refs: list[tuple[str, str, str, ModelRef]] = [
        ("teacher", t.id, f"teachers.{i}", t) for i, t in enumerate(spec.teachers)
    ]
    refs.append(("student", "student", "student", spec.student))
    sources: list[Sourced] = []
    problems = []
    for role, name, loc, ref in refs:
        try:
            source = ref.build()
            sources.append((role, name, source, source.geometry()))
        except KvdError as exc:
            problems.append(Problem(loc, exc.message + (f" ({exc.hint})" if exc.hint else "")))
    if problems:
        raise SpecError(where, problems)
    return sources


def spec_plan(sources: list[Sourced], choices: Choices) -> Plan:
    """The plan of the models `sources` (teachers first, the student last) under `choices`."""
    entries = [ModelEntry(role, name, src.describe(), geom) for role, name, src, geom in sources]
    return build_plan(entries[:-1], entries[-1], choices)
