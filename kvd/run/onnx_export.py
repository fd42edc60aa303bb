"""The student as an ONNX decoder for generation, checked against torch with onnxruntime.

Exported with torch's own exporter (`torch.onnx.export(dynamo=True)`, which needs onnxscript):
it traces transformers' `DynamicCache` as it is, so the graph is the model kvd trained, with no
second export stack (optimum) to keep in step with transformers 5. The inputs and outputs
follow the layout optimum and onnxruntime-genai use for decoders:

- inputs: `input_ids` [B, T] int64, `attention_mask` [B, P+T] int64, `position_ids` [B, T]
  int64, and per layer i `past_key_values.{i}.key` / `.value` [B, kv_heads, P, head_dim] float32
  (P = 0 for the first call);
- outputs: `logits` [B, T, vocab] float32 and per layer `present.{i}.key` / `.value`
  [B, kv_heads, P+T, head_dim], the next call's past.

B, T and P are dynamic. Keys in the cache are already rotated (RoPE at their positions).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from kvd.core.errors import KvdError

TOLERANCE = 1e-4
"""Largest |logit difference| between onnxruntime and torch (float32) that `check_onnx` accepts;
measured differences on the built-in students are about 1e-6."""

NEEDS = ("onnx", "onnxscript", "onnxruntime")
"""Packages of the `onnx` extra: the exporter's (onnx, onnxscript) and the check's runtime."""


def require_onnx() -> None:
    """Raise a KvdError naming the fix when the `onnx` extra is not installed."""
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise KvdError(
            f"--format onnx needs {', '.join(missing)}, which is not installed",
            hint="pip install 'kvd[onnx]'",
        )


class CachedDecoder(nn.Module):
    """A causal LM whose KV cache is plain tensors: forward(input_ids [B, T], attention_mask
    [B, P+T], position_ids [B, T], *past: 2L tensors [B, kv_heads, P, head_dim], keys and values
    of layer 0 .. L-1 interleaved) -> (logits [B, T, vocab], *present: 2L tensors [B, kv_heads,
    P+T, head_dim] in the same order)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.layers = int(model.config.num_hidden_layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        present: list[torch.Tensor] = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def kv_shape(model: PreTrainedModel) -> tuple[int, int]:
    """(kv_heads, head_dim) of the model's cache."""
    config = model.config
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(getattr(config, "num_key_value_heads", None) or heads), int(head_dim)


def io_names(layers: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names (module docstring)."""
    past = [f"past_key_values.{i}.{part}" for i in range(layers) for part in ("key", "value")]
    present = [f"present.{i}.{part}" for i in range(layers) for part in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_onnx(model: PreTrainedModel, path: Path) -> None:
    """Write `model` (float32, eval mode) as the ONNX decoder of the module docstring to `path`
    (one file; weights inline below protobuf's 2 GB limit, else beside it as `path`.data)."""
    require_onnx()
    decoder = CachedDecoder(model.float()).eval()
    layers = decoder.layers
    kv_heads, head_dim = kv_shape(model)
    batch, seq, past_len = 2, 3, 4  # sizes above 1 so that tracing keeps them symbolic
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = [torch.zeros(batch, kv_heads, past_len, head_dim) for _ in range(2 * layers)]
    b, t = torch.export.Dim("batch"), torch.export.Dim("sequence")
    p, total = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
    shapes = ({0: b, 1: t}, {0: b, 1: total}, {0: b, 1: t}, ({0: b, 2: p},) * (2 * layers))
    inputs, outputs = io_names(layers)
    with torch.no_grad(), quiet():
        program = torch.onnx.export(
            decoder,
            (ids, mask, positions, *past),
            dynamic_shapes=shapes,
            input_names=inputs,
            output_names=outputs,
            dynamo=True,
            verbose=False,
        )
        assert program is not None
        program.save(str(path), external_data=not _small(model))


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporter's notes that are not the user's to act on (torchvision absent,
    unused axis names, its own deprecations)."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _small(model: PreTrainedModel) -> bool:
    """True when the float32 weights fit one protobuf (2 GB), with room for the graph."""
    return sum(p.numel() for p in model.parameters()) * 4 < 1.8e9


def check_onnx(path: Path, model: PreTrainedModel, input_ids: torch.Tensor) -> float:
    """Max |logit difference| between onnxruntime running the decoder at `path` and torch's
    `model` on `input_ids` [1, T] (T >= 2): a prefill of the first half, then the rest one token
    at a time through the cache, so the cache inputs and outputs are checked too."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs, _ = io_names(int(model.config.num_hidden_layers))
    kv_heads, head_dim = kv_shape(model)
    with torch.no_grad():
        want = model.float()(input_ids=input_ids, use_cache=False).logits[0].numpy()
    ids = input_ids[0].numpy().astype(np.int64)
    split = max(1, len(ids) // 2)
    past = [np.zeros((1, kv_heads, 0, head_dim), np.float32) for _ in inputs[3:]]
    got: list[Any] = []
    for start, stop in [(0, split)] + [(i, i + 1) for i in range(split, len(ids))]:
        feed = {
            "input_ids": ids[None, start:stop],
            "attention_mask": np.ones((1, stop), np.int64),
            "position_ids": np.arange(start, stop, dtype=np.int64)[None],
            **dict(zip(inputs[3:], past, strict=True)),
        }
        logits, *past = session.run(None, feed)
        got.append(logits[0])
    return float(np.abs(np.concatenate(got) - want).max())
