"""Losses of a distillation step; each class says through `inputs` what the trainer passes."""

from kvd.losses.base import Loss, LossInputs, keep, masked_mean
from kvd.losses.ce import CELoss
from kvd.losses.kv import KVLoss, KVMSELoss, KVSmoothL1Loss, MercatorLoss, standardise
from kvd.losses.logits import LogitKDLoss, ULDLoss
from kvd.losses.relation import RelationKLLoss

__all__ = [
    "CELoss",
    "KVLoss",
    "KVMSELoss",
    "KVSmoothL1Loss",
    "LogitKDLoss",
    "Loss",
    "LossInputs",
    "MercatorLoss",
    "RelationKLLoss",
    "ULDLoss",
    "keep",
    "masked_mean",
    "standardise",
]
