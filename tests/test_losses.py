"""Losses: zero on identical inputs, exact masking, reference values, and the collapse guard."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kvd.core.errors import PlanError
from kvd.core.manager import load_plugins
from kvd.core.types import KVShape
from kvd.losses import Loss, masked_mean, rowwise
from kvd.losses.base import keep
from kvd.modeling.nll import next_token_nll

PLUGINS = load_plugins(entry_points=False)
LOSSES = PLUGINS.registry("losses")
KV_LOSSES = ["kv_mse", "kv_smooth_l1", "mercator"]
B, H, T, D = 2, 4, 6, 16


def build(name: str, **options: Any) -> Loss:
    cls = LOSSES.get(name)
    loss: Loss = cls(cls.Config(**options))
    return loss


def some_mask() -> torch.Tensor:
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 0] = False
    return mask


def test_all_losses_registered_with_their_inputs() -> None:
    inputs = {entry.name: entry.obj.inputs for entry in LOSSES}
    assert inputs == {
        "kv_mse": "kv",
        "kv_smooth_l1": "kv",
        "mercator": "kv",
        "relation_kl": "kv_raw",
        "logit_kd": "logits",
        "uld": "logits",
        "ce": "ce",
    }


@pytest.mark.parametrize("guard", ["none", "variance", "centred"])
@pytest.mark.parametrize("name", KV_LOSSES)
def test_kv_losses_zero_for_identical_and_mask_exact(name: str, guard: str) -> None:
    loss = build(name, guard=guard)
    x = torch.randn(B, H, T, D)
    mask = some_mask()
    assert loss(x, x.clone(), mask).item() == 0.0
    y = torch.randn(B, H, T, D)
    base = loss(x, y, mask)
    x2, y2 = x.clone(), y.clone()
    x2[~mask[:, None, :].expand(B, H, T)] = float("nan")
    y2[~mask[:, None, :].expand(B, H, T)] = 1e4
    x2.requires_grad_()
    masked = loss(x2, y2, mask)
    torch.testing.assert_close(masked, base)
    masked.backward()
    assert x2.grad is not None and torch.isfinite(x2.grad).all()
    s = x.clone().requires_grad_()
    empty = loss(s, y, torch.zeros(B, T, dtype=torch.bool))
    assert empty.item() == 0.0
    empty.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_kv_mse_values() -> None:
    s, t = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 1.0], [3.0, 3.0]]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert build("kv_mse", guard="none")(s, t, mask).item() == 5.0
    # variance guard: error relative to the target's spread (mean 2, variance 1 per feature)
    assert build("kv_mse")(s, t, mask).item() == pytest.approx(5.0, rel=1e-5)
    assert build("kv_mse")(2 * s, 2 * t, mask).item() == pytest.approx(5.0, rel=1e-5)
    assert build("kv_mse", guard="none")(s, t, torch.tensor([[True, False]])).item() == 1.0


@pytest.mark.parametrize("name", KV_LOSSES)
def test_centred_guard_ignores_constant_offsets_per_feature(name: str) -> None:
    """Qwen2's keys carry a large constant per feature (the k_proj bias): under guard "centred"
    an offset on either side changes nothing; under "variance" the student must reproduce the
    target's. Without offsets the two guards agree when the student's mean is the target's."""
    torch.manual_seed(0)
    s, t, mask = torch.randn(B, H, T, D), torch.randn(B, H, T, D), some_mask()
    offset = 50 * torch.randn(1, H, 1, D)
    centred, variance = build(name, guard="centred"), build(name, guard="variance")
    base = centred(s, t, mask)
    # up to the guard's floor on sigma^2, 1e-6 of the target's mean square (offset included)
    torch.testing.assert_close(centred(s, t + offset, mask), base, rtol=1e-2, atol=0)
    torch.testing.assert_close(centred(s - offset, t, mask), base, rtol=1e-5, atol=1e-6)
    assert variance(s, t + offset, mask) > 2 * variance(s, t, mask)
    m = mask[:, None, :, None]
    mean = lambda x: keep(x, m).sum(dim=(0, 2), keepdim=True) / mask.sum()  # noqa: E731
    same_mean = s - mean(s) + mean(t)
    torch.testing.assert_close(centred(same_mean, t, mask), variance(same_mean, t, mask))


