"""`task_attention`: scaled dot-product attention over the teachers, queried by the task.

Shapes: N teachers, B batch, H KV heads, T positions, D head_dim of the comparison space (the
fusion's `kv_dim`), C the router width (`hidden`). At distilled layer l, for an example of task
id s:

    q    = E_task[s] + E_layer[l] + W_q LN(mean_h student)        [B, T, C]
    k_n  = E_teacher[n] + W_k LN(mean_h teacher_n)                [N, B, T, C]
    w_n  = softmax over the valid teachers of q . k_n / sqrt(C)   [B, T, N]

so the weights depend on the task (per layer) and on how the student's and each teacher's K or V
look at that position. The query side (E_task, E_layer, W_q) starts at zero: routing starts
uniform, like `mean`, and the first gradients move the task and layer embeddings. The softmax
over valid teachers and the entropy regulariser (`entropy_weight`, `entropy_target`) are
`kvd.fusion.RoutedFusion`'s, as in the built-in routers.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from kvd.errors import PlanError
from kvd.fusion import FusionInput, RoutedFusion, RouterConfig


class TaskAttentionFusion(RoutedFusion):
    """Task-conditional attention router: a query from the example's task, the layer and the
    student's KV attends over keys from each teacher's learned embedding and KV; needs task
    labels in the data."""

    class Config(RouterConfig):
        """hidden: width C of the query and key vectors."""

        hidden: int = Field(32, ge=1)

    def __init__(self, config: Config, **sizes: Any) -> None:
        super().__init__(config, **sizes)
        if self.n_tasks < 1:
            raise PlanError(
                "task_attention fusion needs task labels, but the data declares no tasks",
                hint="use a dataset with task labels (stdlib has them), or fusion 'learnable' "
                "with kind: attention",
            )
        c, d = config.hidden, self.kv_dim
        self.task_embedding = nn.Embedding(self.n_tasks, c)
        self.layer_embedding = nn.Embedding(self.n_layers, c)
        self.teacher_embedding = nn.Embedding(self.n_teachers, c)
        self.norm = nn.LayerNorm(d)
        self.query = nn.Linear(d, c)
        self.key = nn.Linear(d, c)
        for zero in (self.task_embedding, self.layer_embedding, self.query):
            for p in zero.parameters():
                nn.init.zeros_(p)
        self.scale = c**-0.5

    def logits(self, inp: FusionInput) -> Tensor:
        """Scaled dot products q . k_n [B, T, N]."""
        if inp.task is None:
            raise PlanError("task_attention fusion got a batch without task ids")
        student = inp.student.mean(dim=-3)  # [B, T, D], or [N, B, T, D] when given per teacher
        if student.dim() == 4:
            student = student.mean(dim=0)
        query = (
            self.query(self.norm(student))
            + self.task_embedding(inp.task)[:, None, :]
            + self.layer_embedding.weight[inp.layer]
        )
        keys = (
            self.key(self.norm(inp.teacher.mean(dim=-3)))
            + self.teacher_embedding.weight[:, None, None, :]
        )
        return torch.einsum("btc,nbtc->btn", query, keys) * self.scale
