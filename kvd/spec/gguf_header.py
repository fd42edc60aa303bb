"""The metadata of a GGUF file, read without touching tensor data.

`gguf.GGUFReader` builds one numpy view per vocabulary string (9 s for Gemma 3's 262k tokens on
this machine); this reader walks the same layout with `struct` on a memory map (well under 1 s),
using the `gguf` package's constants for value and tensor types. It also checks that every
tensor's bytes lie inside the file, so a truncated download is caught here, not at load time.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
)

from kvd.core.errors import KvdError
from kvd.spec.geometry import ModelGeometry, TokenizerFacts, geometry_from_dict

TOKENS_KEY = "tokenizer.ggml.tokens"
_SCALAR = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_KEEP_ARRAY = 4096
"""Arrays up to this length are kept (per-layer patterns); longer ones only by length."""


@dataclass(frozen=True)
class GGUFHeader:
    """Metadata of one GGUF file.

    fields: key -> scalar, string or short list; array_lengths: key -> length of every array;
    tokens_sha256: sha256 over the vocabulary (each token as u64 length + UTF-8 bytes, in id
    order), comparable with `kvd.spec.geometry.tokens_fingerprint`; tensor_names: every tensor.
    """

    path: Path
    version: int
    fields: dict[str, Any]
    array_lengths: dict[str, int] = field(default_factory=dict)
    tokens_sha256: str | None = None
    tensor_names: frozenset[str] = frozenset()

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


class _Truncated(Exception):
    pass


class _Cursor:
    """Sequential little-endian reads from a buffer; reading past the end raises _Truncated."""

    def __init__(self, buf: mmap.mmap, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos
        self.size = len(buf)

    def unpack(self, fmt: str) -> Any:
        width = struct.calcsize(fmt)
        if self.pos + width > self.size:
            raise _Truncated(f"needs byte {self.pos + width}")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += width
        return value

    def string(self) -> str:
        start = self.skip(int(self.unpack("<Q")))
        return bytes(self.buf[start : self.pos]).decode("utf-8", errors="replace")

    def skip(self, n: int) -> int:
        """Skip `n` bytes; returns where they start."""
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _Truncated(f"needs byte {start + n}")
        self.pos += n
        return start


def read_gguf_header(path: Path) -> GGUFHeader:
    """The metadata of `path`; a missing, non-GGUF, corrupt or truncated file is a KvdError."""
    if not path.exists():
        raise KvdError(f"{path}: no such file", hint="check the path of the .gguf file")
    if not path.is_file():
        raise KvdError(f"{path}: not a file (expected a .gguf file)")
    try:
        with path.open("rb") as fh:
            if path.stat().st_size < 24:
                raise _Truncated("shorter than a GGUF header")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf)
    except _Truncated as exc:
        raise KvdError(
            f"{path}: truncated or corrupt GGUF file ({exc}; the file has "
            f"{path.stat().st_size} bytes)",
            hint="download or assemble the file again",
        ) from None
    except (ValueError, KeyError, OverflowError, struct.error) as exc:
        raise KvdError(
            f"{path}: corrupt GGUF file ({exc})", hint="download the file again"
        ) from None


def _parse(path: Path, buf: mmap.mmap) -> GGUFHeader:
    cur = _Cursor(buf)
    if cur.unpack("<I") != GGUF_MAGIC:
        raise KvdError(f"{path}: not a GGUF file (the first bytes are not 'GGUF')")
    version = int(cur.unpack("<I"))
    if version not in (2, 3):
        raise KvdError(f"{path}: GGUF version {version} is not supported (2 or 3 are)")
    n_tensors, n_fields = int(cur.unpack("<Q")), int(cur.unpack("<Q"))
    fields: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    tokens_sha = None
    for _ in range(n_fields):
        key = cur.string()
        vtype = GGUFValueType(cur.unpack("<I"))
        if vtype != GGUFValueType.ARRAY:
            fields[key] = _value(cur, vtype)
            continue
        etype = GGUFValueType(cur.unpack("<I"))
        count = int(cur.unpack("<Q"))
        start = cur.pos
        lengths[key] = count
        if count <= _KEEP_ARRAY:
            fields[key] = [_value(cur, etype) for _ in range(count)]
        elif etype in _SCALAR:
            cur.skip(count * struct.calcsize(_SCALAR[etype]))
        elif etype == GGUFValueType.STRING:
            for _ in range(count):
                cur.skip(int(cur.unpack("<Q")))
        else:
            raise ValueError(f"{key}: unexpected array of {etype!r}")
        if key == TOKENS_KEY:
            tokens_sha = hashlib.sha256(buf[start : cur.pos]).hexdigest()
    names = _check_tensors(
        cur, n_tensors, int(fields.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    )
    return GGUFHeader(path, version, fields, lengths, tokens_sha, names)


def _value(cur: _Cursor, vtype: GGUFValueType) -> Any:
    if vtype == GGUFValueType.STRING:
        return cur.string()
    if vtype in _SCALAR:
        return cur.unpack(_SCALAR[vtype])
    raise ValueError(f"unexpected metadata value type {vtype!r}")


def _check_tensors(cur: _Cursor, n_tensors: int, alignment: int) -> frozenset[str]:
    """Tensor names; raises _Truncated when a tensor's data would end past the file's end."""
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment} is not a power of two")
    ends: list[tuple[int, str]] = []
    names = set()
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = int(cur.unpack("<I"))
        n_elements = 1
        for _ in range(n_dims):
            n_elements *= int(cur.unpack("<Q"))
        qtype = GGMLQuantizationType(cur.unpack("<I"))
        offset = int(cur.unpack("<Q"))
        block, type_size = GGML_QUANT_SIZES[qtype]
        ends.append((offset + n_elements // block * type_size, name))
        names.add(name)
    data_start = -(-cur.pos // alignment) * alignment
    end, name = max(ends, default=(0, ""))
    if data_start + end > cur.size:
        raise _Truncated(f"tensor {name!r} ends at byte {data_start + end}")
    return frozenset(names)


# --- GGUF metadata -> HF config -----------------------------------------------------------------

_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}
"""GGUF architectures kvd reads, and the transformers model_type each loads as."""

_COMMON = {
    Keys.LLM.BLOCK_COUNT: "num_hidden_layers",
    Keys.LLM.EMBEDDING_LENGTH: "hidden_size",
    Keys.LLM.FEED_FORWARD_LENGTH: "intermediate_size",
    Keys.LLM.CONTEXT_LENGTH: "max_position_embeddings",
    Keys.Attention.HEAD_COUNT: "num_attention_heads",
    Keys.Attention.HEAD_COUNT_KV: "num_key_value_heads",
    Keys.Attention.LAYERNORM_RMS_EPS: "rms_norm_eps",
    Keys.Rope.FREQ_BASE: "rope_theta",
    Keys.LLM.VOCAB_SIZE: "vocab_size",
}
_EXTRA = {
    "llama": {Keys.Rope.DIMENSION_COUNT: "head_dim"},
    "gemma2": {
        Keys.Attention.KEY_LENGTH: "head_dim",
        Keys.Attention.SLIDING_WINDOW: "sliding_window",
    },
    "gemma3": {
        Keys.Attention.KEY_LENGTH: "head_dim",
        Keys.Attention.SLIDING_WINDOW: "sliding_window",
    },
}
"""Only the keys transformers' GGUF loader reads, so the geometry is that of the model kvd runs
(its loader, for instance, keeps Gemma 3's default sliding pattern and local theta 1e4)."""


def hf_config_dict(header: GGUFHeader) -> dict[str, Any]:
    """The HF config dict (model_type + kwargs) transformers builds from this header."""
    arch = header.get(Keys.General.ARCHITECTURE)
    if arch not in _MODEL_TYPES:
        raise KvdError(
            f"{header.path}: GGUF architecture {arch!r} is not supported",
            hint=f"kvd reads {', '.join(sorted(_MODEL_TYPES))}; convert other models to an HF dir",
        )
    model_type = _MODEL_TYPES[arch]
    if arch == "llama" and "mistral" in str(header.get(Keys.General.NAME, "")).lower():
        model_type = "mistral"  # as transformers does: llama.cpp stores Mistral as llama
    config: dict[str, Any] = {"model_type": model_type}
    for template, hf_key in {**_COMMON, **_EXTRA.get(arch, {})}.items():
        key = template.format(arch=arch)
        if key in header.fields:
            config[hf_key] = _uniform(header, key)
    for required in ("num_hidden_layers", "hidden_size", "num_attention_heads"):
        if required not in config:
            raise KvdError(f"{header.path}: GGUF metadata lacks the {required} key of {arch}")
    if "vocab_size" not in config and TOKENS_KEY in header.array_lengths:
        config["vocab_size"] = header.array_lengths[TOKENS_KEY]
    config["tie_word_embeddings"] = "output.weight" not in header.tensor_names
    return config


def _uniform(header: GGUFHeader, key: str) -> Any:
    """A metadata value; a per-layer list must hold one value (kvd models one KV shape)."""
    value = header.fields[key]
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise KvdError(f"{header.path}: {key} differs between layers, which kvd cannot model")
        return value[0]
    return value


def tokenizer_facts(header: GGUFHeader) -> TokenizerFacts:
    """Family `model/pre` (e.g. gpt2/smollm), vocabulary hash and BOS behaviour of the header."""
    model = str(header.get("tokenizer.ggml.model", "unknown"))
    pre = header.get("tokenizer.ggml.pre")
    adds_bos = header.get("tokenizer.ggml.add_bos_token")
    return TokenizerFacts(
        family=f"{model}/{pre}" if pre else model,
        sha256=header.tokens_sha256,
        adds_bos=bool(model == "llama" if adds_bos is None else adds_bos),  # llama.cpp's default
    )


def read_gguf(path: Path) -> ModelGeometry:
    """The geometry of a GGUF file from its header (fast: no tensor is read)."""
    header = read_gguf_header(path)
    return geometry_from_dict(
        hf_config_dict(header),
        name=str(header.get("general.name") or path.stem),
        tokenizer=tokenizer_facts(header),
        where=str(path),
    )
