"""The run spec: pydantic models for a whole run, read from YAML, with `--set` overrides.

Component references stay flat in YAML (`fusion: {name: mean, temperature: 0.5}`): the key that
names the component (`name`, or `source` for models) picks a registered class, and every other
key is validated against that class's own `Config`. All problems are gathered and raised at once
as a `SpecError` with dotted locations (`teachers.1.path`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from kvd.align.base import Aligner, distinct_layers
from kvd.core.component import ComponentConfig, config_class
from kvd.core.errors import KvdError, Problem, SpecError
from kvd.core.manager import component, registry
from kvd.core.names import checked_name
from kvd.fusion.base import Fusion
from kvd.losses.base import KV_INPUTS, Loss
from kvd.project.base import Projector
from kvd.spec.models import ModelSource

T = TypeVar("T")


class Strict(BaseModel):
    """A spec section with a fixed set of keys."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ComponentRef(BaseModel):
    """A registered component named by `name`; the other keys are its Config."""

    model_config = ConfigDict(extra="allow")
    kind: ClassVar[str] = ""
    key: ClassVar[str] = "name"

    _config: ComponentConfig | None = PrivateAttr(default=None)

    @property
    def component_name(self) -> str:
        return str(getattr(self, self.key))

    def options(self) -> dict[str, Any]:
        """The keys meant for the component's Config."""
        return dict(self.model_extra or {})

    @property
    def config(self) -> Any:
        """The validated Config (available after `resolve_spec`): an instance of the
        component's own Config class, the one its constructor takes."""
        if self._config is None:
            self._config = config_class(self.component).model_validate(self.options())
        return self._config

    @property
    def component(self) -> Any:
        """The registered class (subclasses of ComponentRef narrow it to their kind's base)."""
        return registry(self.kind).get(self.component_name)

    def component_of(self, base: type[T]) -> type[T]:
        """The registered class, checked to subclass `base`: a plugin that registered
        something else is named in the error."""
        return component(self.kind, self.component_name, base)


def _ref(default: str) -> Any:
    """A component field that defaults to the component named `default` with its defaults."""
    return Field(default_factory=lambda: {"name": default}, validate_default=True)


class NamedRef(ComponentRef):
    """A component named by its `name` key."""

    name: str
    """The registered component (`kvd plugins` lists them); other keys are its options."""


class AlignerRef(NamedRef):
    kind: ClassVar[str] = "aligners"

    @property
    def component(self) -> type[Aligner]:
        return self.component_of(Aligner)


class ProjectorRef(NamedRef):
    """The learned KV projector and the direction it maps."""

    kind: ClassVar[str] = "projectors"
    direction: Literal["teacher_to_student", "student_to_teacher"] = "teacher_to_student"
    """teacher_to_student: project teachers into the student's geometry and fuse there;
    student_to_teacher: project the student into each teacher's (fixed targets)."""

    @property
    def component(self) -> type[Projector]:
        return self.component_of(Projector)


class FusionRef(NamedRef):
    kind: ClassVar[str] = "fusions"

    @property
    def component(self) -> type[Fusion]:
        return self.component_of(Fusion)


class LossRef(NamedRef):
    """One loss term and its weight in the total."""

    kind: ClassVar[str] = "losses"
    weight: float = Field(1.0, ge=0)
    """The term's weight in the total loss."""
    teachers: list[str] | None = Field(
        None, description="Teacher ids this loss applies to (default: every teacher it fits)."
    )
    layers: list[NonNegativeInt] | None = Field(
        None,
        min_length=1,
        description="Student layers a K/V loss compares (default: every distilled layer, "
        "alignment.layers.student_layers); the term is the mean over them. Two K/V terms with "
        "their own teachers and layers give each layer one teacher.",
    )

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, value: list[int] | None) -> list[int] | None:
        return value if value is None else distinct_layers(value)

    @property
    def component(self) -> type[Loss]:
        return self.component_of(Loss)


