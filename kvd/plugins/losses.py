"""Built-in losses, registered through the same hook as a third-party plugin's."""

from __future__ import annotations

from kvd import losses
from kvd.core.hookspecs import Register, hookimpl


@hookimpl
def register_losses(register: Register) -> None:
    register("kv_mse", losses.KVMSELoss)
    register("kv_smooth_l1", losses.KVSmoothL1Loss)
    register("mercator", losses.MercatorLoss)
    register("relation_kl", losses.RelationKLLoss)
    register("logit_kd", losses.LogitKDLoss)
    register("uld", losses.ULDLoss)
    register("ce", losses.CELoss)
