"""The math core end to end: teacher KV -> aligned -> projected -> fused -> loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvd.align.base import LayerAligner, TokenAligner
from kvd.align.rope import RopeAligner
from kvd.align.vocab import VocabMap
from kvd.core.errors import PlanError
from kvd.core.manager import registry
from kvd.data.tokenize import tokenize
from kvd.sources.calibrate import layer_calibration
from kvd.sources.tiny import TinySource
from kvd.spec.models import LoadedModel
from kvd.spec.runspec import ProjectorRef
from kvd.step.curriculum import Curriculum, LossTerm, Stage
from kvd.step.distill import DistillModel, build_distill_model, check_loss_layers
from kvd.step.targets import TeacherRuntime, teacher_targets
from tests.specs import LLAMA_TEACHER, QWEN_TEACHER, STUDENT

TEXTS = ["Return the sum of a and b.", "A class that holds a dict of pending tasks, in order."]


def tiny(config: dict[str, Any], seed: int) -> LoadedModel:
    source = TinySource(TinySource.Config(config=config, seed=seed))
    return source.load(device=torch.device("cpu"), dtype=torch.float32)


def component(kind: str, name: str, **options: Any) -> Any:
    cls = registry(kind).get(name)
    return cls, cls.Config(**options)


def build(
    student: LoadedModel,
    teachers: dict[str, LoadedModel],
    *,
    projector: str = "head_dim_then_heads",
    fusion: str = "mean",
    fusion_options: dict[str, Any] | None = None,
    losses: list[tuple[str, dict[str, Any]]] | None = None,
    rope: str = "unrotate",
    layers: str = "uniform",
    direction: str = "teacher_to_student",
) -> tuple[DistillModel, dict[str, TeacherRuntime], RopeAligner]:
    options = {"pairs": [[0, 0], [1, 1]]} if layers == "explicit" else {}
    layer_cls, layer_cfg = component("aligners", layers, **options)
    aligner: LayerAligner = layer_cls(layer_cfg)
    rope_cls, rope_cfg = component("aligners", rope)
    rope_aligner: RopeAligner = rope_cls(rope_cfg)
    soft_cls, soft_cfg = component("aligners", "soft")

    def plan(t: LoadedModel) -> Any:
        calibration = None
        if aligner.needs_calibration:
            calibration = layer_calibration(
                t, student, TEXTS, soft_cls(soft_cfg), rope_aligner, torch.device("cpu")
            )
        return aligner.plan(t.geometry.num_layers, student.geometry.num_layers, calibration)

    runtimes = {
        tid: TeacherRuntime(tid, 1.0, t, plan(t), add_bos=False) for tid, t in teachers.items()
    }
    fusion_cls, fusion_cfg = component("fusions", fusion, **(fusion_options or {}))
    n_layers = len({j for r in runtimes.values() for j in r.plan.student_layers})
    terms = []
    for name, options in losses or [("kv_mse", {})]:
        cls, cfg = component("losses", name, **options)
        terms.append(LossTerm(name, cls(cfg), 1.0, list(teachers)))
    kv_dim = student.geometry.head_dim
    fused = fusion_cls(
        fusion_cfg, n_teachers=len(teachers), n_layers=n_layers, kv_dim=kv_dim, n_tasks=2
    )
    model = build_distill_model(
        student,
        list(runtimes.values()),
        {tid: t.geometry.kv_shape for tid, t in teachers.items()},
        Curriculum([Stage(0, list(teachers), fused, terms)]),
        ProjectorRef.model_validate({"name": projector, "direction": direction}),
        rope_aligner,
    )
    return model, runtimes, rope_aligner


def step(
    model: DistillModel,
    student: LoadedModel,
    runtimes: dict[str, TeacherRuntime],
    rope: RopeAligner,
    token_aligner: str = "soft",
) -> Any:
    cls, cfg = component("aligners", token_aligner)
    aligner: TokenAligner = cls(cfg)
    batch = tokenize(student.tokenizer, TEXTS)
    targets = {
        tid: teacher_targets(
            r,
            TEXTS,
            batch,
            token_aligner=aligner,
            rope=rope,
            want_logits=False,
            want_ce=True,
            device=torch.device("cpu"),
        )
        for tid, r in runtimes.items()
    }
    return model(batch.input_ids, batch.attention_mask, targets, torch.tensor([0, 1]))


def logit_targets(runtime: TeacherRuntime, batch: Any, rope: RopeAligner, *, want_ce: bool) -> Any:
    """The teacher's targets for TEXTS with its logits, through the soft token aligner."""
    cls, cfg = component("aligners", "soft")
    return teacher_targets(
        runtime,
        TEXTS,
        batch,
        token_aligner=cls(cfg),
        rope=rope,
        want_logits=True,
        want_ce=want_ce,
        device=torch.device("cpu"),
    )