class DataRef(NamedRef):
    """Where text comes from, and how it is split and packed."""

    kind: ClassVar[str] = "datasets"
    name: str = "stdlib"
    """A registered dataset (`kvd plugins`): `stdlib` (built-in English text) or `files`."""
    seq_len: int = Field(128, ge=2)
    """Window length in student tokens: documents are packed into windows of at most this."""
    min_tokens: int = Field(16, ge=1)
    """Windows shorter than this many student tokens are dropped."""
    val_fraction: float = Field(0.05, gt=0, lt=1)
    """Share of documents held out for validation, chosen by content hash (no seed)."""
    append_eos: bool = False
    """End each document's last training window with the student's EOS token, so the student
    learns where text stops (generation can end); only CE reads it (no teacher aligns to it).
    Windows then hold one text token less. Validation texts are scored without it."""

    def fingerprint(self) -> dict[str, Any]:
        """What teacher targets depend on: every option; append_eos only when on (off is how
        every teacher cache before it was built, so those caches stay valid)."""
        data = self.model_dump(mode="json")
        if not self.append_eos:
            del data["append_eos"]
        return data


class ModelRef(ComponentRef):
    """A model named by its `source` (a registered model source); other keys are its Config."""

    kind: ClassVar[str] = "models"
    key: ClassVar[str] = "source"
    source: str
    """A registered model source (`kvd plugins`): pypi, gguf, hf, preset or tiny; the other
    keys of this mapping are that source's options."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights' dtype in memory (bfloat16 halves a frozen teacher's memory and time)."""
    reinit: bool = Field(
        False,
        description="Replace the weights by a fresh random init of the same architecture, "
        "seeded by the spec's `seed` (the random-teacher control of `kvd ab`).",
    )
    _base_dir: Path = PrivateAttr(default=Path("."))

    @property
    def component(self) -> type[ModelSource]:
        return self.component_of(ModelSource)

    def build(self) -> ModelSource:
        """The model source, with relative paths taken from the spec file's folder."""
        return self.component(self.config, base_dir=self._base_dir)


class TeacherRef(ModelRef):
    """A teacher: its source, a short id used in logs, and its weight among teachers."""

    id: str = ""
    """Short name in logs, losses' `teachers` lists and stages (default t0, t1, ...)."""
    weight: float = Field(1.0, ge=0)
    """Weight among teachers: per-teacher losses are weighted by it (normalised over the
    teachers a loss uses); read by the fixed fusion."""

    @field_validator("id")
    @classmethod
    def _id_is_a_name(cls, value: str) -> str:
        return checked_name(value) if value else value


class StudentRef(ModelRef):
    """The student: a model dir to continue from, or a config to initialise."""


class AlignmentSpec(Strict):
    """Parameter-free alignment of each teacher to the student, one aligner per stage."""

    tokens: AlignerRef = _ref("soft")
    """Token/time aligner: which teacher positions teach each student position."""
    layers: AlignerRef = _ref("uniform")
    """Layer aligner: which teacher layer teaches each distilled student layer."""
    rope: AlignerRef = _ref("unrotate")
    """RoPE aligner: how keys rotated with different RoPE settings are compared."""
    vocab: AlignerRef = _ref("own")
    """Vocabulary aligner: the vocabulary a teacher's logits reach the logit losses in (`own`:
    the teacher's; `first_token`: the student's, at positions where both tokenisations end at
    the same character, so `logit_kd` works across tokenizers)."""

    STAGES: ClassVar[tuple[str, ...]] = ("tokens", "layers", "rope", "vocab")

    def fingerprint(self) -> dict[str, Any]:
        """The alignment as a cache fingerprint entry: `vocab` only where it is not the default
        `own` (caches built before the vocab stage existed stay valid)."""
        data = self.model_dump(mode="json")
        if data["vocab"] == {"name": "own"}:
            del data["vocab"]
        return dict(data)


class StageSpec(Strict):
    """A curriculum stage from `start_step` on; fields left out keep the previous stage's."""

    start_step: int = Field(ge=0)
    """The optimizer step from which this stage is in force."""
    teachers: list[str] | None = None
    """Ids of the teachers active in this stage."""
    fusion: FusionRef | None = None
    """The fusion of this stage."""
    losses: list[LossRef] | None = None
    """The loss terms of this stage."""


