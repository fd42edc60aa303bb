"""Model geometry: the config facts that fix KV shapes, read without loading weights.

Every reader turns its input into a transformers config (`AutoConfig`) and reads the geometry from
that, so per-layer RoPE and layer types come out as the model itself will use them:
`read_hf_dir` (config.json), `kvd.spec.gguf_header.read_gguf` (GGUF header),
`kvd.spec.presets.read_preset` (kvd/spec/presets/*.yaml) and `geometry_from_dict` (an inline
config such as a tiny student's).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from kvd.core.errors import KvdError
from kvd.core.types import KVShape

KVLayout = Literal["MHA", "GQA", "MQA"]
FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class RopeGeometry:
    """Rotary embedding of one layer type.

    theta: base frequency; scaling: rope_type and its parameters when not plain ("default");
    partial_rotary_factor: fraction of head_dim that is rotated (1.0 = all).
    """

    theta: float
    rope_type: str = "default"
    scaling: dict[str, float] = field(default_factory=dict)
    partial_rotary_factor: float = 1.0

    def rotary_dim(self, head_dim: int) -> float:
        """Rotated channels per head (an even integer in every sound model)."""
        return head_dim * self.partial_rotary_factor

    def label(self) -> str:
        """E.g. `theta 1e+06`, `theta 5e+05 llama3 factor=8`, `theta 1e+04 partial 0.25`."""
        text = f"theta {self.theta:g}"
        if self.rope_type != "default":
            params = " ".join(f"{k}={v:g}" for k, v in sorted(self.scaling.items()))
            text += f" {self.rope_type} {params}".rstrip()
        if self.partial_rotary_factor != 1.0:
            text += f" partial {self.partial_rotary_factor:g}"
        return text


@dataclass(frozen=True)
class ModelGeometry:
    """What fixes a causal LM's KV cache shapes: per layer K, V are [B, num_kv_heads, T, head_dim].

    layer_types[i] is "full_attention" or "sliding_attention"; rope maps each layer type to its
    rotary settings (Gemma3 uses theta 1e4 on sliding layers and 1e6 on full ones; empty for a
    model without rotary embeddings). tokenizer_hash: sha256 of the vocabulary in id order when
    known (`tokens_fingerprint`): equal hashes mean identical token ids.
    """

    name: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    layer_types: tuple[str, ...]
    rope: dict[str, RopeGeometry]
    sliding_window: int | None = None
    max_position: int | None = None
    tokenizer_family: str = "unknown"
    adds_bos: bool = True
    tie_embeddings: bool = False
    tokenizer_hash: str | None = None
    hf_config: Any = field(default=None, compare=False, repr=False)
    """The transformers config the geometry was read from (None when built by hand); the
    memory plan instantiates it on the meta device to count parameters."""

    @property
    def kv_layout(self) -> KVLayout:
        """MHA when every query head has its own KV head, MQA with one KV head, else GQA."""
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @property
    def kv_shape(self) -> KVShape:
        """One layer's KV geometry: num_kv_heads heads of head_dim."""
        return KVShape(self.num_kv_heads, self.head_dim)

    @property
    def gqa_ratio(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def facts(self) -> dict[str, Any]:
        """Every field as JSON-ready values, without `hf_config`."""
        data = asdict(replace(self, hf_config=None))
        del data["hf_config"]
        return data

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes of K and V of all layers for one token (bf16 = 2 bytes per value)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_value

    def rope_of_layer(self, layer: int) -> RopeGeometry:
        return self.rope[self.layer_types[layer]]


@dataclass(frozen=True)
class TokenizerFacts:
    """What a geometry says about the tokenizer: a family label, a vocabulary hash, BOS."""

    family: str = "unknown"
    sha256: str | None = None
    adds_bos: bool = True


def tokens_fingerprint(tokens: Iterable[str]) -> str:
    """sha256 over tokens in id order, each as u64 length + UTF-8 bytes (GGUF's array layout)."""
    digest = hashlib.sha256()
    for token in tokens:
        data = token.encode("utf-8")
        digest.update(struct.pack("<Q", len(data)))
        digest.update(data)
    return digest.hexdigest()


# --- from a transformers config -----------------------------------------------------------------


def config_from_dict(data: Mapping[str, Any], *, where: str) -> Any:
    """A transformers config from an HF config dict (`model_type` plus keyword arguments)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import (  # type: ignore[attr-defined]
        CONFIG_MAPPING_NAMES,
    )

    kwargs = dict(data)
    model_type = kwargs.pop("model_type", None)
    if not isinstance(model_type, str):
        raise KvdError(f"{where}: no model_type", hint="add e.g. `model_type: llama`")
    if model_type not in CONFIG_MAPPING_NAMES:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING_NAMES), n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else "use a transformers model_type"
        raise KvdError(f"{where}: unknown model_type {model_type!r}", hint=hint)
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"):
        kwargs.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except Exception as exc:  # transformers' validation of user-given values
        raise KvdError(f"{where}: invalid {model_type} config: {_first_line(exc)}") from None


def geometry_from_config(
    config: Any, *, name: str, tokenizer: TokenizerFacts, where: str
) -> ModelGeometry:
    """The geometry of a transformers config (its decoder text config for multimodal models)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise KvdError(
            f"{where}: model_type {config.model_type!r} is not a causal language model",
            hint="teachers and the student must be decoder LMs (AutoModelForCausalLM)",
        )
    text = config.get_text_config(decoder=True)
    n_layers = _positive(text, "num_hidden_layers", where)
    n_heads = _positive(text, "num_attention_heads", where)
    n_kv = getattr(text, "num_key_value_heads", None) or n_heads  # default only: MHA
    hidden = _positive(text, "hidden_size", where)
    head_dim = getattr(text, "head_dim", None) or hidden // n_heads
    if n_kv < 1 or n_heads % n_kv:
        raise KvdError(
            f"{where}: num_attention_heads {n_heads} is not a multiple of "
            f"num_key_value_heads {n_kv}"
        )
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None) or [SLIDING if window else FULL] * n_layers
    if len(types) != n_layers:
        raise KvdError(f"{where}: layer_types has {len(types)} entries, not {n_layers}")
    return ModelGeometry(
        name=name,
        architecture=str(text.model_type),
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=int(n_kv),
        head_dim=int(head_dim),
        hidden_size=hidden,
        vocab_size=_positive(text, "vocab_size", where),
        layer_types=tuple(types),
        rope=_rope(text, set(types), where),
        sliding_window=int(window) if window and SLIDING in types else None,
        max_position=getattr(text, "max_position_embeddings", None),
        tokenizer_family=tokenizer.family,
        adds_bos=tokenizer.adds_bos,
        tie_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        tokenizer_hash=tokenizer.sha256,
        hf_config=config,
    )