@pytest.mark.parametrize("token_aligner", ["soft", "hard", "resample", "segment_resample"])
@pytest.mark.parametrize("rope", ["unrotate", "none"])
@pytest.mark.parametrize("layers", ["uniform", "explicit", "cka"])
def test_identical_teacher_gives_zero_loss(token_aligner: str, rope: str, layers: str) -> None:
    """A teacher identical to the student, identity projector: target == student KV, loss 0,
    through every token, rope and layer aligner."""
    student = tiny(STUDENT, seed=3)
    twin = tiny(STUDENT, seed=3)
    losses = [
        ("kv_mse", {"guard": "none"}),
        ("mercator", {"guard": "none"}),
        ("relation_kl", {"relation_heads": 2}),
    ]
    model, runtimes, rope_aligner = build(
        student, {"twin": twin}, projector="identity", losses=losses, rope=rope, layers=layers
    )
    out = step(model, student, runtimes, rope_aligner, token_aligner)
    for name, _ in losses:
        assert out.numbers()[f"loss/{name}"] == pytest.approx(0.0, abs=1e-6), name


def test_heterogeneous_teachers_shapes_and_gradients() -> None:
    """GQA 4/2 llama and MQA 6/1 qwen2 (head_dim 16) into a 4/2-head student (head_dim 8):
    gradients reach projectors, the router and the student, never a teacher."""
    student = tiny(STUDENT, seed=3)
    teachers = {"llama": tiny(LLAMA_TEACHER, seed=1), "qwen": tiny(QWEN_TEACHER, seed=2)}
    model, runtimes, rope = build(
        student,
        teachers,
        fusion="learnable",
        losses=[("kv_mse", {}), ("relation_kl", {"relation_heads": 2})],
    )
    out = step(model, student, runtimes, rope)
    assert torch.isfinite(out.total)
    assert set(out.routing) == {0, 1}
    assert out.routing[0].shape[-1] == 2  # [B, T, N]
    out.total.backward()
    assert all(p.grad is not None for p in model.projectors.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fusion.parameters())
    k_proj = student.model.model.layers[0].self_attn.k_proj.weight
    assert k_proj.grad is not None and k_proj.grad.abs().sum() > 0
    for t in teachers.values():
        assert all(p.grad is None for p in t.model.parameters())


def test_seed_gqa_case_end_to_end() -> None:
    """The seed's crash: teacher 12 KV heads (head_dim 16) vs student 2 KV heads (head_dim 8)."""
    teacher_cfg = dict(
        LLAMA_TEACHER, hidden_size=192, num_attention_heads=12, num_key_value_heads=12
    )
    student = tiny(STUDENT, seed=3)
    model, runtimes, rope = build(student, {"mha": tiny(teacher_cfg, seed=5)})
    proj = model.projectors["mha__L0"]
    assert "12->2" in proj.k.describe().replace(" ", "")
    out = step(model, student, runtimes, rope)
    out.total.backward()
    assert torch.isfinite(out.total)


