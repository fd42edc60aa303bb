"""Loss base class and the masked reduction every loss (and the fusion entropy) uses."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from torch import Tensor, nn

from kvd.core.component import ComponentConfig
from kvd.losses.rowwise import RowTerm

LossInputs = Literal["kv", "kv_raw", "logits", "ce"]
"""What the trainer passes to a loss's forward:

- "kv": (student [B,H,T,D], target [B,H,T,D], mask [B,T]) in one projected geometry;
- "kv_raw": (student_k, student_v [B,Hs,T,Ds], teacher_k, teacher_v [B,Ht,T,Dt], mask [B,T]),
  each side in its own geometry;
- "logits": (student_logits [B,T,Vs], teacher_logits [B,T,Vt] aligned to student positions,
  mask [B,T]);
- "ce": (student_logits [B,T,V], input_ids [B,T], mask [B,T]).
"""

KV_INPUTS: tuple[LossInputs, ...] = ("kv", "kv_raw")
"""The inputs of the losses that compare K/V, layer by layer."""


def keep(x: Tensor, mask: Tensor) -> Tensor:
    """`x` with 0 wherever `mask` (bool, broadcastable to `x`) is False, so whatever sits at
    masked positions (even NaN) reaches neither the value nor the gradients."""
    return x.where(mask, x.new_zeros(()))


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over the elements where `mask` (bool, broadcastable to `values`) is True.

    Masked elements contribute nothing; with no valid element the result is 0, still attached
    to the graph.
    """
    return keep(values, mask).sum() / valid_count(mask, values)


def valid_count(mask: Tensor, values: Tensor) -> Tensor:
    """How many elements of `values` the broadcast `mask` keeps (at least 1): each element of
    the mask stands for numel(values) / numel(mask) of them."""
    return (mask.sum() * (values.numel() // max(mask.numel(), 1))).clamp_min(1)


KVParts = Literal["kv", "k", "v"]
"""Which of a KV loss's keys and values it compares: both (their mean), K only or V only."""


class Loss(nn.Module):
    """A loss term built as `cls(config)`; `inputs` tells the trainer which tensors to pass
    (kvd.step.curriculum interprets it); `parts`, for "kv" losses, which of K and V to compare."""

    inputs: ClassVar[LossInputs]
    parts: KVParts = "kv"
    needs_student_vocab: ClassVar[bool] = False
    """A logit loss that compares token by token: its teachers' logits must be over the
    student's vocabulary (their own, or mapped by alignment.vocab)."""

    class Config(ComponentConfig):
        """No options."""

    def __init__(self, config: Config) -> None:
        super().__init__()

    reads_logit_rows: ClassVar[bool] = False
    """A logit loss whose `row_term` also takes the teacher's logits as rows made on demand
    (kvd.losses.rowwise.Rows, e.g. from the teacher's hidden states: kvd.modeling.head.HeadRows)
    instead of a [B, T, V] tensor."""

    def row_term(self, student_logits: Tensor, other: Any, mask: Tensor) -> RowTerm | None:
        """This loss as a row-wise kernel over the student logits [B, T, V] (CE, logit KD),
        `other` and `mask` as `forward` takes them (or `Rows`, with reads_logit_rows), so that
        the trainer runs all such losses of a step in one pass with one gradient buffer
        (kvd.losses.rowwise); None (the default) when it is not one. `forward` must give the
        same value."""
        del student_logits, other, mask
        return None