class TrainingSpec(Strict):
    """Optimisation and schedule."""

    max_steps: int = Field(100, ge=1)
    """Optimizer steps to train."""
    max_tokens: int | None = Field(None, ge=1)
    """Stop earlier once this many student tokens have been trained on (None: no cap)."""
    batch_size: int = Field(8, ge=1)
    """Windows per micro-batch on each process."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated into one optimizer step."""
    lr: float = Field(3e-3, gt=0, le=1)
    """Peak learning rate (AdamW) of the student (at most 1: AdamW moves each weight by about
    lr per step)."""
    projector_lr: float | None = Field(None, gt=0, le=1)
    """Learning rate of projectors, fusions and loss heads (None: lr; at most 1)."""
    weight_decay: float = Field(0.0, ge=0, le=1)
    """AdamW weight decay (0 to 1: it shrinks weights by lr * weight_decay per step)."""
    warmup_steps: int = Field(10, ge=0)
    """Steps of linear warm-up to the peak learning rate."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule after warm-up: cosine decay to 0 at max_steps, or constant."""
    clip_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this (None: no clipping)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """The student step's precision: fp32, or bf16 autocast."""
    activation_checkpointing: bool = False
    """Recompute the student's activations in backward (less memory, more time)."""
    compile: bool = False
    """torch.compile each student decoder layer (dynamic shapes; the first steps pay the
    compilation). Off by default: measure it first (benchmarks/compile.py)."""
    device: str = "auto"
    """auto (cuda:LOCAL_RANK when a GPU is there, else cpu), cpu, cuda or cuda:N."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: ddp (each process holds the whole student and heads, gradients are
    all-reduced) or fsdp (FSDP2: each decoder layer and the rest sharded over the processes, so
    weights, gradients and optimizer state take 1/world of the memory each; with precision: bf16
    the gathered weights are bf16 and gradients are reduced in fp32; checkpoints in
    torch.distributed.checkpoint format, each process writing its shards, and a resume on any
    number of processes with the same global batch). A run resumes with the parallelism it was
    written with."""
    cpu_offload: bool = False
    """With parallel: fsdp, keep the sharded weights, gradients and AdamW state in CPU memory
    (pinned), moved to the GPU a layer at a time: less GPU memory, more host-device traffic
    (GPU runs; on a CPU run it changes nothing)."""
    teacher_parallel: Literal["replicate", "fsdp"] = "replicate"
    """Under torchrun: replicate (every process holds every teacher whole) or fsdp (each
    teacher sharded over the processes in groups: each decoder layer, the input embeddings and
    the LM head when untied, and the rest (final norm; tied embeddings); its forward gathers
    each group around that group's own call, the rest for the whole forward: a process holds
    1/world of each teacher plus the rest and one group). The targets are the same either
    way."""
    log_every: int = Field(1, ge=1)
    """Write a metrics.jsonl record every this many steps."""
    checkpoint_every: int = Field(100, ge=1)
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = Field(2, ge=2)
    """Newest checkpoints kept (the best by validation is kept besides)."""
    max_nonfinite: int = Field(
        5, ge=1, description="Stop after this many non-finite losses or gradients in a row."
    )
    teacher_cache: str | None = Field(
        None,
        description="Folder of an offline teacher cache (`kvd cache-teachers`) to write or read; "
        "relative to the working directory, like output.dir.",
    )
    stages: list[StageSpec] = Field(default_factory=list)
    """A curriculum: stages by start_step, each changing teachers, fusion or losses."""

    @model_validator(mode="after")
    def _offload_needs_fsdp(self) -> TrainingSpec:
        if self.cpu_offload and self.parallel != "fsdp":
            raise ValueError("cpu_offload shards to the CPU: it needs parallel: fsdp")
        return self

    @field_validator("stages")
    @classmethod
    def _stages_ordered(cls, stages: list[StageSpec]) -> list[StageSpec]:
        starts = [s.start_step for s in stages]
        if starts != sorted(set(starts)):
            raise ValueError("stages must have strictly increasing start_step")
        return stages


class EvaluationSpec(Strict):
    """Periodic validation during training."""

    every: int = Field(50, ge=1)
    """Validate every this many steps (and at the end)."""
    batches: int = Field(8, ge=1)
    """Validation batches each time."""


class OutputSpec(Strict):
    """Where the run directory goes (relative paths are relative to the working directory)."""

    dir: str = "runs/{name}"
    """The run directory; {name} is the spec's name. Relative to the working directory."""
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = ["tensorboard"]
    """Where metrics go besides metrics.jsonl: TensorBoard (skipped, said once, when not
    installed), Weights & Biases (offline unless WANDB_MODE says otherwise), MLflow (a SQLite
    store in the run dir unless MLFLOW_TRACKING_URI is set). See docs/index.md, Trackers."""


