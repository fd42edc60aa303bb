"""Projector base class, the K/V pair wrapper and the tensor helpers projectors share.

Shapes: B batch, T tokens, Hs/Ds source KV heads/head_dim, Ht/Dt target KV heads/head_dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kvd.core.component import ComponentConfig
from kvd.core.errors import PlanError
from kvd.core.types import KVShape


def shape_text(shape: KVShape) -> str:
    """`12x128` for 12 KV heads of head_dim 128."""
    return f"{shape.heads}x{shape.head_dim}"


def merge_heads(x: Tensor) -> Tensor:
    """[..., H, T, D] -> [..., T, H*D]: each token's heads concatenated into one vector."""
    return x.transpose(-3, -2).flatten(-2)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[..., T, H*D] -> [..., H, T, D], the inverse of `merge_heads`."""
    split: Tensor = x.unflatten(-1, (heads, -1))
    return split.transpose(-3, -2)


def identity_like_(weight: Tensor) -> None:
    """Init a Linear weight [out, in] in place: the identity when square; otherwise
    semi-orthogonal, scaled so each output coordinate keeps the variance of an isotropic input."""
    out_features, in_features = weight.shape
    with torch.no_grad():
        if out_features == in_features:
            nn.init.eye_(weight)
        else:
            nn.init.orthogonal_(weight, gain=max(1.0, (out_features / in_features) ** 0.5))


class Projector(nn.Module):
    """A learned map of one K (or V) tensor from `source` to `target` KV geometry.

    Built as `cls(config, source=..., target=...)`; `forward` maps [B, Hs, T, Ds] ->
    [B, Ht, T, Dt]. Shapes the projector cannot map raise `PlanError` at construction.
    """

    class Config(ComponentConfig):
        """No options."""

    def __init__(self, config: Config, *, source: KVShape, target: KVShape) -> None:
        super().__init__()
        for side, shape in (("source", source), ("target", target)):
            if shape.heads < 1 or shape.head_dim < 1:
                raise PlanError(f"{type(self).__name__}: {side} KV shape {shape} is empty")
        self.source = source
        self.target = target

    def describe(self) -> str:
        """One line for reports, e.g. `head_dim 128->64 linear; heads 12->2 group-mean init`."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _plan_error(self, name: str, needs: str) -> PlanError:
        return PlanError(
            f"projector {name!r} needs {needs}, got {shape_text(self.source)} -> "
            f"{shape_text(self.target)} (heads x head_dim)",
            hint="use projector 'head_dim_then_heads' (the default), 'linear' or "
            "'elastic_bottleneck', which map any shapes",
        )


class KVProjector(nn.Module):
    """Separate K and V projectors of one class and config: `forward(k, v) -> (k', v')`."""

    def __init__(
        self, cls: type[Projector], config: Projector.Config, source: KVShape, target: KVShape
    ) -> None:
        super().__init__()
        self.k = cls(config, source=source, target=target)
        self.v = cls(config, source=source, target=target)

    def forward(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.k(k), self.v(v)

    def describe(self) -> str:
        return f"K and V each: {self.k.describe()}"
