"""RoPE aligners (stage `rope`): the space in which teacher and student keys are compared.

Cached keys are rotated by position with each model's own RoPE (its theta, its scaling, per
layer type: Gemma3's sliding layers use theta 1e4, its full layers 1e6). Two keys rotated by
different rules are not comparable, and no rescaling fixes that: NTK-style rescaling stretches
one model's frequencies for longer contexts, it does not turn one theta's rotation into another's.
The principled common space is before RoPE: `unrotate` undoes each model's rotation with that
model's own rotary module, at its own positions. Nothing is lost by comparing there: rotation is
orthogonal, so for pre-RoPE keys a, b and the student's rotation R at the student positions,
|Ra - Rb|² = |a - b|² and cos(Ra, Rb) = cos(a, b): MSE and cosine in the pre-RoPE space equal
the comparison after rotating both keys by the same (student) positions. (With a YaRN attention
factor s the tables are s times a rotation: cosine is unchanged, MSE scales by s²; `unrotate`
divides s out, so the pre-RoPE keys are the projections themselves.) Values carry no RoPE and
pass through untouched.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

from kvd.align.base import Aligner
from kvd.core.types import KVBundle
from kvd.modeling.rotary import layer_tables, position_ids, unrotate


class RopeAligner(Aligner):
    """Maps one model's captured keys into the space where keys are compared."""

    stage: ClassVar[str] = "rope"

    def apply(self, bundle: KVBundle, model: Any) -> KVBundle:
        """`bundle` captured from `model` -> the bundle in this aligner's key space."""
        raise NotImplementedError


class Unrotate(RopeAligner):
    """Take keys to pre-RoPE space with the model's own rotary embedding, per layer type."""

    def apply(self, bundle: KVBundle, model: Any) -> KVBundle:
        """Keys [B, H, T, D] un-rotated at positions arange(T) (right padding); pre_rope=True."""
        if bundle.pre_rope:
            return bundle
        tables = layer_tables(model, position_ids(bundle.mask), bundle.layers)
        keys = [unrotate(k, *tables[i]) for k, i in zip(bundle.keys, bundle.layers, strict=True)]
        return replace(bundle, keys=keys, pre_rope=True)


class KeepRotated(RopeAligner):
    """Keep keys post-RoPE, as cached (only sound when teacher and student rotate alike)."""

    def apply(self, bundle: KVBundle, model: Any) -> KVBundle:
        """The bundle unchanged."""
        del model
        return bundle