class RunSpec(Strict):
    """A whole distillation run."""

    name: str = "run"
    """The run's name (a name, not a path): fills {name} in output.dir."""
    seed: int = 0
    """Seed of data order, projector init and random controls."""
    teachers: list[TeacherRef] = Field(min_length=1, max_length=8)
    """The teacher models, 1 to 8."""
    student: StudentRef
    """The student model."""
    data: DataRef = Field(default_factory=lambda: DataRef())
    """The training and validation text."""
    alignment: AlignmentSpec = Field(default_factory=AlignmentSpec)
    """Parameter-free alignment of each teacher to the student."""
    projector: ProjectorRef = _ref("head_dim_then_heads")
    """The learned K/V projector between each teacher's and the student's geometry."""
    fusion: FusionRef = _ref("mean")
    """How the teachers' K/V are weighted (and combined) at each position."""
    losses: list[LossRef] = Field(
        default_factory=lambda: [LossRef(name="kv_mse"), LossRef(name="ce")], min_length=1
    )
    """The loss terms with their weights."""
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    """Optimisation, schedule, checkpoints and curriculum."""
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    """Periodic validation."""
    output: OutputSpec = Field(default_factory=OutputSpec)
    """Where the run directory goes."""

    @model_validator(mode="after")
    def _teacher_ids(self) -> RunSpec:
        for i, teacher in enumerate(self.teachers):
            if not teacher.id:
                teacher.id = f"t{i}"
        ids = [t.id for t in self.teachers]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"teacher ids must be unique; repeated: {', '.join(dup)}")
        return self

    @field_validator("name")
    @classmethod
    def _name_is_a_name(cls, value: str) -> str:
        return checked_name(value)

    @model_validator(mode="after")
    def _output_dir_placeholders(self) -> RunSpec:
        try:
            self.output.dir.format(name=self.name)
        except (KeyError, IndexError, ValueError) as exc:
            problem = f"unknown placeholder {{{exc.args[0]}}}" if isinstance(exc, KeyError) else exc
            raise ValueError(
                f"output.dir {self.output.dir!r}: {problem}; the only placeholder is {{name}} "
                "(write {{ and }} for literal braces)"
            ) from None
        return self

    def output_dir(self) -> Path:
        return Path(self.output.dir.format(name=self.name))


# --- reading --------------------------------------------------------------------------------


MAX_YAML_BYTES = 1 << 20
"""The largest spec or experiment file kvd reads (a real one is a few kB)."""
MAX_YAML_ALIASES = 100
MAX_YAML_DEPTH = 32


