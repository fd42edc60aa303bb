"""The component contract: what kvd assumes of every registered component, checked on tiny inputs.

    from kvd.testing import check_component

    check_component("fusions", "my_router", temperature=0.5)

`check_component(kind, name, **options)` looks `name` up among the installed plugins, builds its
`Config` from `options` (the defaults when none are given) and runs the checks of its kind. A
broken rule raises `ContractError`, an `AssertionError` naming the component and the rule, so a
test fails with that message. Every kind:

- subclasses its kind's base class and has a docstring (the `kvd plugins` summary);
- has a `Config` (a `kvd.component.ComponentConfig`) that builds from `options` and rejects
  unknown keys.

Then, per kind (N teachers, B batch, H KV heads, T positions, D head_dim):

- models: `geometry()` and `describe()` build no transformers model and give a consistent,
  repeatable geometry; with `load_weights=True`, `load()` gives an eval-mode model whose KV cache
  has the shapes the geometry predicts, the same geometry, and a fast tokenizer (so does
  `tokenizer()`).
- aligners (by `stage`): tokens: a `TokenAlignment` of the right shapes and types, teacher
  indices in range, weights summing to 1 where the mask holds and 0 elsewhere, student padding
  masked, the same result twice, for two different tokenizations and for identical ones;
  layers: a `LayerPlan` with one entry per student layer, teacher layers in range and at least
  one layer distilled (a calibration batch is passed when `needs_calibration`); rope: a
  `KVBundle` of the same layers and shapes with values untouched, from a tiny model's real cache;
  vocab: None or a `VocabMap` of the teacher's size with student ids in range, whose mapped
  log-probabilities of random logits are finite and sum to 1 in probability.
- projectors: for each of a few shape pairs the projector accepts (the others must raise
  `PlanError`, and at least one must be accepted), [B, Hs, T, Ds] -> [B, Ht, T, Dt] for two
  (B, T), finite; gradients reach the parameters and the source tensor (the student, under
  `projector.direction: student_to_teacher`); a teacher tensor is neither changed nor given a
  gradient; a fresh instance loading the state dict computes the same.
- fusions: built with 3 teachers, 2 layers, kv_dim 8, 2 tasks; on a `FusionInput` with masked
  teachers and a padded position, weights [B, T, N] that are finite, non-negative, 0 on invalid
  teachers, sum to 1 where any teacher is valid (all 0 elsewhere), and a finite scalar aux loss,
  at every layer; gradients reach the router parameters (when it has any) and never the teacher
  tensor; without task labels the fusion either raises `PlanError` at construction or works;
  a fresh instance loading the state dict computes the same.
- losses (by `inputs`): a finite scalar; gradients reach the student tensors and never the
  teacher's; values at masked positions do not change it; 0 on identical student and teacher
  ("kv", "kv_raw", "logits"; not "ce", which has no teacher).
- datasets: `documents()` yields `Document`s with non-empty text, in the same order twice.
- commands: a function Typer turns into a command (no options).

`plugins` picks the loaded plugins to look the name up in (default: the process-wide ones),
`base_dir` is the folder relative paths in the Config are taken from (models and datasets;
default: the working directory), and `load_weights` makes a model source load its weights.
These three names are the check's own; every other keyword is a `Config` option.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn, get_args
from unittest import mock

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from kvd.align.base import Aligner, LayerAligner, LayerCalibration, LayerPlan, TokenAligner
from kvd.align.rope import RopeAligner
from kvd.align.vocab import VocabAligner, VocabMap
from kvd.core.component import ComponentConfig, config_class
from kvd.core.errors import PlanError
from kvd.core.hookspecs import KINDS
from kvd.core.manager import Plugins, get_plugins
from kvd.core.types import KVBundle, KVShape, TokenAlignment, TokenBatch
from kvd.data.base import Document, TextSource
from kvd.data.tokenize import tokenize
from kvd.fusion import Fusion, FusionInput, FusionOutput
from kvd.losses.base import Loss, LossInputs
from kvd.modeling.capture import capture_kv
from kvd.project.base import Projector, shape_text
from kvd.shapes.probe import compare_cache
from kvd.sources.byte_tokenizer import byte_tokenizer
from kvd.spec.geometry import ModelGeometry
from kvd.spec.models import LoadedModel, ModelSource
from kvd.testing.factories import fusion_input, tiny_causal_lm

BASES: dict[str, type] = {
    "models": ModelSource,
    "aligners": Aligner,
    "projectors": Projector,
    "fusions": Fusion,
    "losses": Loss,
    "datasets": TextSource,
}
"""The base class a component of each kind subclasses (commands are plain functions)."""

STAGE_BASES: dict[str, type] = {
    "tokens": TokenAligner,
    "layers": LayerAligner,
    "rope": RopeAligner,
    "vocab": VocabAligner,
}

PROJECTOR_SHAPES: tuple[tuple[KVShape, KVShape], ...] = (
    (KVShape(2, 8), KVShape(2, 8)),
    (KVShape(4, 16), KVShape(2, 8)),
    (KVShape(2, 8), KVShape(4, 16)),
    (KVShape(2, 4), KVShape(2, 8)),
    (KVShape(6, 16), KVShape(2, 16)),
    (KVShape(1, 8), KVShape(2, 8)),
)
"""(source, target) KV shapes a projector is tried on: equal; GQA-like fewer and more heads with
another head_dim; head_dim alone; heads alone (group mean and replication)."""

FUSION_SIZES: dict[str, Any] = {
    "n_teachers": 3,
    "n_layers": 2,
    "kv_dim": 8,
    "n_tasks": 2,
    "teacher_weights": [1.0, 2.0, 1.0],
}

TEXTS = ["Return the sum of a and b.", "Déjà vu: two rows 😀 of text, one longer than the other."]
TOLERANCE = 1e-5
GRAD_FLOOR = 1e-5
"""Largest |gradient| below which none flows; real ones are ~1e-2 on these O(1) inputs."""


class ContractError(AssertionError):
    """A component breaks kvd's contract for its kind; the message names it and the rule."""


