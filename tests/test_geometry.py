"""Geometry readers: HF dir, GGUF header, presets, inline configs; the real teachers' headers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from kvd.core.errors import KvdError
from kvd.sources.byte_tokenizer import byte_tokenizer, byte_tokenizer_facts
from kvd.spec.geometry import (
    FULL,
    SLIDING,
    TokenizerFacts,
    geometry_from_dict,
    read_hf_dir,
    tokens_fingerprint,
)
from kvd.spec.gguf_header import read_gguf
from kvd.spec.presets import load_preset, preset_names, read_preset
from tests.conftest import write_tiny_gguf

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 300,
    "max_position_embeddings": 256,
    "rope_theta": 50000.0,
    "tie_word_embeddings": True,
}


def write_hf_dir(path: Path, config: dict[str, object]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


# --- HF directory -------------------------------------------------------------------------------


def test_hf_dir_reads_kv_heads_head_dim_and_rope(tmp_path: Path) -> None:
    g = read_hf_dir(write_hf_dir(tmp_path / "m", TINY_LLAMA))
    assert (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim) == (3, 4, 2, 16)
    assert (g.hidden_size, g.vocab_size, g.max_position) == (32, 300, 256)
    assert g.kv_layout == "GQA" and g.gqa_ratio == 2 and g.tie_embeddings
    assert g.layer_types == (FULL,) * 3
    assert g.rope[FULL].theta == 50000.0 and g.rope[FULL].partial_rotary_factor == 1.0
    assert g.kv_bytes_per_token() == 2 * 3 * 2 * 16 * 2
    assert g.tokenizer_family.startswith("none")  # no tokenizer files in the dir


def test_kv_heads_default_to_query_heads_never_the_reverse(tmp_path: Path) -> None:
    config = {k: v for k, v in TINY_LLAMA.items() if k != "num_key_value_heads"}
    g = read_hf_dir(write_hf_dir(tmp_path / "mha", config))
    assert (g.num_heads, g.num_kv_heads, g.kv_layout) == (4, 4, "MHA")
    seed_bug = dict(TINY_LLAMA, num_attention_heads=12, num_key_value_heads=2, hidden_size=96)
    g = read_hf_dir(write_hf_dir(tmp_path / "gqa", seed_bug))
    assert (g.num_heads, g.num_kv_heads, g.gqa_ratio) == (12, 2, 6)


def test_head_dim_field_wins_over_hidden_over_heads(tmp_path: Path) -> None:
    g = read_hf_dir(write_hf_dir(tmp_path / "m", dict(TINY_LLAMA, head_dim=64)))
    assert g.head_dim == 64  # hidden 32 / 4 heads would say 8
    qwen = {k: v for k, v in TINY_LLAMA.items() if k != "head_dim"} | {"model_type": "qwen2"}
    assert read_hf_dir(write_hf_dir(tmp_path / "q", qwen)).head_dim == 8


def test_hf_dir_rope_parameters_per_layer_type(tmp_path: Path) -> None:
    """transformers 5 style: Gemma3's `rope_parameters` is a dict per layer type."""
    config = {
        "model_type": "gemma3_text",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "vocab_size": 300,
        "sliding_window": 128,
        "layer_types": [SLIDING, SLIDING, SLIDING, FULL],
        "rope_parameters": {
            SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
            FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
    }
    g = read_hf_dir(write_hf_dir(tmp_path / "g", config))
    assert g.layer_types == (SLIDING, SLIDING, SLIDING, FULL)
    assert g.rope_of_layer(0).theta == 1e4 and g.rope_of_layer(3).theta == 1e6
    assert g.rope[FULL].rope_type == "linear" and g.rope[FULL].scaling == {"factor": 8.0}
    assert g.sliding_window == 128


def test_hf_dir_tokenizer_facts_match_the_tokenizer_saved_there(tmp_path: Path) -> None:
    path = write_hf_dir(tmp_path / "m", TINY_LLAMA)
    byte_tokenizer().save_pretrained(str(path))
    g = read_hf_dir(path)
    assert g.tokenizer_hash == byte_tokenizer_facts().sha256
    assert "bpe" in g.tokenizer_family


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda p: p, "no such directory"),
        (lambda p: p.mkdir() or p, "no config.json"),
        (lambda p: write_hf_dir(p, {"model_type": "vit"}), "not a causal language model"),
        (lambda p: write_hf_dir(p, {"model_type": "lama"}), "unknown model_type 'lama'"),
        (lambda p: write_hf_dir(p, {"hidden_size": 3}), "no model_type"),
        (lambda p: write_hf_dir(p, dict(TINY_LLAMA, num_key_value_heads=3)), "not a multiple"),
    ],
)
def test_hf_dir_errors_name_the_place(tmp_path: Path, setup: object, expected: str) -> None:
    path = setup(tmp_path / "model")  # type: ignore[operator]
    with pytest.raises(KvdError, match=expected) as info:
        read_hf_dir(path)
    assert str(tmp_path / "model") in info.value.message


def test_hf_dir_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text("{not json")
    with pytest.raises(KvdError, match=r"config\.json: not valid JSON"):
        read_hf_dir(path)


# --- GGUF header --------------------------------------------------------------------------------


