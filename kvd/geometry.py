"""Model geometry: the config facts that fix KV shapes, read without loading weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

KVLayout = Literal["MHA", "GQA", "MQA"]


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


@dataclass(frozen=True)
class ModelGeometry:
    """What fixes a causal LM's KV cache shapes: per layer K, V are [B, num_kv_heads, T, head_dim].

    layer_types[i] is "full_attention" or "sliding_attention"; rope maps each layer type to its
    rotary settings (Gemma3 uses theta 1e4 on sliding layers and 1e6 on full ones).
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

    @property
    def kv_layout(self) -> KVLayout:
        """MHA when every query head has its own KV head, MQA with one KV head, else GQA."""
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @property
    def gqa_ratio(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes of K and V of all layers for one token (bf16 = 2 bytes per value)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_value

    def rope_of_layer(self, layer: int) -> RopeGeometry:
        return self.rope[self.layer_types[layer]]