@dataclass
class ContractReport:
    """What `check_component` ran: one line per passed check, and what it skipped and why
    (e.g. a shape pair the projector rejects with `PlanError`)."""

    kind: str
    name: str
    checked: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass
class _Check:
    report: ContractReport
    base_dir: Path
    load_weights: bool
    gen: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def fail(self, rule: str) -> NoReturn:
        raise ContractError(f"{self.report.kind} component {self.report.name!r}: {rule}")

    def require(self, ok: object, rule: str) -> None:
        if not ok:
            self.fail(rule)

    def passed(self, what: str) -> None:
        self.report.checked.append(what)

    def randn(self, *shape: int, grad: bool = False) -> Tensor:
        return torch.randn(*shape, generator=self.gen).requires_grad_(grad)


def check_component(
    kind: str,
    name: str,
    /,
    *,
    plugins: Plugins | None = None,
    base_dir: Path | None = None,
    load_weights: bool = False,
    **options: Any,
) -> ContractReport:
    """Run component `name` of registry `kind` through the contract (see the module docstring);
    raise `ContractError` on the first broken rule, else return what was checked."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    entry = (plugins or get_plugins()).registry(kind).entry(name)
    c = _Check(ContractReport(kind, name), base_dir or Path.cwd(), load_weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # parameter init inside components: repeatable, caller's RNG kept
        if kind == "commands":
            _check_command(c, entry.obj, options)
            return c.report
        base = BASES[kind]
        c.require(
            isinstance(entry.obj, type) and issubclass(entry.obj, base),
            f"must subclass {base.__module__}.{base.__qualname__}, got {entry.obj!r}",
        )
        c.require(entry.summary, "has no docstring, so `kvd plugins` shows no summary")
        config = _config(c, entry.obj, options)
        CHECKS[kind](c, entry.obj, config)
    return c.report


def _config(c: _Check, cls: type, options: dict[str, Any]) -> ComponentConfig:
    try:
        config_cls = config_class(cls)
    except TypeError as exc:
        c.fail(str(exc))
    what = f"Config({', '.join(f'{k}={v!r}' for k, v in options.items())})"
    try:
        config = config_cls.model_validate(options)
    except ValidationError as exc:
        c.fail(f"{what if options else 'the default Config'} does not build: {exc}")
    try:
        config_cls.model_validate({**options, "kvd_contract_unknown_key": 1})
    except ValidationError:
        pass
    else:
        c.fail("Config accepts an unknown key (keep ComponentConfig's extra='forbid')")
    c.passed(f"{what} builds and rejects unknown keys")
    return config


def _build(c: _Check, make: Callable[[], Any], what: str) -> Any:
    try:
        return make()
    except PlanError as exc:
        c.fail(f"cannot be built {what}: {exc.message}")


# --- tensors and gradients ----------------------------------------------------------------------


def _finite(x: Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def _require_scalar(c: _Check, value: Any, what: str) -> None:
    c.require(isinstance(value, Tensor) and value.dim() == 0, f"{what} must be a 0-dim tensor")
    c.require(_finite(value), f"{what} is not finite: {value}")


def _flows(grad: Tensor | None) -> bool:
    """A gradient that is there and above rounding noise (1 - p/p is not a learning signal)."""
    return grad is not None and float(grad.abs().max()) > GRAD_FLOOR


def _require_grad(c: _Check, tensors: Sequence[Tensor], what: str) -> None:
    """Gradients on `tensors`: finite, and not all of them missing or zero."""
    grads = [t.grad for t in tensors]
    c.require(all(g is None or _finite(g) for g in grads), f"{what}: non-finite")
    c.require(any(_flows(g) for g in grads), f"{what}: none")


def _require_param_grads(c: _Check, module: nn.Module, what: str) -> None:
    """When `module` has trainable parameters: all gradients finite, at least one non-zero."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    c.require(
        all(p.grad is None or _finite(p.grad) for p in params), f"{what}: non-finite gradients"
    )
    c.require(
        any(_flows(p.grad) for p in params),
        f"{what}: no trainable parameter gets a gradient",
    )


