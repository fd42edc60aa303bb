"""Built-in aligners, registered through the same hook as a third-party plugin's."""

from __future__ import annotations

from kvd.align.control import ShuffledTokenAligner
from kvd.align.layers import CKALayerAligner, ExplicitLayerAligner, UniformLayerAligner
from kvd.align.time import ResampleAligner, SegmentResampleAligner
from kvd.align.tokens import HardTokenAligner, SoftTokenAligner
from kvd.align.vocab import FirstTokenVocab, OwnVocab
from kvd.core.hookspecs import Register, hookimpl


@hookimpl
def register_aligners(register: Register) -> None:
    register("soft", SoftTokenAligner)
    register("hard", HardTokenAligner)
    register("shuffled", ShuffledTokenAligner)
    register("resample", ResampleAligner)
    register("segment_resample", SegmentResampleAligner)
    register("uniform", UniformLayerAligner)
    register("explicit", ExplicitLayerAligner)
    register("cka", CKALayerAligner)
    register("own", OwnVocab)
    register("first_token", FirstTokenVocab)
