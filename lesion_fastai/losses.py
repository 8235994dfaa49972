"""Box regression losses: a sum of terms named by a string such as 'ciou+diou+giou'.

Predictions are [B, 4] x1,y1,x2,y2 in [-1, 1]; targets are whatever the DataBlock gives ([B, 2, 2]
corners or [B, 1, 4] boxes). Both are moved to [0, 1] before the terms, so L1 / MSE are in image
fractions and the IoU terms are torchvision's. `gaussian_nll` is the Gaussian head's likelihood term.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from .boxes import to_unit

__all__ = ['TERMS', 'BoxLoss', 'gaussian_nll']

TERMS = {
    'ciou': lambda p, t: complete_box_iou_loss(p, t, reduction='mean'),
    'diou': lambda p, t: distance_box_iou_loss(p, t, reduction='mean'),
    'giou': lambda p, t: generalized_box_iou_loss(p, t, reduction='mean'),
    'l1': F.l1_loss,
    'mse': F.mse_loss,
}


class BoxLoss:
    "Sum of the named terms, e.g. BoxLoss('ciou+diou+giou') or BoxLoss('giou+l1')."
    def __init__(self, spec: str = 'ciou+diou+giou'):
        self.terms = [s.strip().lower() for s in spec.split('+') if s.strip()]
        unknown = [t for t in self.terms if t not in TERMS]
        if unknown or not self.terms:
            raise ValueError(f"loss {spec!r}: unknown term(s) {unknown}; expected terms from {sorted(TERMS)} joined by '+'")
        self.spec = '+'.join(self.terms)

    def __call__(self, pred, targ):
        p, t = to_unit(pred), to_unit(targ)
        return sum(TERMS[name](p, t) for name in self.terms)

    def __repr__(self): return f"BoxLoss('{self.spec}')"


def gaussian_nll(mean: torch.Tensor, std: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of `target` under independent Normal(`mean`, `std`) per number: the
    Gaussian head's calibration term. It is lowest when `std` equals the typical error |target - mean|,
    so a std trained with it is an uncertainty, where the sampled box's loss alone only shrinks it.
    The mean is detached: box accuracy stays the box loss's job, this term only sets the std."""
    z = (target - mean.detach()) / std
    return (std.log() + .5 * z ** 2).mean() + .5 * math.log(2 * math.pi)