def _require_frozen(c: _Check, tensor: Tensor, before: Tensor, what: str) -> None:
    """A teacher tensor: unchanged, no gradient, not made to require one."""
    c.require(not tensor.requires_grad and tensor.grad is None, f"{what} was given a gradient")
    c.require(torch.equal(tensor, before), f"{what} was modified in place")


def _backward(value: Tensor) -> None:
    if value.requires_grad:
        value.backward()


# --- models -------------------------------------------------------------------------------------


@contextmanager
def _models_built() -> Iterator[list[str]]:
    """Record the class of every transformers model constructed inside the block."""
    from transformers import PreTrainedModel

    built: list[str] = []
    original = PreTrainedModel.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        built.append(type(self).__name__)
        original(self, *args, **kwargs)

    with mock.patch.object(PreTrainedModel, "__init__", init):
        yield built


def _check_model(c: _Check, cls: type, config: ComponentConfig) -> None:
    source = cls(config, base_dir=c.base_dir)
    with _models_built() as built:
        geometry = source.geometry()
        label = source.describe()
    c.require(not built, f"geometry() or describe() built a model ({built}); they load no weights")
    c.require(isinstance(label, str) and label, "describe() must return a non-empty str")
    c.require(isinstance(geometry, ModelGeometry), "geometry() must return a ModelGeometry")
    g = geometry
    c.require(
        min(g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim, g.vocab_size) >= 1,
        f"geometry has an empty size: {g}",
    )
    c.require(g.num_heads % g.num_kv_heads == 0, f"{g.num_heads} heads, {g.num_kv_heads} KV heads")
    c.require(len(g.layer_types) == g.num_layers, "geometry needs one layer type per layer")
    c.require(
        not g.rope or set(g.layer_types) <= set(g.rope), "geometry lacks RoPE of a layer type"
    )
    c.require(source.geometry() == g, "geometry() differs between two calls")
    c.passed(f"geometry without weights: {label}")
    if c.load_weights:
        _check_loaded(c, source, g)