def test_lm_head_on_real_tokens_only_changes_nothing() -> None:
    """The student's LM head on the real tokens only (the default) gives the losses and the
    gradients of the head on every position: row-wise terms (CE, logit KD) read the narrowed
    logits, others (ULD) the [B, T, V] layout rebuilt from them."""
    student = tiny(STUDENT, seed=3)
    teachers = {"llama": tiny(LLAMA_TEACHER, seed=1), "qwen": tiny(QWEN_TEACHER, seed=2)}
    losses = [("ce", {}), ("kv_mse", {}), ("uld", {}), ("logit_kd", {"temperature": 2.0})]
    model, runtimes, rope = build(student, teachers, losses=losses)
    model.loss_terms[3].teachers = ["llama"]  # logit_kd needs the student's vocabulary size
    batch = tokenize(student.tokenizer, TEXTS)
    assert not batch.attention_mask.all()  # the shorter text is padded
    targets = {tid: logit_targets(r, batch, rope, want_ce=False) for tid, r in runtimes.items()}
    results = []
    for real_only in (True, False):
        model.real_token_head = real_only
        model.zero_grad(set_to_none=True)
        out = model(batch.input_ids, batch.attention_mask, targets, torch.tensor([0, 1]))
        out.total.backward()
        grads = [p.grad.clone() for p in student.model.parameters() if p.grad is not None]
        results.append((out.numbers(), grads))
    (parts, grads), (parts_all, grads_all) = results
    assert parts.keys() == parts_all.keys() and "loss/logit_kd" in parts
    for key, value in parts.items():
        assert value == pytest.approx(parts_all[key], rel=1e-5, abs=1e-7), key
    assert len(grads) == len(grads_all) > 0
    for g, g_all in zip(grads, grads_all, strict=True):
        torch.testing.assert_close(g, g_all, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", ["kv_mse", "mercator", "kv_smooth_l1"])
def test_loss_fusion_of_one_teacher_is_target_fusion(loss: str) -> None:
    """With one teacher, comparing with each teacher's target and weighting the losses is the
    same as comparing with the (one-teacher) fused target."""
    student = tiny(STUDENT, seed=3)
    totals = []
    for combine in ("targets", "losses"):
        torch.manual_seed(0)
        model, runtimes, rope = build(
            student,
            {"qwen": tiny(QWEN_TEACHER, seed=2)},
            fusion_options={"combine": combine},
            losses=[(loss, {})],
        )
        totals.append(step(model, student, runtimes, rope).total)
    torch.testing.assert_close(totals[0], totals[1])


def test_loss_fusion_keeps_each_teachers_signal_whatever_the_scales() -> None:
    """Two teachers whose projected K/V differ in scale by orders of magnitude (SmolLM2 vs
    Gemma-3 in configs/smollm2_gemma3.yaml): loss fusion is the mean of each teacher's own
    guarded loss, so teacher A's term does not change when B's targets grow; under target
    fusion A's signal is lost in the fused target (the loss hardly changes when A's target is
    zeroed)."""
    student = tiny(STUDENT, seed=3)
    teachers = {"llama": tiny(LLAMA_TEACHER, seed=1), "qwen": tiny(QWEN_TEACHER, seed=2)}

    def run(combine: str, scale: float, drop_llama: bool = False) -> Any:
        torch.manual_seed(0)
        model, runtimes, rope = build(student, teachers, fusion_options={"combine": combine})
        with torch.no_grad():
            for name, p in model.projectors.named_parameters():
                if name.startswith("qwen") and p.dim() > 1:
                    p.mul_(scale)
                if name.startswith("llama") and drop_llama:
                    p.zero_()
        return step(model, student, runtimes, rope).numbers()

    small, large = run("losses", 1.0), run("losses", 300.0)
    for j in (0, 1):
        parts = [small[f"loss/kv_mse/{t}/L{j}"] for t in teachers]
        assert small[f"loss/kv_mse/L{j}"] == pytest.approx(sum(parts) / 2, rel=1e-5)
        assert large[f"loss/kv_mse/llama/L{j}"] == pytest.approx(
            small[f"loss/kv_mse/llama/L{j}"], rel=1e-5
        )
    for scale, lost in ((1.0, False), (300.0, True)):
        parts = run("targets", scale)
        assert parts["loss/kv_mse/llama/L0"] == pytest.approx(small["loss/kv_mse/llama/L0"])
        with_a = parts["loss/kv_mse"]
        without_a = run("targets", scale, drop_llama=True)["loss/kv_mse"]
        assert (abs(with_a - without_a) < 1e-3 * with_a) == lost


@pytest.mark.parametrize("combine", ["targets", "losses"])
def test_a_kv_loss_reads_only_the_teachers_it_names(combine: str) -> None:
    """`losses.N.teachers` on a projected-KV loss under teacher->student fusion: the other
    teachers neither enter its value nor appear in its per-teacher log; the loss equals the one
    computed with those teachers absent from the step."""
    student = tiny(STUDENT, seed=3)
    teachers = {"llama": tiny(LLAMA_TEACHER, seed=1), "qwen": tiny(QWEN_TEACHER, seed=2)}
    torch.manual_seed(0)
    model, runtimes, rope = build(student, teachers, fusion_options={"combine": combine})
    model.loss_terms[0].teachers = ["llama"]
    named = step(model, student, runtimes, rope).numbers()
    alone = step(model, student, {"llama": runtimes["llama"]}, rope).numbers()
    assert named["loss/kv_mse"] == pytest.approx(alone["loss/kv_mse"], rel=1e-6)
    assert "loss/kv_mse/llama/L0" in named and not any("/qwen/" in k for k in named)
    everyone = build(student, teachers, fusion_options={"combine": combine})
    assert step(everyone[0], student, runtimes, rope).numbers()["loss/kv_mse/qwen/L0"] > 0


@pytest.mark.parametrize("direction", ["teacher_to_student", "student_to_teacher"])
def test_kv_terms_with_their_own_layers_give_each_layer_one_teacher(direction: str) -> None:
    """Two K/V terms with their own `teachers` and `layers`: each term is its teacher's loss
    at its layers only (the same layer's value without `layers`), and logs no other layer."""
    student = tiny(STUDENT, seed=3)
    teachers = {"llama": tiny(LLAMA_TEACHER, seed=1), "qwen": tiny(QWEN_TEACHER, seed=2)}
    torch.manual_seed(0)
    model, runtimes, rope = build(student, teachers, direction=direction)
    kv = model.loss_terms[0].module

    def run(layers_a: list[int] | None, layers_b: list[int] | None) -> dict[str, float]:
        model.curriculum.stages[0].losses = [
            LossTerm("kv_a", kv, 1.0, ["llama"], layers_a),
            LossTerm("kv_b", kv, 1.0, ["qwen"], layers_b),
        ]
        numbers: dict[str, float] = step(model, student, runtimes, rope).numbers()
        return numbers

    every = run(None, None)
    split = run([0], [1])
    if direction == "teacher_to_student":  # the fused value per layer
        layer_a, layer_b = "loss/kv_a/L0", "loss/kv_b/L1"
    else:  # per teacher and layer
        layer_a, layer_b = "loss/kv_a/llama/L0", "loss/kv_b/qwen/L1"
    assert split["loss/kv_a"] == pytest.approx(every[layer_a], rel=1e-6)
    assert split["loss/kv_b"] == pytest.approx(every[layer_b], rel=1e-6)
    assert split["loss/kv_a"] != pytest.approx(every["loss/kv_a"], rel=1e-3)
    assert not any(k.endswith("L1") for k in split if k.startswith("loss/kv_a/"))
    assert not any(k.endswith("L0") for k in split if k.startswith("loss/kv_b/"))


def test_kv_term_layers_must_be_distilled_and_taught() -> None:
    cls, cfg = component("losses", "kv_mse")
    kv = cls(cfg)
    with pytest.raises(PlanError, match=r"layers \[5\] are not distilled student layers"):
        check_loss_layers([LossTerm("kv", kv, 1.0, ["llama"], [5])], [0, 1], {"llama": [0, 1]})
    with pytest.raises(PlanError, match=r"teacher\(s\) \['llama'\] teach none of its layers"):
        check_loss_layers([LossTerm("kv", kv, 1.0, ["llama"], [1])], [0, 1], {"llama": [0]})
    check_loss_layers([LossTerm("kv", kv, 1.0, ["llama"], [0])], [0, 1], {"llama": [0]})


def test_a_mapped_teacher_runs_its_head_only_on_the_rows_its_map_reads() -> None:
    """A teacher whose logits go through a vocabulary map: its LM head sees only the positions
    a logit loss reads (not padding), and the top k it gives equal, bit for bit, those mapped
    from its logits at every position (the path when CE needs them all)."""
    student = tiny(STUDENT, seed=3)
    teacher = tiny(QWEN_TEACHER, seed=5)
    _, runtimes, rope = build(student, {"qwen": teacher})
    runtime = runtimes["qwen"]
    vt, vs = teacher.geometry.vocab_size, student.geometry.vocab_size
    runtime.vocab = VocabMap(torch.arange(vt) % (vs - 3), size=vs, k=8)
    batch = tokenize(student.tokenizer, TEXTS)
    head_rows: list[int] = []
    hook = teacher.model.get_output_embeddings().register_forward_hook(
        lambda _m, _a, out: head_rows.append(out.shape[:-1].numel())
    )
    found = [logit_targets(runtime, batch, rope, want_ce=want_ce) for want_ce in (False, True)]
    hook.remove()
    narrowed, whole = found
    assert narrowed.top_k is not None and whole.top_k is not None
    assert narrowed.logit_mask is not None and whole.logit_mask is not None
    kept = int(narrowed.logit_mask.sum())
    teacher_positions = tokenize(teacher.tokenizer, TEXTS).input_ids.numel()
    assert 0 < kept < teacher_positions  # the shorter text's padding is not read
    assert head_rows == [kept, teacher_positions]
    assert torch.equal(narrowed.logit_mask, whole.logit_mask)
    assert torch.equal(narrowed.top_k.values, whole.top_k.values)
    assert torch.equal(narrowed.top_k.index, whole.top_k.index)
