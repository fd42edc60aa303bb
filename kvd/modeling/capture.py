"""Per-layer K and V of any transformers 5 causal LM, with its logits, in one forward pass.

Mechanism: one hook on the attention call. Every attention module of transformers 5 (Llama,
Qwen2/3, Mistral, Gemma2/3, Phi3, GPT-NeoX, ...) looks its kernel up through
`ALL_ATTENTION_FUNCTIONS.get_interface(...)` and calls it as `fn(module, query, key, value, ...)`
with key and value [B, H_kv, T, D] exactly as they are cached: after k_norm (Gemma3, Qwen3), with
the k bias (Qwen2), after RoPE. While a capture is active, the looked-up kernel is wrapped to
record `key` and `value` of the requested layers (`module.layer_idx`) and then run unchanged.
That one mechanism serves teachers and the student alike: it needs no per-architecture knowledge
of projections (fused qkv in Phi3 and GPT-NeoX included), keeps the autograd graph (gradients
reach k_proj / v_proj), and works under activation checkpointing, where transformers drops the
cache. With checkpointing (non-reentrant, the transformers default) the recorded tensors belong
to the first forward and backward recomputes the rest; the hook is off by then, so the
recomputation records nothing. Reentrant checkpointing runs that first forward without autograd,
which would hide the student's K/V from the loss: `capture_kv(grad=True)` refuses it.

Memory: the forward runs with `use_cache=False`, so no DynamicCache is built; only the requested
layers' K/V are kept (2 * B * H_kv * T * D per layer; a view into a fused qkv buffer is copied
so that it does not pin the queries), and under `grad=False` no activation graph. The logits
[B, T, V] are returned in full and are usually the largest output (V = 262144 for Gemma 3).
Sliding-window layers are recorded over all T positions, whereas a cache keeps only the window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvd.core.types import KVBundle
from kvd.modeling.rotary import position_ids


@dataclass
class Capture:
    """One forward pass: K/V of the requested layers (post-RoPE, as cached), logits [B, T, V]
    (or [N, V] at the N flat positions `rows` asked for) and, when asked for, the output
    embedding's input hidden [B, T, d] (the last hidden states, after the final norm)."""

    kv: KVBundle
    logits: torch.Tensor | None
    hidden: torch.Tensor | None = None


def capture_kv(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    layers: list[int] | None = None,
    grad: bool = False,
    logits: bool = True,
    rows: torch.Tensor | None = None,
    hidden: bool = False,
) -> Capture:
    """Run `model` on right-padded input_ids [B, T] (attention_mask [B, T] bool) and record K/V.

    `layers` (default: all, in order) picks model layers; the bundle lists them in that order.
    grad=False (teachers) runs under torch.no_grad; grad=True (the student) keeps the graph so a
    loss on the K/V reaches the projections. The model's train/eval mode is left to the caller.
    logits=False skips the LM head on all but the last position (its cost is large for big
    vocabularies) and leaves `Capture.logits` None. rows [N] long (flat indices into B * T)
    runs the LM head on those positions only and returns logits [N, V]: padding then costs
    the head nothing, forward or backward (the output embedding's input is narrowed by a
    pre-hook, so whatever the model applies after it, e.g. Gemma's soft-capping, still runs).
    hidden=True records that input [B, T, d] as `Capture.hidden`; with logits=False the LM head
    then runs on no position at all.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must both be [B, T]"
        )
    count = model.config.get_text_config().num_hidden_layers
    wanted = list(range(count)) if layers is None else _check_layers(layers, count)
    mask = attention_mask.bool()
    recorder = _Recorder(model, wanted)
    track = grad and torch.is_grad_enabled()
    if hidden and not logits:
        rows = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    head = _Head(model, rows, hidden)
    with torch.set_grad_enabled(track), recorder.active(), head.active():
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids(mask),
            use_cache=False,
            **({} if logits or hidden else {"logits_to_keep": 1}),
        )
    keys, values = recorder.result(model)
    if track and _trainable(model) and not all(k.requires_grad for k in keys):
        raise RuntimeError(
            "captured K/V carry no gradient: reentrant activation checkpointing runs the layers "
            "without autograd; enable it with gradient_checkpointing_kwargs="
            "{'use_reentrant': False} (the transformers default)"
        )
    if logits and rows is not None and out.logits.shape[:-1] != rows.shape:
        raise RuntimeError(
            f"{type(model).__name__}: logits {tuple(out.logits.shape)} for {len(rows)} rows; "
            "its output embedding is not applied once to the last hidden states"
        )
    if hidden and (head.hidden is None or head.hidden.shape[:2] != input_ids.shape):
        raise RuntimeError(
            f"{type(model).__name__}: its output embedding did not see the last hidden states "
            f"[B, T, d] of all {input_ids.shape[1]} positions"
        )
    kv = KVBundle(keys, values, wanted, mask)
    return Capture(kv, out.logits if logits else None, head.hidden)


def unpack_rows(logits: torch.Tensor, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Logits [N, V] at the flat positions rows [N] -> [*shape, V], zeros elsewhere
    (differentiable), for consumers that take the [B, T, V] layout."""
    full = logits.new_zeros(shape.numel(), logits.shape[-1])
    return full.index_copy(0, rows, logits).view(*shape, logits.shape[-1])


