"""Task-conditional fusion: learned teacher weights per (task, layer)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kvd.core.errors import PlanError
from kvd.fusion.base import FusionInput
from kvd.fusion.routed import RoutedFusion, RouterConfig


class TaskConditionalFusion(RoutedFusion):
    """Learned logits per (task, layer, teacher), starting at 0 (uniform); each example is
    routed by its task id (`FusionInput.task`), the same weights at every position."""

    routes_on_features: ClassVar[bool] = False

    class Config(RouterConfig):
        """Only the entropy regulariser options."""

    def __init__(self, config: Config, **sizes: Any) -> None:
        super().__init__(config, **sizes)
        if self.n_tasks < 1:
            raise PlanError(
                "task_conditional fusion needs task labels, but the data declares no tasks",
                hint="use a dataset with task ids, or another fusion",
            )
        self.table = nn.Parameter(torch.zeros(self.n_tasks, self.n_layers, self.n_teachers))

    def logits(self, inp: FusionInput) -> Tensor:
        if inp.task is None:
            raise PlanError("task_conditional fusion got a batch without task ids")
        b, t = inp.mask.shape[1:]
        return self.table[inp.task, inp.layer][:, None, :].expand(b, t, self.n_teachers)