def _check_loaded(c: _Check, source: ModelSource, geometry: ModelGeometry) -> None:
    loaded = source.load(device=torch.device("cpu"), dtype=torch.float32)
    c.require(isinstance(loaded, LoadedModel), "load() must return a kvd.models.LoadedModel")
    fields = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "layer_types")
    c.require(
        all(getattr(loaded.geometry, f) == getattr(geometry, f) for f in fields),
        f"load() reports another geometry than geometry(): {loaded.geometry} vs {geometry}",
    )
    c.require(not loaded.model.training, "load() must return the model in eval mode")
    for what, tok in (("load()", loaded.tokenizer), ("tokenizer()", source.tokenizer())):
        c.require(getattr(tok, "is_fast", False), f"{what} must give a fast tokenizer (offsets)")
    vocab = min(geometry.vocab_size, loaded.model.get_input_embeddings().num_embeddings)
    ids = torch.randint(0, vocab, (1, 6), generator=c.gen)
    with torch.no_grad():
        out = loaded.model(input_ids=ids, use_cache=True)
    layers = range(geometry.num_layers)
    wrong = compare_cache(c.report.name, out.cache, geometry, layers=layers, batch=1, seq_len=6)
    c.require(not wrong, "the KV cache disagrees with geometry(): " + "; ".join(map(str, wrong)))
    c.passed("load(): eval mode, fast tokenizer, KV cache as the geometry predicts")


# --- aligners -----------------------------------------------------------------------------------


def _check_aligner(c: _Check, cls: type, config: ComponentConfig) -> None:
    stage = str(getattr(cls, "stage", ""))
    c.require(stage in STAGE_BASES, f"stage must be one of {sorted(STAGE_BASES)}, got {stage!r}")
    base = STAGE_BASES[stage]
    c.require(issubclass(cls, base), f"a {stage!r} aligner must subclass {base.__qualname__}")
    STAGE_CHECKS[stage](c, cls(config))