class _Head:
    """While active, a pre-hook on the output embedding keeps its input hidden [B, T, d] (when
    `keep`) and narrows it to the flat positions `rows` [N] (when given): its output is then
    [N, V]."""

    def __init__(self, model: Any, rows: torch.Tensor | None, keep: bool) -> None:
        self.model = model
        self.rows = rows
        self.keep = keep
        self.hidden: torch.Tensor | None = None

    def _pre(self, module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, *rest = args
        if self.keep:
            self.hidden = hidden
        if self.rows is None:
            return args
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.rows), *rest)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.rows is None and not self.keep:
            yield
            return
        handle = self.model.get_output_embeddings().register_forward_pre_hook(self._pre)
        try:
            yield
        finally:
            handle.remove()


def _own(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when it spans its whole storage, else a compact copy: a view into a fused
    qkv buffer (Phi3, GPT-NeoX) would keep the queries alive too."""
    if x.untyped_storage().nbytes() <= x.numel() * x.element_size():
        return x
    return x.contiguous()


def _check_layers(layers: list[int], count: int) -> list[int]:
    bad = [i for i in layers if not 0 <= i < count]
    if bad:
        raise ValueError(f"layers {bad} out of range [0, {count})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {layers} repeat an index")
    return list(layers)


def _trainable(model: Any) -> bool:
    return any(p.requires_grad for p in model.parameters())


_ACTIVE: ContextVar[_Recorder | None] = ContextVar("kvd_capture", default=None)


class _Recorder:
    """Collects key/value [B, H_kv, T, D] of chosen layers of one model during one forward."""

    def __init__(self, model: Any, layers: list[int]) -> None:
        wanted = set(layers)
        self.layer_of = {
            id(m): m.layer_idx
            for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and m.layer_idx in wanted
        }
        self.layers = layers
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        _install()
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def wrap(self, kernel: Callable[..., Any]) -> Callable[..., Any]:
        def attend(module: Any, query: Any, key: Any, value: Any, *args: Any, **kw: Any) -> Any:
            layer = self.layer_of.get(id(module))
            if layer is not None:
                if layer in self.kv:
                    raise RuntimeError(f"layer {layer} ran attention twice in one forward")
                self.kv[layer] = (_own(key), _own(value))
            return kernel(module, query, key, value, *args, **kw)

        return attend

    def result(self, model: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        missing = [i for i in self.layers if i not in self.kv]
        if missing:
            raise RuntimeError(
                f"{type(model).__name__}: no K/V recorded for layers {missing}; its attention "
                "does not call transformers' AttentionInterface with a layer_idx"
            )
        return [self.kv[i][0] for i in self.layers], [self.kv[i][1] for i in self.layers]


def _install() -> None:
    """Wrap ALL_ATTENTION_FUNCTIONS.get_interface once; it passes through unless a capture is on."""
    interface: Any = ALL_ATTENTION_FUNCTIONS
    if getattr(interface, "_kvd_capture", False):
        return
    lookup = interface.get_interface

    def get_interface(implementation: Any, default: Callable[..., Any]) -> Callable[..., Any]:
        kernel: Callable[..., Any] = lookup(implementation, default)
        recorder = _ACTIVE.get()
        return kernel if recorder is None else recorder.wrap(kernel)

    interface.get_interface = get_interface
    interface._kvd_capture = True