def geometry_from_dict(
    data: Mapping[str, Any], *, name: str, tokenizer: TokenizerFacts, where: str
) -> ModelGeometry:
    """The geometry of an HF config dict, e.g. an inline tiny config of a spec."""
    return geometry_from_config(
        config_from_dict(data, where=where), name=name, tokenizer=tokenizer, where=where
    )


_ROPE_KEYS = {"rope_theta", "rope_type", "type", "partial_rotary_factor"}


def _rope(text: Any, types: set[str], where: str) -> dict[str, RopeGeometry]:
    params = getattr(text, "rope_parameters", None)
    if not params:
        return {}
    per_type = params if all(isinstance(v, dict) for v in params.values()) else None
    default_partial = float(getattr(text, "partial_rotary_factor", None) or 1.0)
    rope = {}
    for layer_type in sorted(types):
        p = per_type.get(layer_type) if per_type is not None else params
        if not p or "rope_theta" not in p:
            raise KvdError(f"{where}: no rope_theta for layers of type {layer_type!r}")
        rope[layer_type] = RopeGeometry(
            theta=float(p["rope_theta"]),
            rope_type=str(p.get("rope_type", "default")),
            scaling={
                k: float(v)
                for k, v in p.items()
                if k not in _ROPE_KEYS and isinstance(v, int | float) and not isinstance(v, bool)
            },
            partial_rotary_factor=float(p.get("partial_rotary_factor", default_partial)),
        )
    return rope


