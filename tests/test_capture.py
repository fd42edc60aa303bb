"""KV capture and RoPE alignment on tiny random models of every supported architecture."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest
import torch
import transformers as tf

from kvd.align.rope import Unrotate
from kvd.modeling.capture import Capture, capture_kv, unpack_rows
from kvd.modeling.rotary import layer_tables, position_ids, rotate
from kvd.run.assemble import checkpoint_activations

B, T, LAYERS = 2, 12, 4
SIZES: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
H, HKV, D = 4, 2, 8
ALTERNATING = ["sliding_attention", "full_attention"] * 2


def rope(**extra: float) -> dict[str, Any]:
    """transformers 5 `rope_parameters`: default RoPE, theta 1e4, plus `extra`."""
    return {"rope_type": "default", "rope_theta": 1e4, **extra}


def _proj(out: torch.Tensor) -> torch.Tensor:
    """k_proj output [B, T, H_kv * D] -> [B, H_kv, T, D]."""
    return out.view(*out.shape[:2], -1, D).transpose(1, 2)


def _phi3(out: torch.Tensor) -> torch.Tensor:
    """Fused qkv_proj output [B, T, (H + 2 H_kv) D] -> the keys [B, H_kv, T, D]."""
    return _proj(out[..., H * D : (H + HKV) * D])


def _neox(out: torch.Tensor) -> torch.Tensor:
    """query_key_value output [B, T, H * 3D] (per head: q, k, v) -> the keys [B, H, T, D]."""
    return out.view(*out.shape[:2], H, 3 * D).chunk(3, dim=-1)[1].transpose(1, 2)


@dataclass(frozen=True)
class Arch:
    """A tiny config, the module whose output is layer i's key before RoPE, and its reshape."""

    config: Callable[[], Any]
    pre_key: str
    to_heads: Callable[[torch.Tensor], torch.Tensor]


ARCHS: dict[str, Arch] = {
    "llama": Arch(lambda: tf.LlamaConfig(**SIZES), "model.layers.{}.self_attn.k_proj", _proj),
    "qwen2": Arch(lambda: tf.Qwen2Config(**SIZES), "model.layers.{}.self_attn.k_proj", _proj),
    "qwen3": Arch(
        lambda: tf.Qwen3Config(**SIZES, head_dim=D),
        "model.layers.{}.self_attn.k_norm",
        lambda out: out.transpose(1, 2),
    ),
    "mistral": Arch(lambda: tf.MistralConfig(**SIZES), "model.layers.{}.self_attn.k_proj", _proj),
    "gemma2": Arch(
        lambda: tf.Gemma2Config(**SIZES, head_dim=D, sliding_window=16, layer_types=ALTERNATING),
        "model.layers.{}.self_attn.k_proj",
        _proj,
    ),
    "gemma3": Arch(
        lambda: tf.Gemma3TextConfig(
            **SIZES, head_dim=D, sliding_window=16, layer_types=ALTERNATING
        ),
        "model.layers.{}.self_attn.k_norm",
        lambda out: out,
    ),
    "phi3": Arch(
        lambda: tf.Phi3Config(**SIZES, rope_parameters=rope(partial_rotary_factor=0.5)),
        "model.layers.{}.self_attn.qkv_proj",
        _phi3,
    ),
    "gpt_neox": Arch(
        lambda: tf.GPTNeoXConfig(
            **{**SIZES, "num_key_value_heads": H}, rope_parameters=rope(partial_rotary_factor=0.25)
        ),
        "gpt_neox.layers.{}.attention.query_key_value",
        _neox,
    ),
}


