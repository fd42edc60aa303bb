"""Next-token negative log-likelihood without copying the logits.

Logits [B, T, V] are the largest tensor of a step (V = 49152..262144). Selecting valid rows with
a boolean index copies them and its backward scatters into a zeroed copy; transposing to
[B, V, T] for `cross_entropy` sends it down a strided path. Shifting the labels instead keeps
the logits as one [B*T, V] view (3-5x faster on CPU, measured in benchmarks/).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


def next_token_nll(logits: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
    """NLL of ids[:, t+1] under logits[:, t]: logits [B, T, V], ids [B, T] long, valid
    [B, T-1] bool (which targets count) -> [B, T-1] float32, 0 where not valid.

    Rows of invalid targets are zeroed before the softmax, so whatever sits there (even NaN)
    reaches neither the values nor the gradients."""
    b, t, v = logits.shape
    labels = F.pad(ids[:, 1:].masked_fill(~valid, IGNORE), (0, 1), value=IGNORE)  # [B, T]
    rows = F.pad(valid, (0, 1), value=False)[..., None]
    flat = logits.where(rows, logits.new_zeros(())).reshape(b * t, v).float()
    nll = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE, reduction="none")
    return nll.view(b, t)[:, :-1]
