"""RoPE tables from the model's own rotary module, (un)rotation, and the rope aligners."""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import pytest
import torch
import transformers as tf

from kvd.align.rope import KeepRotated, Unrotate
from kvd.core.manager import registry
from kvd.core.types import KVBundle
from kvd.modeling.rotary import layer_tables, position_ids, rotary_tables, rotate, unrotate

SIZES: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@cache
def gemma3() -> Any:
    """Sliding layers 0, 2 (theta 1e4) and full layers 1, 3 (theta 1e6), head_dim 8."""
    config = tf.Gemma3TextConfig(
        **SIZES,
        num_key_value_heads=2,
        head_dim=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        },
    )
    return tf.AutoModelForCausalLM.from_config(config).eval()


def angles(b: int, t: int, rot: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tables [B, T, rot] in the rotate_half layout (both halves share an angle)."""
    theta = torch.rand(b, t, rot // 2, dtype=torch.float64) * 2 * math.pi
    theta = torch.cat((theta, theta), dim=-1)
    return theta.cos() * scale, theta.sin() * scale


@pytest.mark.parametrize(("rot", "scale"), [(8, 1.0), (4, 1.0), (2, 1.0), (8, 1.3)])
def test_unrotate_inverts_rotate(rot: int, scale: float) -> None:
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    cos, sin = angles(2, 5, rot, scale)
    turned = rotate(x, cos, sin)
    assert torch.allclose(unrotate(turned, cos, sin), x, atol=1e-12)
    assert torch.allclose(rotate(unrotate(x, cos, sin), cos, sin), x, atol=1e-12)
    assert torch.equal(turned[..., rot:], x[..., rot:])  # partial rotary: the tail passes through
    assert not torch.allclose(turned[..., :rot], x[..., :rot])


def test_rotate_keeps_dtype_and_refuses_bad_tables() -> None:
    x = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    cos, sin = angles(1, 3, 8)
    assert rotate(x, cos.float(), sin.float()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="do not fit"):
        rotate(x, *angles(1, 3, 10))


def test_rotation_at_shared_positions_keeps_mse_and_cosine() -> None:
    a = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    b = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    cos, sin = angles(2, 5, 8)
    ra, rb = rotate(a, cos, sin), rotate(b, cos, sin)
    assert torch.allclose(((ra - rb) ** 2).mean(), ((a - b) ** 2).mean(), atol=1e-12)
    cos_pre = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    cos_post = torch.nn.functional.cosine_similarity(ra, rb, dim=-1)
    assert torch.allclose(cos_post, cos_pre, atol=1e-12)


def test_gemma3_tables_follow_each_layer_type() -> None:
    model = gemma3()
    pos = position_ids(torch.ones(2, 6, dtype=torch.bool))
    inv = torch.arange(0, 8, 2, dtype=torch.float64) / 8
    for layer, theta in [(0, 1e4), (1, 1e6), (2, 1e4), (3, 1e6)]:
        cos, sin = rotary_tables(model, pos, layer)
        angle = pos[..., None].double() * theta**-inv
        assert cos.shape == (2, 6, 8) and cos.dtype == torch.float32
        assert torch.allclose(cos.double(), torch.cat((angle, angle), -1).cos(), atol=1e-6)
        assert torch.allclose(sin.double(), torch.cat((angle, angle), -1).sin(), atol=1e-6)


def test_layer_tables_compute_once_per_layer_type() -> None:
    model = gemma3()
    calls = []
    handle = model.model.rotary_emb.register_forward_hook(lambda *_: calls.append(1))
    try:
        tables = layer_tables(model, position_ids(torch.ones(1, 4, dtype=torch.bool)), [3, 0, 1, 2])
    finally:
        handle.remove()
    assert len(calls) == 2
    assert tables[0] is tables[2] and tables[1] is tables[3] and tables[0] is not tables[1]


def test_partial_rotary_tables_are_rot_dim_wide() -> None:
    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}
    model = tf.AutoModelForCausalLM.from_config(tf.GPTNeoXConfig(**SIZES, rope_parameters=rope))
    cos, _ = rotary_tables(model, position_ids(torch.ones(1, 3, dtype=torch.bool)), 0)
    assert cos.shape == (1, 3, 2)  # head_dim 8 * 0.25


def test_layer_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        rotary_tables(gemma3(), torch.zeros(1, 1, dtype=torch.long), 4)


def test_rope_aligners_are_registered_for_the_rope_stage() -> None:
    aligners = registry("aligners")
    assert aligners.get("unrotate") is Unrotate and aligners.get("none") is KeepRotated
    assert Unrotate.stage == KeepRotated.stage == "rope"


def test_aligners_touch_keys_only() -> None:
    model = gemma3()
    mask = torch.ones(1, 4, dtype=torch.bool)
    keys = [torch.randn(1, 2, 4, 8) for _ in range(2)]
    bundle = KVBundle(keys, [torch.randn(1, 2, 4, 8) for _ in range(2)], [0, 1], mask)
    assert KeepRotated(KeepRotated.Config()).apply(bundle, model) is bundle
    pre = Unrotate(Unrotate.Config()).apply(bundle, model)
    assert pre.pre_rope and not bundle.pre_rope and pre.values is bundle.values
    assert not torch.allclose(pre.keys[0][:, :, 1:], keys[0][:, :, 1:])
    assert torch.equal(pre.keys[0][:, :, 0], keys[0][:, :, 0])  # position 0 is not rotated
    assert Unrotate(Unrotate.Config()).apply(pre, model) is pre
