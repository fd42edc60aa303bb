"""Calibration features for data-driven layer maps (CKA): per-layer K/V of aligned tokens.

The student's features come from its current weights, so a CKA map means most for a student
that already computes something (continued training from a model dir); for a random student the
map reflects its initialisation.
"""

from __future__ import annotations

import torch

from kvd.align.base import LayerCalibration, TokenAligner
from kvd.align.rope import RopeAligner
from kvd.data.tokenize import tokenize
from kvd.modeling.capture import capture_kv
from kvd.spec.models import LoadedModel


def _features(kv_keys: list[torch.Tensor], kv_values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer [B, H, T, D] K and V -> [B, T, 2*H*D] token features."""
    return [
        torch.cat([k.permute(0, 2, 1, 3).flatten(2), v.permute(0, 2, 1, 3).flatten(2)], dim=-1)
        for k, v in zip(kv_keys, kv_values, strict=True)
    ]


@torch.no_grad()
def layer_calibration(
    teacher: LoadedModel,
    student: LoadedModel,
    texts: list[str],
    token_aligner: TokenAligner,
    rope: RopeAligner,
    device: torch.device,
) -> LayerCalibration:
    """Features [N, F] per layer of both models on the N student tokens with a teacher token."""
    s_batch = tokenize(student.tokenizer, texts, add_bos=student.geometry.adds_bos)
    t_batch = tokenize(teacher.tokenizer, texts, add_bos=teacher.geometry.adds_bos)
    s_kv = rope.apply(
        capture_kv(
            student.model, s_batch.input_ids.to(device), s_batch.attention_mask.to(device)
        ).kv,
        student.model,
    )
    t_kv = rope.apply(
        capture_kv(
            teacher.model, t_batch.input_ids.to(device), t_batch.attention_mask.to(device)
        ).kv,
        teacher.model,
    )
    alignment = token_aligner.align(s_batch, t_batch)
    keep = (alignment.mask & s_batch.attention_mask).to(device)
    t_aligned = [
        alignment.gather(f.float().cpu()[:, None]).squeeze(1)  # [B, Tt, F] -> [B, Ts, F]
        for f in _features(t_kv.keys, t_kv.values)
    ]
    return LayerCalibration(
        teacher=[f.to(device)[keep] for f in t_aligned],
        student=[f.float()[keep] for f in _features(s_kv.keys, s_kv.values)],
    )