class YamlTooLarge(yaml.YAMLError):
    """A document past the limits of BoundedLoader."""


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader with limits: at most MAX_YAML_ALIASES alias uses (an alias bomb expands
    exponentially in whatever walks the result) and nesting at most MAX_YAML_DEPTH deep."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise YamlTooLarge(f"more than {MAX_YAML_ALIASES} alias uses (*name)")
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise YamlTooLarge(f"nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def bounded_yaml(text: str) -> Any:
    """yaml.safe_load within BoundedLoader's limits (YamlTooLarge past them)."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from `path`, or a KvdError naming the file and the line."""
    if path.is_symlink() and not path.exists():
        raise KvdError(f"{path}: a symbolic link that leads nowhere (broken, or a loop)")
    if not path.exists():
        raise KvdError(f"{path}: no such file", hint="check the path of the spec")
    if path.is_dir():
        raise KvdError(f"{path}: is a directory, expected a YAML run spec")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise KvdError(
            f"{path}: {path.stat().st_size} bytes; a spec has at most {MAX_YAML_BYTES}",
            hint="is this the right file?",
        )
    try:
        data = bounded_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise KvdError(f"{path}: not a text file (expected a YAML run spec)") from None
    except YamlTooLarge as exc:
        raise KvdError(
            f"{path}: {exc}, more than a spec needs", hint="is this the right file?"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise KvdError(f"{path}{where}: YAML syntax error: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise KvdError(
            f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides (values parsed as YAML scalars; list items by index)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise KvdError(f"--set {item!r}: expected KEY=VALUE, e.g. training.max_steps=50")
        try:
            value = bounded_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise KvdError(f"--set {item!r}: the value is not YAML ({exc})") from None
        parts = key.strip().split(".")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, item, ".".join(parts[: depth + 1]), create=True)
        _assign(node, parts[-1], value, item)
    return data


def _child(node: Any, part: str, item: str, loc: str, *, create: bool) -> Any:
    if isinstance(node, list):
        index = _index(node, part, item, loc)
        return node[index]
    if not isinstance(node, dict):
        raise KvdError(f"--set {item!r}: {loc} is not a mapping")
    if part not in node or node[part] is None:
        node[part] = {}
    return node[part]


def _assign(node: Any, part: str, value: Any, item: str) -> None:
    if isinstance(node, list):
        node[_index(node, part, item, part)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise KvdError(f"--set {item!r}: cannot set {part!r} inside a {type(node).__name__}")


def _index(node: list[Any], part: str, item: str, loc: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise KvdError(f"--set {item!r}: {loc} must be a list index below {len(node)}")
    return int(part)


def load_spec(path: str | Path, overrides: list[str] | None = None) -> RunSpec:
    """Read, override, validate and resolve a spec file; raises SpecError with every problem."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides or [])
    return parse_spec(data, source=str(path), base_dir=path.parent)


def parse_spec(
    data: dict[str, Any], *, source: str = "<spec>", base_dir: Path = Path(".")
) -> RunSpec:
    """Validate a mapping and resolve every component; raises SpecError with every problem.
    Relative model paths are taken from `base_dir` (the spec file's folder)."""
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as exc:
        found = pydantic_problems(exc, model=RunSpec)
        seen = {(p.loc, p.message) for p in found}
        found += [p for p in raw_component_problems(data) if (p.loc, p.message) not in seen]
        raise SpecError(source, found) from None
    problems = resolve_components(spec)
    if problems:
        raise SpecError(source, problems)
    for model in [*spec.teachers, spec.student]:
        model._base_dir = base_dir
    return spec


def pydantic_problems(
    exc: ValidationError,
    prefix: str = "",
    model: type[BaseModel] | None = None,
    also: list[str] | None = None,
) -> list[Problem]:
    """pydantic errors as problems with dotted locations; an unknown key of `model` (the class
    validated) names the closest known key of its section (at the top, `also` count too: a
    component reference's own keys beside its Config's)."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        loc = f"{prefix}.{loc}" if prefix and loc else prefix or loc or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key (not part of the spec; check the spelling)"
            known = _keys_at(model, err["loc"][:-1]) if model is not None else []
            if len(err["loc"]) == 1:
                known += also or []
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1, cutoff=0.6)
            if close:
                message = f"unknown key; did you mean {close[0]!r}?"
        problems.append(Problem(loc, message))
    return problems


def _keys_at(model: type[BaseModel], parts: tuple[int | str, ...]) -> list[str]:
    """The keys of the section of `model` at `parts` (list indices skipped); [] when the
    section is not a fixed model (a component's options, a free-form mapping)."""
    current: Any = model
    for part in parts:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return []
        current = _model_in(fields[part].annotation)
    return list(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as `X`, `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def component_refs(spec: RunSpec) -> list[tuple[str, ComponentRef]]:
    """Every component reference in the spec with its dotted location."""
    refs: list[tuple[str, ComponentRef]] = []
    refs += [(f"teachers.{i}", t) for i, t in enumerate(spec.teachers)]
    refs.append(("student", spec.student))
    refs.append(("data", spec.data))
    refs += [
        (f"alignment.{stage}", getattr(spec.alignment, stage)) for stage in spec.alignment.STAGES
    ]
    refs.append(("projector", spec.projector))
    refs.append(("fusion", spec.fusion))
    refs += [(f"losses.{i}", loss) for i, loss in enumerate(spec.losses)]
    for s, stage in enumerate(spec.training.stages):
        if stage.fusion is not None:
            refs.append((f"training.stages.{s}.fusion", stage.fusion))
        refs += [(f"training.stages.{s}.losses.{i}", x) for i, x in enumerate(stage.losses or [])]
    return refs


def check_ref(loc: str, ref: ComponentRef) -> list[Problem]:
    """Look up one component and validate its options against its Config (kept on the ref)."""
    reg = registry(ref.kind)
    if ref.component_name not in reg:
        return [Problem(f"{loc}.{ref.key}", reg.unknown_message(ref.component_name))]
    cls = config_class(ref.component)
    try:
        ref._config = cls.model_validate(ref.options())
    except ValidationError as exc:
        return pydantic_problems(exc, prefix=loc, model=cls, also=list(type(ref).model_fields))
    return []


def raw_component_problems(data: dict[str, Any]) -> list[Problem]:
    """Component problems found in a mapping that failed validation elsewhere, so that one run
    reports everything: each component entry that parses on its own is resolved."""
    entries: list[tuple[str, type[ComponentRef], Any]] = []

    def listed(loc: str, cls: type[ComponentRef], items: Any) -> None:
        if isinstance(items, list):
            entries.extend((f"{loc}.{i}", cls, item) for i, item in enumerate(items))

    listed("teachers", TeacherRef, data.get("teachers"))
    entries.append(("student", StudentRef, data.get("student")))
    entries.append(("data", DataRef, data.get("data")))
    alignment = data.get("alignment")
    if isinstance(alignment, dict):
        entries += [(f"alignment.{k}", AlignerRef, alignment.get(k)) for k in AlignmentSpec.STAGES]
    entries.append(("projector", ProjectorRef, data.get("projector")))
    entries.append(("fusion", FusionRef, data.get("fusion")))
    listed("losses", LossRef, data.get("losses"))
    training = data.get("training")
    stages = training.get("stages") if isinstance(training, dict) else None
    for s, stage in enumerate(stages if isinstance(stages, list) else []):
        if isinstance(stage, dict):
            entries.append((f"training.stages.{s}.fusion", FusionRef, stage.get("fusion")))
            listed(f"training.stages.{s}.losses", LossRef, stage.get("losses"))
    problems: list[Problem] = []
    for loc, cls, raw in entries:
        if not isinstance(raw, dict):
            continue
        try:
            ref = cls.model_validate(raw)
        except ValidationError:
            continue  # already among the spec's own problems
        problems += check_ref(loc, ref)
    return problems


def resolve_components(spec: RunSpec) -> list[Problem]:
    """Look up every component and validate its options; return all problems found."""
    problems: list[Problem] = []
    for loc, ref in component_refs(spec):
        problems += check_ref(loc, ref)
    for stage in AlignmentSpec.STAGES:
        ref = getattr(spec.alignment, stage)
        if ref.component_name in registry("aligners"):
            actual = getattr(ref.component, "stage", None)
            if actual != stage:
                problems.append(
                    Problem(
                        f"alignment.{stage}.name",
                        f"aligner {ref.component_name!r} belongs in alignment.{actual}, not here",
                    )
                )
    for loc, fusion in [("fusion", spec.fusion)] + [
        (f"training.stages.{i}.fusion", st.fusion)
        for i, st in enumerate(spec.training.stages)
        if st.fusion is not None
    ]:
        if (
            spec.projector.direction == "student_to_teacher"
            and fusion.component_name in registry("fusions")
            and getattr(fusion.component, "routes_on_features", False)
        ):
            problems.append(
                Problem(
                    "projector.direction",
                    f"student_to_teacher compares in each teacher's own space, where {loc} "
                    f"{fusion.component_name!r} cannot route; use fusion fixed, mean, "
                    "task_conditional or lowest_ce, or direction teacher_to_student",
                )
            )
    ids = {t.id for t in spec.teachers}
    for loc, ref in component_refs(spec):
        for t in getattr(ref, "teachers", None) or []:
            if isinstance(ref, LossRef) and t not in ids:
                problems.append(Problem(f"{loc}.teachers", f"no teacher with id {t!r}"))
        if (
            isinstance(ref, LossRef)
            and ref.layers is not None
            and ref.component_name in registry("losses")
            and ref.component.inputs not in KV_INPUTS
        ):
            problems.append(
                Problem(
                    f"{loc}.layers",
                    f"{ref.name!r} does not compare K/V layer by layer; only K/V losses take "
                    "`layers` (remove it)",
                )
            )
    for s, curriculum in enumerate(spec.training.stages):
        for t in curriculum.teachers or []:
            if t not in ids:
                problems.append(
                    Problem(f"training.stages.{s}.teachers", f"no teacher with id {t!r}")
                )
    return problems


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the run spec."""
    return RunSpec.model_json_schema()