def _word_tokenizer() -> Any:
    """A word-level fast tokenizer over TEXTS (spaces covered by no token), BOS `<s>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace().pre_tokenize_str
    words = sorted({w for text in TEXTS for w, _ in split(text)})
    vocab = {"<s>": 0, "<pad>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", unk_token="<unk>"
    )


def _check_tokens(c: _Check, aligner: TokenAligner) -> None:
    student = tokenize(byte_tokenizer(), TEXTS, add_bos=True)
    words = tokenize(_word_tokenizer(), TEXTS, add_bos=True)
    for what, teacher in (("bytes -> words", words), ("identical tokens", student)):
        a = aligner.align(student, teacher)
        _require_alignment(c, a, student, teacher, what)
        again = aligner.align(student, teacher)
        c.require(
            all(torch.equal(getattr(a, f), getattr(again, f)) for f in ("index", "weight", "mask")),
            f"{what}: two calls give different alignments",
        )
        c.passed(f"token alignment {what}")


def _require_alignment(
    c: _Check, a: Any, student: TokenBatch, teacher: TokenBatch, what: str
) -> None:
    c.require(isinstance(a, TokenAlignment), f"{what}: align() must return a TokenAlignment")
    b, ts = student.input_ids.shape
    tt = teacher.input_ids.shape[1]
    c.require(
        a.mask.shape == (b, ts) and a.mask.dtype == torch.bool, f"{what}: mask must be [B, Ts] bool"
    )
    c.require(
        a.index.dim() == 3 and a.index.shape[:2] == (b, ts) and a.weight.shape == a.index.shape,
        f"{what}: index and weight must be [B, Ts, K], got {list(a.index.shape)}",
    )
    c.require(a.index.dtype == torch.long, f"{what}: index must be long")
    c.require(((a.index >= 0) & (a.index < tt)).all(), f"{what}: teacher index outside [0, Tt)")
    c.require(a.weight.is_floating_point() and (a.weight >= 0).all(), f"{what}: negative weights")
    sums = a.weight.sum(-1)
    c.require(
        torch.allclose(sums[a.mask], torch.ones(()), atol=TOLERANCE),
        f"{what}: weights must sum to 1 at valid positions",
    )
    c.require((sums[~a.mask] == 0).all(), f"{what}: weights must be 0 at masked positions")
    c.require(
        not (a.mask & ~student.attention_mask).any(), f"{what}: student padding must be masked"
    )
    c.require(a.mask.any(), f"{what}: no student position is aligned")


def _check_layers(c: _Check, aligner: LayerAligner) -> None:
    planned = 0
    for n_teacher, n_student in ((4, 2), (3, 3), (2, 4)):
        calibration = None
        if aligner.needs_calibration:
            calibration = LayerCalibration(
                teacher=[c.randn(32, 12) for _ in range(n_teacher)],
                student=[c.randn(32, 8) for _ in range(n_student)],
            )
        what = f"{n_teacher} teacher -> {n_student} student layers"
        try:
            plan = aligner.plan(n_teacher, n_student, calibration)
        except PlanError as exc:
            c.report.skipped.append(f"{what}: {exc.message}")
            continue
        c.require(isinstance(plan, LayerPlan), f"{what}: plan() must return a LayerPlan")
        c.require(len(plan.sources) == n_student, f"{what}: one entry per student layer")
        c.require(
            all(t < n_teacher for t in plan.teacher_layers), f"{what}: teacher layer out of range"
        )
        c.require(plan.student_layers, f"{what}: no student layer is distilled")
        planned += 1
        c.passed(f"layer plan {what}: {plan.describe()}")
    c.require(planned, "plans none of 4->2, 3->3, 2->4 layers (all raised PlanError)")


def _check_rope(c: _Check, aligner: RopeAligner) -> None:
    loaded = tiny_causal_lm("llama", layers=2, heads=4, kv_heads=2, head_dim=8)
    batch = tokenize(loaded.tokenizer, TEXTS, add_bos=True)
    bundle = capture_kv(loaded.model, batch.input_ids, batch.attention_mask, logits=False).kv
    keys = [k.clone() for k in bundle.keys]
    out = aligner.apply(bundle, loaded.model)
    c.require(isinstance(out, KVBundle), "apply() must return a KVBundle")
    c.require(out.layers == bundle.layers, "apply() must keep the layers")
    c.require(torch.equal(out.mask, bundle.mask), "apply() must keep the mask")
    c.require(isinstance(out.pre_rope, bool), "pre_rope must be a bool")
    c.require(
        [k.shape for k in out.keys] == [k.shape for k in keys] and all(map(_finite, out.keys)),
        "keys must keep their shapes [B, H, T, D] and stay finite",
    )
    c.require(
        all(torch.equal(x, y) for x, y in zip(out.values, bundle.values, strict=True)),
        "values carry no RoPE and must pass through unchanged",
    )
    c.require(
        all(torch.equal(x, y) for x, y in zip(bundle.keys, keys, strict=True)),
        "apply() modified the input bundle's keys in place",
    )
    c.passed("rope: same layers, shapes and values on a tiny llama's cache")


def _check_vocab(c: _Check, aligner: VocabAligner) -> None:
    student, words = byte_tokenizer(), _word_tokenizer()
    vs, vt = len(student), len(words) + 3  # logits may have rows past the tokenizer
    same = aligner.map(student, student, vs, vs)
    c.require(same is None or isinstance(same, VocabMap), "map() must return a VocabMap or None")
    found = aligner.map(words, student, vt, vs)
    if found is None:
        c.passed("vocab: keeps the teacher's vocabulary")
        return
    c.require(isinstance(found, VocabMap), "map() must return a VocabMap or None")
    c.require(found.size == vs, f"the map must be onto the student's {vs} tokens")
    index = found.index
    c.require(
        index.shape == (vt,) and index.dtype == torch.long, "index must be [teacher vocab] long"
    )
    c.require(((index >= -1) & (index < vs)).all(), "index must hold student ids or -1")
    mapped = found.apply(c.randn(2, 3, vt))
    c.require(mapped.shape == (2, 3, vs) and _finite(mapped), "apply() must give [..., Vs], finite")
    c.require(
        torch.allclose(mapped.exp().sum(-1), torch.ones(()), atol=TOLERANCE),
        "apply() must give log-probabilities",
    )
    c.passed(f"vocab map: {found.coverage:.0%} of the teacher's ids map onto the student's")


# --- projectors ---------------------------------------------------------------------------------


def _check_projector(c: _Check, cls: type, config: ComponentConfig) -> None:
    built = 0
    for source, target in PROJECTOR_SHAPES:
        what = f"{shape_text(source)} -> {shape_text(target)}"
        try:
            proj = cls(config, source=source, target=target)
        except PlanError as exc:
            c.report.skipped.append(f"{what}: {exc.message}")
            continue
        except Exception as exc:
            c.fail(f"{what}: raised {type(exc).__name__}: {exc} (unsupported shapes: PlanError)")
        built += 1
        _check_projection(c, cls, config, proj, source, target, what)
    c.require(built, "accepts none of the shape pairs tried (all raised PlanError)")


def _check_projection(
    c: _Check,
    cls: type,
    config: ComponentConfig,
    proj: Projector,
    source: KVShape,
    target: KVShape,
    what: str,
) -> None:
    label = proj.describe()
    c.require(isinstance(label, str) and label, f"{what}: describe() must return a non-empty str")
    for b, t in ((2, 5), (1, 3)):
        x = c.randn(b, source.heads, t, source.head_dim, grad=True)
        out = proj(x)
        want = (b, target.heads, t, target.head_dim)
        c.require(out.shape == want, f"{what}: output {list(out.shape)}, expected {list(want)}")
        c.require(_finite(out), f"{what}: non-finite output")
        _backward((out * torch.randn(out.shape, generator=c.gen)).sum())
        _require_grad(c, [x], f"{what}: gradient into the source tensor")
        _require_param_grads(c, proj, what)
        proj.zero_grad()
    teacher = c.randn(2, source.heads, 5, source.head_dim)
    before = teacher.clone()
    _backward(proj(teacher).sum())
    _require_frozen(c, teacher, before, f"{what}: a teacher tensor")
    twin = cls(config, source=source, target=target)
    twin.load_state_dict(proj.state_dict())
    proj.eval()
    twin.eval()
    c.require(
        torch.allclose(proj(teacher), twin(teacher)), f"{what}: state dict does not round-trip"
    )
    c.passed(f"projector {what}: {label}")


# --- fusions ------------------------------------------------------------------------------------


def _check_fusion(c: _Check, cls: type, config: ComponentConfig) -> None:
    sizes = FUSION_SIZES
    fusion = _build(c, lambda: cls(config, **sizes), f"with sizes {sizes}")
    for attr in ("routes_on_features", "needs_teacher_ce"):
        c.require(isinstance(getattr(fusion, attr, None), bool), f"{attr} must be a bool")
    for layer in range(sizes["n_layers"]):
        inp = _fusion_input(fusion, layer=layer, n_tasks=sizes["n_tasks"])
        before = inp.teacher.clone()
        out = _fused(c, fusion, inp, f"layer {layer}")
        _backward(
            (out.weights * torch.rand(out.weights.shape, generator=c.gen)).sum() + out.aux_loss
        )
        _require_param_grads(c, fusion, f"layer {layer}")
        _require_frozen(c, inp.teacher, before, f"layer {layer}: the teacher tensor")
        fusion.zero_grad()
        c.passed(f"fusion weights and gradients at layer {layer}")
    try:
        plain = cls(config, **{**sizes, "n_tasks": 0})
    except PlanError as exc:
        c.report.skipped.append(f"without task labels: {exc.message}")
    else:
        _fused(c, plain, _fusion_input(plain, layer=0, n_tasks=0), "without task labels")
        c.passed("fusion without task labels")
    inp = _fusion_input(fusion, layer=1, n_tasks=sizes["n_tasks"])
    twin = cls(config, **sizes)
    twin.load_state_dict(fusion.state_dict())
    fusion.eval()
    twin.eval()
    weights = fusion(inp).weights
    c.require(torch.allclose(weights, twin(inp).weights), "state dict does not round-trip")
    c.passed("state dict round trip")
    if not fusion.routes_on_features:
        other = fusion_input(teachers=sizes["n_teachers"], head_dim=sizes["kv_dim"], seed=99)
        moved = replace(inp, teacher=other.teacher, student=other.student)
        c.require(
            torch.allclose(fusion(moved).weights, weights),
            "routes_on_features is False, but the weights change with the teacher / student KV",
        )
        c.passed("weights independent of the KV (routes_on_features = False)")


def _fusion_input(fusion: Any, *, layer: int, n_tasks: int) -> FusionInput:
    return fusion_input(
        teachers=FUSION_SIZES["n_teachers"],
        head_dim=FUSION_SIZES["kv_dim"],
        layer=layer,
        n_tasks=n_tasks,
        teacher_ce=fusion.needs_teacher_ce,
        seed=layer,
    )


def _fused(c: _Check, fusion: Any, inp: FusionInput, what: str) -> FusionOutput:
    out: FusionOutput = fusion(inp)
    c.require(isinstance(out, FusionOutput), f"{what}: forward must return a FusionOutput")
    w, valid = out.weights, inp.valid
    c.require(w.shape == valid.shape, f"{what}: weights {list(w.shape)}, expected [B, T, N]")
    c.require(w.is_floating_point() and _finite(w), f"{what}: weights must be finite floats")
    c.require((w >= 0).all(), f"{what}: negative weights")
    c.require((w[~valid] == 0).all(), f"{what}: weights on invalid teachers must be 0")
    sums, any_valid = w.sum(-1), valid.any(-1)
    c.require(
        torch.allclose(sums[any_valid], torch.ones(()), atol=TOLERANCE),
        f"{what}: weights must sum to 1 over the valid teachers",
    )
    c.require((sums[~any_valid] == 0).all(), f"{what}: weights must be 0 where no teacher is valid")
    _require_scalar(c, out.aux_loss, f"{what}: aux_loss")
    return out


# --- losses -------------------------------------------------------------------------------------


def _mask(b: int, t: int, *, holes: bool) -> Tensor:
    """[B, T] bool: the last row right-padded by 2; with `holes` also masked at its start (a
    position no teacher token aligns to)."""
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[-1, -2:] = False
    if holes:
        mask[-1, 0] = False
    return mask


def _check_loss(c: _Check, cls: type, config: ComponentConfig) -> None:
    inputs = getattr(cls, "inputs", None)
    c.require(inputs in get_args(LossInputs), f"inputs must be one of {get_args(LossInputs)}")
    loss = cls(config)
    b, t = 2, 6
    mask = _mask(b, t, holes=inputs != "ce")
    checked = 0
    for students, others in _loss_cases(c, str(inputs), b, t):
        what = f"{inputs} {' '.join(str(list(x.shape)) for x in students + others)}"
        try:
            value = loss(*students, *others, mask)
        except PlanError as exc:
            c.report.skipped.append(f"{what}: {exc.message}")
            continue
        checked += 1
        _require_scalar(c, value, f"{what}: the loss")
        before = [x.clone() for x in others]
        _backward(value)
        _require_grad(c, students, f"{what}: gradient into the student")
        for x, saved in zip(others, before, strict=True):
            _require_frozen(c, x, saved, f"{what}: a teacher tensor")
        noisy = [_noise_masked(c, x.detach(), mask) for x in students + others]
        again = loss(*noisy, mask)
        c.require(
            torch.allclose(again, value, rtol=1e-4, atol=TOLERANCE),
            f"{what}: values at masked positions change the loss ({value} -> {again})",
        )
        if inputs != "ce" and [x.shape for x in students] == [x.shape for x in others]:
            same = [x.detach() for x in students]
            zero = loss(*same, *[x.clone() for x in same], mask)
            c.require(abs(float(zero)) < TOLERANCE, f"{what}: {float(zero)} on identical inputs")
        c.passed(f"loss {what}")
    c.require(checked, "accepts none of the input shapes tried (all raised PlanError)")


def _loss_cases(
    c: _Check, inputs: str, b: int, t: int
) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """(student tensors, the other inputs before the mask) per case: the teacher's tensors, or
    for "ce" the input_ids."""
    if inputs == "kv":
        yield [c.randn(b, 2, t, 8, grad=True)], [c.randn(b, 2, t, 8)]
    elif inputs == "kv_raw":
        for (hs, ds), (ht, dt) in (((2, 8), (4, 16)), ((2, 8), (2, 8))):
            students = [c.randn(b, hs, t, ds, grad=True) for _ in "kv"]
            yield students, [c.randn(b, ht, t, dt) for _ in "kv"]
    elif inputs == "logits":
        for vs, vt in ((11, 11), (11, 17)):
            yield [c.randn(b, t, vs, grad=True)], [c.randn(b, t, vt)]
    else:
        yield [c.randn(b, t, 11, grad=True)], [torch.randint(0, 11, (b, t), generator=c.gen)]


def _noise_masked(c: _Check, x: Tensor, mask: Tensor) -> Tensor:
    """Float `x` with large random values where `mask` [B, T] is False (dim 2 of KV
    [B, H, T, D], dim 1 of logits [B, T, V]); ids are returned as they are."""
    if not x.is_floating_point():
        return x
    m = mask[:, None, :, None] if x.dim() == 4 else mask[..., None]
    return x.where(m, 1e3 * torch.randn(x.shape, generator=c.gen))


# --- datasets and commands ----------------------------------------------------------------------


def _check_dataset(c: _Check, cls: type, config: ComponentConfig) -> None:
    def first() -> list[Any]:
        return list(itertools.islice(cls(config, base_dir=c.base_dir).documents(), 64))

    docs = first()
    c.require(docs, "documents() yields nothing")
    for doc in docs:
        c.require(isinstance(doc, Document), f"documents() must yield Documents, got {doc!r}")
        c.require(isinstance(doc.text, str) and doc.text, f"empty text in document {doc.doc_id!r}")
        c.require(isinstance(doc.task, str) and isinstance(doc.doc_id, str), "task, doc_id: str")
    c.require(first() == docs, "documents() gives another order (or other text) the second time")
    c.passed(f"documents: {len(docs)} read, same order twice")


def _check_command(c: _Check, fn: Any, options: dict[str, Any]) -> None:
    import typer

    c.require(callable(fn), f"must be a function, got {fn!r}")
    c.require(not options, "commands take no options")
    app = typer.Typer()
    app.command(c.report.name)(fn)
    try:
        typer.main.get_command(app)
    except Exception as exc:
        c.fail(f"Typer cannot make a command of it: {type(exc).__name__}: {exc}")
    c.passed("a Typer command")


STAGE_CHECKS: dict[str, Callable[[_Check, Any], None]] = {
    "tokens": _check_tokens,
    "layers": _check_layers,
    "rope": _check_rope,
    "vocab": _check_vocab,
}

CHECKS: dict[str, Callable[[_Check, type, ComponentConfig], None]] = {
    "models": _check_model,
    "aligners": _check_aligner,
    "projectors": _check_projector,
    "fusions": _check_fusion,
    "losses": _check_loss,
    "datasets": _check_dataset,
}
