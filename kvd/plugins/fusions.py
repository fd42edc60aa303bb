"""Built-in fusions, registered through the same hook as a third-party plugin's."""

from __future__ import annotations

from kvd import fusion
from kvd.core.hookspecs import Register, hookimpl


@hookimpl
def register_fusions(register: Register) -> None:
    register("fixed", fusion.FixedFusion)
    register("mean", fusion.MeanFusion)
    register("similarity", fusion.SimilarityFusion)
    register("learnable", fusion.LearnableFusion)
    register("task_conditional", fusion.TaskConditionalFusion)
    register("topk", fusion.TopKFusion)
    register("lowest_ce", fusion.LowestCEFusion)