def test_gguf_header_llama(tiny_gguf: Path) -> None:
    g = read_gguf(tiny_gguf)
    assert (g.architecture, g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim) == (
        "llama",
        2,
        4,
        2,
        8,
    )
    assert (g.hidden_size, g.vocab_size, g.max_position) == (32, 259, 128)
    assert g.tie_embeddings  # no output.weight tensor
    assert g.tokenizer_family == "gpt2/default" and g.adds_bos
    assert g.name == "tiny llama"
    symbols = [bytes_to_unicode()[b] for b in range(256)]
    assert g.tokenizer_hash == tokens_fingerprint([*symbols, "ab", "<s>", "</s>"])


def test_gguf_header_gemma3_sliding_pattern_and_two_thetas(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "g.gguf", arch="gemma3", layers=7, heads=2, kv_heads=1)
    g = read_gguf(path)
    assert g.architecture == "gemma3_text"
    assert g.layer_types == (SLIDING,) * 5 + (FULL, SLIDING)
    assert g.rope[SLIDING].theta == 1e4 and g.rope[FULL].theta == 1e4  # GGUF: freq_base 1e4
    assert g.sliding_window == 16 and g.kv_layout == "MQA"


@pytest.mark.parametrize("keep", [10, 100, 3000, -1])
def test_truncated_gguf_is_a_kvd_error_naming_the_file(
    tiny_gguf: Path, tmp_path: Path, keep: int
) -> None:
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(KvdError, match="truncated or corrupt GGUF") as info:
        read_gguf(cut)
    assert str(cut) in info.value.message


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(KvdError, match="not a GGUF file"):
        read_gguf(path)
    with pytest.raises(KvdError, match="no such file"):
        read_gguf(tmp_path / "missing.gguf")


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "x.gguf", arch="rwkv6")
    with pytest.raises(KvdError, match="architecture 'rwkv6' is not supported"):
        read_gguf(path)


# --- real teachers (header only: fast) ----------------------------------------------------------


def test_smollm2_header(smollm2_gguf: Path) -> None:
    g = read_gguf(smollm2_gguf)
    assert (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim) == (30, 9, 3, 64)
    assert (g.vocab_size, g.hidden_size, g.tie_embeddings, g.adds_bos) == (49152, 576, True, False)
    assert g.rope[FULL].theta == 1e5 and g.tokenizer_family == "gpt2/smollm"


def test_gemma3_header(gemma3_gguf: Path) -> None:
    g = read_gguf(gemma3_gguf)
    assert (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim) == (18, 4, 1, 256)
    assert (g.vocab_size, g.hidden_size, g.kv_layout) == (262144, 640, "MQA")
    assert [i for i, t in enumerate(g.layer_types) if t == FULL] == [5, 11, 17]
    assert (g.rope[SLIDING].theta, g.rope[FULL].theta, g.sliding_window) == (1e4, 1e6, 512)


# --- presets and inline configs -----------------------------------------------------------------


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_reads(name: str) -> None:
    g = read_preset(name)
    assert g.name == name and g.num_layers > 0 and g.num_heads % g.num_kv_heads == 0
    assert set(g.rope) == set(g.layer_types)
    assert load_preset(name).repo


def test_preset_facts() -> None:
    q = read_preset("Qwen2-7B")
    assert (q.num_layers, q.num_heads, q.num_kv_heads, q.head_dim) == (28, 28, 4, 128)
    assert (q.gqa_ratio, q.rope[FULL].theta, q.tie_embeddings) == (7, 1e6, False)
    t = read_preset("TinyLlama-1.1B")
    assert (t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim, t.vocab_size) == (
        22,
        32,
        4,
        64,
        32000,
    )
    s = read_preset("Qwen2-1.5B")
    assert (s.num_heads, s.num_kv_heads, s.head_dim) == (12, 2, 128)
    g = read_preset("Gemma-3-270M")
    assert (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim, g.hidden_size) == (
        18,
        4,
        1,
        256,
        640,
    )
    assert g.layer_types.count(FULL) == 3 and g.layer_types.count(SLIDING) == 15
    assert (g.rope[SLIDING].theta, g.rope[FULL].theta, g.sliding_window) == (1e4, 1e6, 512)
    assert read_preset("Gemma-2-2B").layer_types[:2] == (SLIDING, FULL)
    assert read_preset("Mistral-7B").layer_types == (SLIDING,) * 32
    assert read_preset("Phi-3-mini").kv_layout == "MHA"
    assert read_preset("Llama-3-8B").rope[FULL].theta == 5e5


def test_preset_lookup_is_case_insensitive_with_did_you_mean() -> None:
    assert read_preset("qwen2-7b").name == "Qwen2-7B"
    with pytest.raises(KvdError, match="unknown preset 'Qwen2-7'") as info:
        read_preset("Qwen2-7")
    assert info.value.hint is not None and "did you mean Qwen2-7B" in info.value.hint


def test_inline_partial_rotary() -> None:
    config = {
        "model_type": "phi3",
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "partial_rotary_factor": 0.5,
    }
    g = geometry_from_dict(config, name="p", tokenizer=TokenizerFacts(), where="inline")
    assert g.rope[FULL].partial_rotary_factor == 0.5 and g.rope[FULL].rotary_dim(16) == 8


def test_inline_invalid_values_are_kvd_errors() -> None:
    with pytest.raises(KvdError, match="inline: invalid llama config"):
        geometry_from_dict(
            dict(TINY_LLAMA, num_hidden_layers="x"),
            name="x",
            tokenizer=TokenizerFacts(),
            where="inline",
        )