def _positive(config: Any, key: str, where: str) -> int:
    value = getattr(config, key, None)
    if not isinstance(value, int) or value < 1:
        raise KvdError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(exc).__name__


# --- readers ------------------------------------------------------------------------------------


def read_hf_dir(
    path: Path, *, trust_remote_code: bool = False, revision: str | None = None
) -> ModelGeometry:
    """The geometry of a local HF model directory (config.json, tokenizer files); no weights."""
    return geometry_from_config(
        hf_dir_config(path, trust_remote_code=trust_remote_code, revision=revision),
        name=path.resolve().name,
        tokenizer=tokenizer_facts_from_dir(path),
        where=str(path / "config.json"),
    )


def hf_dir_config(
    path: Path, *, trust_remote_code: bool = False, revision: str | None = None
) -> Any:
    """The transformers config of a local HF model directory; errors name the path."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import (  # type: ignore[attr-defined]
        CONFIG_MAPPING_NAMES,
    )

    if not path.exists():
        raise KvdError(f"{path}: no such directory", hint="check the model path")
    if not path.is_dir():
        hint = "a .gguf file is read with `source: gguf`" if path.suffix == ".gguf" else None
        raise KvdError(f"{path}: not a directory (expected an HF model directory)", hint=hint)
    config_path = path / "config.json"
    raw = _read_json(config_path, missing=f"{path}: no config.json, not an HF model directory")
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES and not trust_remote_code:
        if "auto_map" in raw:
            raise KvdError(
                f"{config_path}: model_type {model_type!r} needs the model's own code",
                hint="set trust_remote_code: true and pin revision: <commit> after reading it",
            )
        return config_from_dict(raw, where=str(config_path))  # raises with a did-you-mean
    try:
        return AutoConfig.from_pretrained(
            str(path),
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            revision=revision,
        )
    except Exception as exc:  # transformers' validation of the file's values
        raise KvdError(f"{config_path}: invalid config: {_first_line(exc)}") from None


def tokenizer_facts_from_dir(path: Path) -> TokenizerFacts:
    """Tokenizer family, vocabulary hash and BOS behaviour from tokenizer(.json/_config.json)."""
    config = _read_json(path / "tokenizer_config.json", missing=None)
    spec = _read_json(path / "tokenizer.json", missing=None)
    label = str(config.get("tokenizer_class") or "").removesuffix("Fast").removesuffix("Tokenizer")
    model = spec.get("model") or {}
    family = "/".join(p for p in (label.lower(), str(model.get("type") or "").lower()) if p)
    if not family:
        return TokenizerFacts(family="none (no tokenizer files)", adds_bos=False)
    adds_bos = config.get("add_bos_token")
    if adds_bos is None:
        template = (spec.get("post_processor") or {}).get("single") or []
        adds_bos = bool(template) and "SpecialToken" in template[0]
    return TokenizerFacts(family=family, sha256=_vocab_hash(spec), adds_bos=bool(adds_bos))


def _vocab_hash(spec: dict[str, Any]) -> str | None:
    vocab = (spec.get("model") or {}).get("vocab")
    by_id: dict[int, str] = {}
    if isinstance(vocab, dict):
        by_id = {int(i): str(tok) for tok, i in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
        by_id = {i: str(item[0]) for i, item in enumerate(vocab)}
    by_id.update({int(t["id"]): str(t["content"]) for t in spec.get("added_tokens") or []})
    if not by_id:
        return None
    return tokens_fingerprint(by_id.get(i, "") for i in range(max(by_id) + 1))


def _read_json(path: Path, *, missing: str | None) -> dict[str, Any]:
    if not path.exists():
        if missing is None:
            return {}
        raise KvdError(missing, hint="point at a directory with config.json, or use a .gguf file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KvdError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise KvdError(f"{path}: expected a JSON object")
    return data