def test_mercator_terms() -> None:
    mask = torch.ones(1, 1, dtype=torch.bool)
    s = torch.tensor([[[[1.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 2.0]]]])
    mercator = build("mercator", guard="none", beta=1.0)
    expected = 1.0 + torch.log(torch.tensor(2.0)).item() ** 2  # 1 - cos 90 degrees + log 2 ^ 2
    assert mercator(s, t, mask).item() == pytest.approx(expected, rel=1e-5)
    assert build("mercator", guard="none", beta=0.0)(s, 3 * s, mask).item() == 0.0


def test_smooth_l1_beta() -> None:
    s, t = torch.zeros(1, 1, 1, 2), torch.tensor([[[[0.5, 3.0]]]])
    loss = build("kv_smooth_l1", guard="none", beta=1.0)(s, t, torch.ones(1, 1, dtype=torch.bool))
    assert loss.item() == pytest.approx((0.125 + 2.5) / 2)


def collapse_run(
    guard: str, loss_name: str = "kv_mse", steps: int = 150, lr: float = 3e-2
) -> dict[str, float]:
    """Teacher->student with both sides learned on random data: the target is
    projector(teacher KV), the student KV is a linear map of a noisy copy of the teacher KV."""
    torch.manual_seed(0)
    projectors = PLUGINS.registry("projectors")
    teacher_shape, student_shape = KVShape(4, 16), KVShape(2, 8)
    teacher = torch.randn(4, 4, 16, 16)
    student_input = teacher + torch.randn_like(teacher)
    cls = projectors.get("head_dim_then_heads")
    projector = cls(cls.Config(), source=teacher_shape, target=student_shape)
    student = projectors.get("linear")(
        projectors.get("linear").Config(), source=teacher_shape, target=student_shape
    )
    torch.nn.init.normal_(student.linear.weight, std=0.1)
    loss_fn = build(loss_name, guard=guard)
    plain_mse = build("kv_mse", guard="none")
    mask = torch.ones(4, 16, dtype=torch.bool)
    params = [*projector.parameters(), *student.parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    losses, variances = [], []
    for _ in range(steps):
        target = projector(teacher)
        loss = loss_fn(student(student_input), target, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        variances.append(target.var().item())
    with torch.no_grad():
        mse = plain_mse(student(student_input), projector(teacher), mask).item()
    teacher_var = teacher.var().item()
    return {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "plain_mse": mse,
        "min_var_fraction": min(variances) / teacher_var,
        "last_var_fraction": variances[-1] / teacher_var,
    }


def test_without_guard_a_learned_target_collapses() -> None:
    run = collapse_run("none")
    assert run["last_loss"] < 0.01  # the KV loss looks solved ...
    assert run["last_var_fraction"] < 0.02  # ... because the target shrank to a constant


@pytest.mark.parametrize("guard", ["variance", "centred"])
@pytest.mark.parametrize("name", KV_LOSSES)
def test_variance_guard_keeps_the_target_spread_while_the_loss_decreases(
    name: str, guard: str
) -> None:
    run = collapse_run(guard, name)
    # the target starts at ~1/2 of the teacher's variance (group mean of 2 random heads)
    assert run["min_var_fraction"] >= 0.25
    assert run["last_loss"] < 0.3 * run["first_loss"]


def test_relation_kl_zero_for_identical_and_free_of_head_count() -> None:
    torch.manual_seed(0)
    loss = build("relation_kl", relation_heads=4)
    k, v = torch.randn(B, 4, T, 16), torch.randn(B, 4, T, 16)
    mask = some_mask()
    assert loss(k, v, k, v, mask).item() == 0.0
    as_2x32 = lambda x: x.transpose(1, 2).reshape(B, T, 2, 32).transpose(1, 2)  # noqa: E731
    tk, tv = torch.randn(B, 1, T, 64), torch.randn(B, 1, T, 64)
    a = loss(k, v, tk, tv, mask)
    b = loss(as_2x32(k), as_2x32(v), tk, tv, mask)
    assert a.item() > 0
    torch.testing.assert_close(a, b)
    k2 = k.clone()
    k2[~mask[:, None, :].expand(B, 4, T)] = float("nan")
    torch.testing.assert_close(loss(k2, v, tk, tv, mask), a)
    s = k.clone().requires_grad_()
    empty = loss(s, v, tk, tv, torch.zeros(B, T, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0 and s.grad is not None and torch.isfinite(s.grad).all()


def test_relation_kl_is_causal() -> None:
    torch.manual_seed(0)
    loss = build("relation_kl", relation_heads=2)
    k, v = torch.randn(1, 2, T, 8), torch.randn(1, 2, T, 8)
    mask = torch.ones(1, T, dtype=torch.bool)
    k2 = k.clone()
    k2[:, :, -1] = 5.0  # only the last token changes: earlier rows cannot see it
    tk, tv = torch.randn(1, 2, T, 8), torch.randn(1, 2, T, 8)
    only_first = mask.clone()
    only_first[:, -1] = False
    torch.testing.assert_close(loss(k, v, tk, tv, only_first), loss(k2, v, tk, tv, only_first))


def test_relation_kl_plan_error() -> None:
    loss = build("relation_kl", relation_heads=3)
    with pytest.raises(PlanError, match="relation_heads=3"):
        loss(*[torch.randn(1, 2, 3, 8)] * 4, torch.ones(1, 3, dtype=torch.bool))


def test_logit_kd() -> None:
    torch.manual_seed(0)
    kd = build("logit_kd", temperature=2.0)
    s, t = torch.randn(B, T, 10), torch.randn(B, T, 10)
    mask = some_mask()
    assert kd(s, s.clone(), mask).item() == 0.0
    expected = F.kl_div(
        F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none"
    ).sum(-1)
    assert kd(s, t, mask).item() == pytest.approx(expected[mask].mean().item() * 4, rel=1e-5)
    with pytest.raises(PlanError) as info:
        kd(s, torch.randn(B, T, 12), mask)
    assert info.value.hint is not None and "uld" in info.value.hint


def test_uld() -> None:
    torch.manual_seed(0)
    uld = build("uld")
    s = torch.randn(B, T, 10)
    mask = some_mask()
    assert uld(s, s.clone(), mask).item() == 0.0
    assert uld(s, s.flip(-1), mask).item() == pytest.approx(0.0, abs=1e-6)  # order-free
    t = torch.randn(B, T, 14, requires_grad=False)
    student = s.clone().requires_grad_()
    value = uld(student, t, mask)
    value.backward()
    assert value.item() > 0 and student.grad is not None
    # hand example: [1, 0] vs [0.5, 0.25, 0.25] -> |1 - .5| + |0 - .25| + |0 - .25| = 1
    one = torch.tensor([[[20.0, -20.0]]])
    three = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    assert uld(one, three, torch.ones(1, 1, dtype=torch.bool)).item() == pytest.approx(1.0)


def uld_by_autograd(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, tau: float) -> Any:
    """ULD written with autograd over full [B, T, V] tensors: the reference of the chunked one."""
    m = mask[..., None]
    p_s = F.softmax(keep(s.float(), m) / tau, dim=-1).sort(dim=-1, descending=True).values
    p_t = F.softmax(keep(t.float(), m) / tau, dim=-1).sort(dim=-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = F.pad(p_t, (0, width - p_t.shape[-1]))
    return masked_mean((p_s - p_t).abs().sum(dim=-1), mask)


@pytest.mark.parametrize("chunk", [None, 2 * 17])  # one chunk; 2 rows per chunk
@pytest.mark.parametrize(("vs", "vt", "tau"), [(10, 17, 1.0), (17, 10, 2.0), (12, 12, 0.5)])
def test_uld_chunked_gradient_matches_autograd(
    vs: int, vt: int, tau: float, chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ULD forms its gradient in forward, chunk by chunk; value and gradient equal autograd's
    (student vocabulary larger or smaller than the teacher's), masked rows may hold NaN."""
    if chunk:
        monkeypatch.setitem(rowwise.CHUNK_ELEMENTS, "cpu", chunk)
    torch.manual_seed(0)
    mask = some_mask()
    s = (3 * torch.randn(B, T, vs)).requires_grad_()
    t = 3 * torch.randn(B, T, vt)
    ref_s = s.detach().clone().requires_grad_()
    expected = uld_by_autograd(ref_s, t, mask, tau)
    (1.5 * expected).backward()
    nan_s = s.detach().clone()
    nan_s[~mask] = float("nan")
    nan_s.requires_grad_()
    value = build("uld", temperature=tau)(nan_s, t.masked_fill(~mask[..., None], torch.nan), mask)
    (1.5 * value).backward()
    torch.testing.assert_close(value, expected)
    assert nan_s.grad is not None and ref_s.grad is not None
    torch.testing.assert_close(nan_s.grad, ref_s.grad)
    bf16 = s.detach().bfloat16().requires_grad_()
    build("uld")(bf16, t.bfloat16(), mask).backward()
    assert bf16.grad is not None and bf16.grad.dtype == torch.bfloat16


def test_uld_peak_memory_is_a_fraction_of_autograds() -> None:
    """At a 3-teacher run's shapes (SmolLM2's 49152 tokens against Qwen's 151936), chunking
    keeps ULD's forward and backward to the gradient buffer and a chunk's temporaries: the
    peak of tensor bytes (torch.profiler) is below a fifth of the autograd formula's."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.memory_plan import tensor_peak_mb

    torch.manual_seed(0)
    s = torch.randn(2, 64, 49152)
    t = torch.randn(2, 64, 151936)
    mask = torch.ones(2, 64, dtype=torch.bool)
    peaks = []
    for fn in (lambda x: uld_by_autograd(x, t, mask, 1.0), lambda x: build("uld")(x, t, mask)):
        x = s.clone().requires_grad_()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(x).backward()
        peaks.append(tensor_peak_mb(prof))
    autograd_mb, chunked_mb = peaks
    assert chunked_mb < autograd_mb / 5, peaks


def test_ce_matches_torch_cross_entropy() -> None:
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]]])
    ids = torch.tensor([[0, 1, 2]])
    ce = build("ce")
    expected = F.cross_entropy(logits[0, :2], ids[0, 1:])
    assert ce(logits, ids, torch.ones(1, 3, dtype=torch.bool)).item() == pytest.approx(
        expected.item()
    )
    only_first = torch.tensor([[True, True, False]])  # the target token 2 is masked
    assert ce(logits, ids, only_first).item() == pytest.approx(
        F.cross_entropy(logits[0, :1], ids[0, 1:2]).item()
    )
    assert ce(logits, ids, torch.zeros(1, 3, dtype=torch.bool)).item() == 0.0


def test_masked_mean_ignores_nan_in_masked_elements() -> None:
    values = torch.tensor([[1.0, float("nan"), 3.0]])
    assert masked_mean(values, torch.tensor([[True, False, True]])).item() == 2.0


@pytest.mark.parametrize("name", ["logit_kd", "uld", "ce"])
def test_logit_losses_ignore_masked_positions(name: str) -> None:
    torch.manual_seed(0)
    loss = build(name)
    mask = some_mask()
    s, t = torch.randn(B, T, 10), torch.randn(B, T, 10)
    if name == "ce":  # CE masks by the target token: logits at t predict token t+1
        other, t2 = torch.randint(0, 10, (B, T)), None
        hidden = torch.cat([~mask[:, 1:], torch.zeros(B, 1, dtype=torch.bool)], dim=1)
    else:
        other, hidden = t, ~mask
        t2 = t.clone()
        t2[hidden] = float("nan")
    base = loss(s, other, mask)
    s2 = s.clone()
    s2[hidden] = float("nan")
    s2.requires_grad_()
    value = loss(s2, other if t2 is None else t2, mask)
    torch.testing.assert_close(value, base)
    value.backward()
    assert s2.grad is not None and torch.isfinite(s2.grad).all()


@pytest.mark.parametrize("chunk", [None, 3 * 13])  # one chunk; 3 rows per chunk
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_logit_kd_gradient_matches_autograd_of_the_formula(
    tau: float, chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row-wise KD forms its gradient in the forward pass; it must equal autograd's."""
    if chunk:
        monkeypatch.setitem(rowwise.CHUNK_ELEMENTS, "cpu", chunk)
    torch.manual_seed(0)
    mask = some_mask()
    s = torch.randn(B, T, 13, requires_grad=True)
    t = torch.randn(B, T, 13)
    value = build("logit_kd", temperature=tau)(s, t, mask)
    (2.5 * value).backward()
    ref_s = s.detach().clone().requires_grad_()
    kl = F.kl_div(
        F.log_softmax(ref_s / tau, -1),
        F.log_softmax(t / tau, -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    (2.5 * kl[mask].mean() * tau**2).backward()
    torch.testing.assert_close(value, kl[mask].mean() * tau**2)
    assert s.grad is not None and ref_s.grad is not None
    torch.testing.assert_close(s.grad, ref_s.grad)
    bf16 = s.detach().bfloat16().requires_grad_()
    build("logit_kd")(bf16, t.bfloat16(), mask).backward()
    assert bf16.grad is not None and bf16.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("chunk", [None, 2 * 11])
def test_ce_gradient_matches_torch(chunk: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if chunk:
        monkeypatch.setitem(rowwise.CHUNK_ELEMENTS, "cpu", chunk)
    torch.manual_seed(0)
    mask = some_mask()
    s = torch.randn(B, T, 11, requires_grad=True)
    ids = torch.randint(0, 11, (B, T))
    value = build("ce")(s, ids, mask)
    (0.5 * value).backward()
    ref_s = s.detach().clone().requires_grad_()
    valid = mask[:, 1:]
    ref = F.cross_entropy(ref_s[:, :-1][valid], ids[:, 1:][valid])
    (0.5 * ref).backward()
    torch.testing.assert_close(value, ref)
    assert s.grad is not None and ref_s.grad is not None
    torch.testing.assert_close(s.grad, ref_s.grad)
    with pytest.raises(RuntimeError, match="differentiated once"):
        again = build("ce")(s, ids, mask)
        again.backward(retain_graph=True)
        again.backward()


def test_next_token_nll_matches_cross_entropy_per_position() -> None:
    torch.manual_seed(0)
    logits = torch.randn(B, T, 9)
    ids = torch.randint(0, 9, (B, T))
    valid = some_mask()[:, 1:]
    ref = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none") * valid
    torch.testing.assert_close(next_token_nll(logits, ids, valid), ref)
    poisoned = logits.clone()
    poisoned[:, :-1][~valid] = float("nan")
    poisoned.requires_grad_()
    value = next_token_nll(poisoned, ids, valid)
    torch.testing.assert_close(value, ref)
    value.sum().backward()
    assert poisoned.grad is not None and torch.isfinite(poisoned.grad).all()


@pytest.mark.parametrize("chunk", [None, 3 * 13])
def test_rowwise_group_equals_the_weighted_sum_of_its_losses(
    chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CE and two logit KD terms in one pass with one gradient buffer: the same total, means
    and gradient as each loss through autograd."""
    if chunk:
        monkeypatch.setitem(rowwise.CHUNK_ELEMENTS, "cpu", chunk)
    torch.manual_seed(0)
    mask = some_mask()
    s = torch.randn(B, T, 13, requires_grad=True)
    ids = torch.randint(0, 13, (B, T))
    t1, t2 = torch.randn(B, T, 13), torch.randn(B, T, 13).bfloat16()
    t2_mask = mask.clone()
    t2_mask[0, 0] = False
    ce, kd1, kd2 = build("ce"), build("logit_kd"), build("logit_kd", temperature=2.0)
    poisoned = t2.clone()
    poisoned[~t2_mask] = float("nan")  # rows KD leaves out but CE counts: nothing may leak
    terms = [
        ce.row_term(s, ids, mask),
        kd1.row_term(s, t1, mask),
        kd2.row_term(s, poisoned, t2_mask),
    ]
    for term, w in zip(terms, [0.5, 0.3, 0.2], strict=True):
        term.weight = w
    total, means = rowwise.rowwise_group(s, terms)
    (3.0 * total).backward()
    ref_s = s.detach().clone().requires_grad_()
    parts = [ce(ref_s, ids, mask), kd1(ref_s, t1, mask), kd2(ref_s, t2, t2_mask)]
    separate = [
        F.cross_entropy(ref_s[:, :-1][mask[:, 1:]], ids[:, 1:][mask[:, 1:]]),
        (
            F.kl_div(
                F.log_softmax(ref_s, -1), F.log_softmax(t1, -1), log_target=True, reduction="none"
            ).sum(-1)
        )[mask].mean(),
        (
            F.kl_div(
                F.log_softmax(ref_s / 2, -1),
                F.log_softmax(t2.float() / 2, -1),
                log_target=True,
                reduction="none",
            ).sum(-1)
        )[t2_mask].mean()
        * 4,
    ]
    for mean, part, ref in zip(means, parts, separate, strict=True):
        torch.testing.assert_close(mean, ref)
        torch.testing.assert_close(part.detach(), ref.detach())
    (3.0 * (0.5 * separate[0] + 0.3 * separate[1] + 0.2 * separate[2])).backward()
    torch.testing.assert_close(total.detach(), 0.5 * means[0] + 0.3 * means[1] + 0.2 * means[2])
    assert s.grad is not None and ref_s.grad is not None
    torch.testing.assert_close(s.grad, ref_s.grad)


@pytest.mark.parametrize("chunk", [None, 2 * 13])
def test_rowwise_group_on_logits_at_real_tokens_only(
    chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `index`, logits [N, V] at the real tokens give the value and (at those rows) the
    gradient of the full [B, T, V] logits; padding rows, NaN in the targets, never reach them."""
    if chunk:
        monkeypatch.setitem(rowwise.CHUNK_ELEMENTS, "cpu", chunk)
    torch.manual_seed(0)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 3:] = False
    kd_mask = mask.clone()
    kd_mask[0, 1] = False  # a row CE counts and KD does not
    index = mask.flatten().nonzero().squeeze(1)
    full = torch.randn(B, T, 13, requires_grad=True)
    ids = torch.randint(0, 13, (B, T))
    teacher = torch.randn(B, T, 13).bfloat16()
    teacher[~kd_mask] = float("nan")

    def group(logits: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        terms = [
            build("ce").row_term(logits, ids, mask),
            build("logit_kd", temperature=2.0).row_term(logits, teacher, kd_mask),
        ]
        terms[1].weight = 0.3
        return rowwise.rowwise_group(logits, terms, index)[0]

    want = group(full, None)
    want.backward()
    packed = full.detach().flatten(0, 1)[index].requires_grad_()
    got = group(packed, index)
    got.backward()
    torch.testing.assert_close(got, want)
    assert full.grad is not None and packed.grad is not None
    torch.testing.assert_close(packed.grad, full.grad.flatten(0, 1)[index])
    assert torch.isfinite(packed.grad).all()


def test_softmax_lse_reads_the_first_column_and_falls_back_to_the_maximum() -> None:
    """logsumexp from the softmax's first column; a chunk where that column is negligible
    (far below the rest, or -inf) takes the row maximum instead. Both match torch."""
    torch.manual_seed(0)
    x = torch.randn(5, 1000) * 4
    for first in (None, -200.0, float("-inf")):
        if first is not None:
            x[2, 0] = first
        out = torch.empty_like(x)
        lse = rowwise.softmax_lse(x, out)
        torch.testing.assert_close(lse, torch.logsumexp(x, -1))
        torch.testing.assert_close(out, torch.softmax(x, -1))
        # the accelerator's form, row by row (no host read), gives the same values
        torch.testing.assert_close(rowwise.lse_by_rows(x, out), torch.logsumexp(x, -1))


def test_softmax_lse_off_the_cpu_reads_no_value() -> None:
    # on the meta device any read of a value raises, as a host read would stall a GPU
    x = torch.empty(4, 100, device="meta")
    assert rowwise.softmax_lse(x, torch.empty_like(x)).shape == (4,)