@cache
def tiny(arch: str) -> Any:
    """A random eval-mode float32 model; biases and norm weights randomised so they matter."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(ARCHS[arch].config(), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def batch(t: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 64, (B, t), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones(B, t, dtype=torch.bool)


def pre_rope_keys(model: Any, arch: str, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's key before RoPE, read off the projection (or k_norm) with forward hooks."""
    spec = ARCHS[arch]
    seen: list[torch.Tensor] = []
    handles = [
        model.get_submodule(spec.pre_key.format(i)).register_forward_hook(
            lambda _m, _a, out: seen.append(spec.to_heads(out))
        )
        for i in range(LAYERS)
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_equals_cache(arch: str) -> None:
    model = tiny(arch)
    ids, mask = batch()
    got = capture_kv(model, ids, mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert got.kv.layers == list(range(LAYERS)) and not got.kv.pre_rope
    assert torch.equal(got.logits, out.logits)
    for i, layer in enumerate(out.cache.layers):
        assert torch.equal(got.kv.keys[i], layer.keys)
        assert torch.equal(got.kv.values[i], layer.values)


@pytest.mark.parametrize("arch", ARCHS)
def test_unrotated_keys_are_the_projections(arch: str) -> None:
    model = tiny(arch)
    ids, mask = batch()
    cached = capture_kv(model, ids, mask).kv
    pre = Unrotate(Unrotate.Config()).apply(cached, model)
    assert pre.pre_rope and pre.values is cached.values
    tables = layer_tables(model, position_ids(mask), cached.layers)
    for i, (want, key) in enumerate(zip(pre_rope_keys(model, arch, ids), pre.keys, strict=True)):
        assert (key - want).abs().max() < 1e-5
        assert (rotate(key, *tables[i]) - cached.keys[i]).abs().max() < 1e-5


def test_model_without_rope_is_captured_but_not_unrotated() -> None:
    config = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    ids, mask = batch()
    got = capture_kv(model, ids, mask)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    assert torch.equal(got.kv.keys[1], out.cache.layers[1].keys)
    with pytest.raises(ValueError, match="no rotary embedding"):
        Unrotate(Unrotate.Config()).apply(got.kv, model)


def test_sliding_layers_are_recorded_in_full() -> None:
    model = tiny("gemma3")
    ids, mask = batch(t=20)  # longer than the sliding window of 16
    got = capture_kv(model, ids, mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    for key, layer in zip(got.kv.keys, out.cache.layers, strict=True):
        kept = layer.keys.shape[2]
        assert key.shape[2] == 20 and torch.equal(key[:, :, -kept:], layer.keys)
    assert out.cache.layers[0].keys.shape[2] < 20


@pytest.mark.parametrize("arch", ARCHS)
def test_right_padding_keeps_real_positions(arch: str) -> None:
    model = tiny(arch)
    ids, mask = batch()
    mask[0, 7:] = False
    padded = capture_kv(model, ids, mask)
    alone = capture_kv(model, ids[:1, :7], mask[:1, :7])
    assert torch.equal(padded.kv.mask, mask)
    got = [*padded.kv.keys, *padded.kv.values]
    want = [*alone.kv.keys, *alone.kv.values]
    for row, alone_row in zip(got, want, strict=True):
        assert (row[:1, :, :7] - alone_row).abs().max() < 1e-5
    assert (padded.logits[:1, :7] - alone.logits).abs().max() < 1e-4


def test_layer_subset_in_requested_order() -> None:
    model = tiny("gemma3")
    ids, mask = batch()
    full = capture_kv(model, ids, mask)
    part = capture_kv(model, ids, mask, layers=[3, 0])
    assert part.kv.layers == [3, 0]
    assert torch.equal(part.kv.keys[0], full.kv.keys[3])
    assert torch.equal(part.kv.values[1], full.kv.values[0])


@pytest.mark.parametrize("layers", [[4], [-1], [1, 1]])
def test_bad_layers_are_refused(layers: list[int]) -> None:
    ids, mask = batch()
    with pytest.raises(ValueError, match="layers"):
        capture_kv(tiny("llama"), ids, mask, layers=layers)


def test_teacher_capture_has_no_grad() -> None:
    model = tiny("llama")
    ids, mask = batch()
    got = capture_kv(model, ids, mask)
    assert all(p.requires_grad for p in model.parameters())
    tensors = [*got.kv.keys, *got.kv.values, got.logits]
    assert not any(t.requires_grad for t in tensors)


def student_grads(arch: str, checkpointing: bool) -> tuple[Capture, dict[str, torch.Tensor], int]:
    """Capture with grad, backprop a loss on K/V only; the grads and k_proj's forward count."""
    model = tf.AutoModelForCausalLM.from_config(ARCHS[arch].config(), dtype=torch.float32)
    model.load_state_dict(tiny(arch).state_dict())
    model.train()
    if checkpointing:
        checkpoint_activations(model)
    calls = []
    model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda *_: calls.append(1))
    ids, mask = batch()
    got = capture_kv(model, ids, mask, grad=True, layers=[1, 3])
    loss = sum(
        (k**2).mean() + v.abs().mean() for k, v in zip(got.kv.keys, got.kv.values, strict=True)
    )
    assert isinstance(loss, torch.Tensor)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return got, grads, len(calls)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gradient_reaches_k_and_v_projections(arch: str) -> None:
    plain, grads, calls = student_grads(arch, checkpointing=False)
    ckpt, ckpt_grads, ckpt_calls = student_grads(arch, checkpointing=True)
    assert (calls, ckpt_calls) == (1, 2)  # checkpointing recomputed layer 1 during backward
    for proj in ("k_proj", "v_proj"):
        name = f"model.layers.1.self_attn.{proj}.weight"
        assert grads[name].abs().sum() > 0
        assert torch.allclose(ckpt_grads[name], grads[name], atol=1e-6)
    assert "model.layers.3.self_attn.k_proj.weight" in ckpt_grads
    assert "model.layers.3.self_attn.q_proj.weight" not in grads | ckpt_grads
    assert all(torch.equal(a, b) for a, b in zip(ckpt.kv.keys, plain.kv.keys, strict=True))


def test_reentrant_checkpointing_is_refused() -> None:
    model = tf.AutoModelForCausalLM.from_config(ARCHS["llama"].config())
    model.train()
    model.activation_checkpointing_enable({"use_reentrant": True})
    ids, mask = batch()
    with pytest.raises(RuntimeError, match="use_reentrant"):
        capture_kv(model, ids, mask, grad=True)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_neox"])  # gemma2 soft-caps its logits
def test_logits_at_rows_only(arch: str) -> None:
    """rows: the LM head maps only the real tokens; the logits and their gradients there equal
    the full forward's, and unpack_rows restores the [B, T, V] layout with zeros at padding."""
    model = tiny(arch)
    ids, mask = batch()
    mask[0, 7:] = False
    rows = mask.flatten().nonzero().squeeze(1)
    seen: list[tuple[int, ...]] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, a, _o: seen.append(tuple(a[0].shape)))
    try:
        full = capture_kv(model, ids, mask, grad=True)
        packed = capture_kv(model, ids, mask, grad=True, rows=rows)
    finally:
        handle.remove()
    assert seen == [(B, T, 32), (len(rows), 32)]
    assert full.logits is not None and packed.logits is not None
    assert packed.logits.shape == (len(rows), 64)
    torch.testing.assert_close(packed.logits, full.logits.flatten(0, 1)[rows])
    weights = torch.randn(len(rows), 64)
    (g_full,) = torch.autograd.grad(
        (full.logits.flatten(0, 1)[rows] * weights).sum(), head.weight, retain_graph=True
    )
    (g_packed,) = torch.autograd.grad((packed.logits * weights).sum(), head.weight)
    torch.testing.assert_close(g_packed, g_full)
    back = unpack_rows(packed.logits, rows, mask.shape)
    assert back.shape == (B, T, 64)
    torch.testing.assert_close(back[mask], full.logits[mask])
    assert not back[~mask].any()


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt_neox"])
def test_captured_kv_never_pins_a_larger_buffer(arch: str) -> None:
    """K/V that are views into a fused qkv output (Phi3, GPT-NeoX) are copied out; tensors that
    span their own storage are kept as they are (no copy)."""
    ids, mask = batch()
    got = capture_kv(tiny(arch), ids, mask)
    for x in [*got.kv.keys, *got.kv.values]:
        assert x.untyped_storage().nbytes() == x.numel() * x.element_size()
