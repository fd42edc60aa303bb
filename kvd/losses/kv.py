"""KV losses: student and target in one projected geometry, [B, H, T, D] each, mask [B, T].

Collapse guard. In the teacher->student direction the target is `projector(teacher KV)`, itself
learned, and the student is trained too: a plain MSE is then minimised by both sides shrinking to
a constant (loss ~0, no information). With `guard="variance"` (the default) both sides are
standardised by the target's own batch statistics before the comparison,

    s' = (s - mu) / sigma,  t' = (t - mu) / sigma,

with mu [H, D] the target's per-feature mean and sigma^2 its per-feature variance averaged over
features, both over the valid tokens and with gradients flowing through them. The loss is then
invariant to rescaling both sides together, and a target with little spread is expensive rather
than free: shrinking gains nothing, and a constant target drives sigma to 0 and the loss up.
The joint scale is left to the student, whose KV its own forward pass (and CE) anchors; with both
sides free (tests/test_losses.py) the target's variance drifts up, never toward 0.
`guard="centred"` centres the student by its own per-feature mean instead of the target's: a
constant per-feature offset on either side then costs nothing. Qwen2's keys carry large ones
(the k_proj bias: squared mean up to ~2400x the variance per feature), which under "variance"
the student must first reproduce; for keys such an offset c is meaningless to attention, since
q.(k + c) shifts every score of one query alike and the softmax ignores it.
For MSE this is the error relative to the target's variance (0 = exact, ~1 = no better than the
target's mean); for `mercator` only the centring matters (so a shared constant vector cannot
score cos = 1). The statistics need a batch of several valid tokens.

In the student->teacher direction the target is the teacher's own fixed KV; it cannot collapse,
and `guard="none"` gives the plain loss in the KV's own units.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kvd.losses.base import KVParts, Loss, LossInputs, keep, masked_mean

GUARD_EPS = 1e-6
"""Floor of sigma^2 relative to the target's mean square; `GUARD_EPS**2` is an absolute floor."""


def standardise(
    student: Tensor, target: Tensor, mask: Tensor, *, centre_student: bool = False
) -> tuple[Tensor, Tensor]:
    """Both [B, H, T, D] tensors centred by the target's per-feature mean (the student by its
    own with centre_student) and divided by the target's feature-averaged std, statistics over
    the tokens where mask [B, T] is True (masked tokens must already be 0, so sums over all
    tokens are sums over the valid ones). Under torch.distributed the statistics are those of
    every process's tokens together (global_sum), so N processes standardise as one would."""
    m = mask[:, None, :, None]
    tokens = global_sum(mask.sum())
    count = tokens.clamp_min(1)
    elements = (tokens * (target.numel() // max(m.numel(), 1))).clamp_min(1)  # valid_count
    mu = global_sum(target.sum(dim=(0, 2), keepdim=True)) / count
    var = global_sum(keep((target - mu).square(), m).sum()) / elements
    floor = GUARD_EPS * (global_sum(target.detach().square().sum()) / elements) + GUARD_EPS**2
    sigma = (var + floor).sqrt()
    mu_s = global_sum(student.sum(dim=(0, 2), keepdim=True)) / count if centre_student else mu
    return (student - mu_s) / sigma, (target - mu) / sigma


def global_sum(x: Tensor) -> Tensor:
    """`x` summed over the processes of a torch.distributed run (through autograd when it needs
    gradients: each process's backward then sums the gradients of all processes' losses, and
    DDP's mean over processes makes it the gradient of the mean loss), else `x` itself."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    if x.requires_grad:
        summed: Tensor = dist_nn.all_reduce(x, op=dist.ReduceOp.SUM)
        return summed
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class KVLoss(Loss):
    """Base of the KV losses: `forward(student, target, mask) -> scalar`, mean over valid
    positions (and heads, features); the guard is applied first. `per_position` gives the same
    loss before the mean over positions, [B, T], for weighting positions (loss fusion)."""

    inputs: ClassVar[LossInputs] = "kv"

    class Config(Loss.Config):
        """guard: "variance" standardises both sides by the target's statistics (see module
        docstring); "centred" does the same but centres each side by its own per-feature mean,
        so constant per-feature offsets on either side cost nothing; "none" compares the raw
        tensors. parts: "kv" averages the K and V losses,
        "k" or "v" compares only one of them (the K-only / V-only ablation of `kvd ab`)."""

        guard: Literal["none", "variance", "centred"] = "variance"
        parts: KVParts = "kv"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.guard = config.guard
        self.parts = config.parts

    def forward(self, student: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        return masked_mean(self.per_position(student, target, mask), mask)

    def per_position(self, student: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """The loss at each position [B, T] (mean over heads and features) of [B, H, T, D]
        tensors, guard statistics over the valid positions of mask [B, T]."""
        m = mask[:, None, :, None]
        student, target = keep(student, m), keep(target, m)
        if self.guard != "none":
            student, target = standardise(
                student, target, mask, centre_student=self.guard == "centred"
            )
        return self.compare(student, target, mask)

    def compare(self, student: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """The loss per position [B, T] on (possibly standardised) [B, H, T, D] tensors; values
        at masked positions are ignored."""
        raise NotImplementedError


class KVMSELoss(KVLoss):
    """Mean squared error over valid positions, heads and features."""

    def compare(self, student: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        return (student - target).square().mean(dim=(1, 3))


class KVSmoothL1Loss(KVLoss):
    """Smooth L1 (Huber / beta) over valid positions, heads and features."""

    class Config(KVLoss.Config):
        """beta: where the loss turns from quadratic to linear (in standardised units under
        the variance guard); 0 = L1."""

        beta: float = Field(1.0, ge=0)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.beta = config.beta

    def compare(self, student: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        loss = F.smooth_l1_loss(student, target, reduction="none", beta=self.beta)
        return loss.mean(dim=(1, 3))


class MercatorLoss(KVLoss):
    """The map projection ("Mercator") loss: direction and magnitude of each head's vector apart.

    Per (head, position): (1 - cos(s, t)) + beta * (log||s|| - log||t||)^2, mean over valid
    positions and heads. 1 - cos is computed as ||s/|s| - t/|t|||^2 / 2 (exactly 0 for equal
    vectors); the log-ratio of norms penalises scale errors symmetrically (x2 and /2 cost the same).
    """

    class Config(KVLoss.Config):
        """beta: weight of the log-magnitude term."""

        beta: float = Field(0.1, ge=0)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.beta = config.beta

    def compare(self, student: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        angle = 0.5 * (F.normalize(student, dim=-1) - F.normalize(target, dim=-1)).square()
        tiny = torch.finfo(student.dtype).tiny
        log_ratio = 0.5 * (
            student.square().sum(-1).add(tiny).log() - target.square().sum(-1).add(tiny).log()
        )
        loss = angle.sum(-1) + self.beta * log_ratio.square()  # [B, H, T]
        return loss.mean(dim=1)
