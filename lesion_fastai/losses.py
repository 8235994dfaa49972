"""The detector's loss: the centre heatmap's focal loss, box terms named by a string such as
'ciou+diou+giou' at every lesion centre, and the Gaussian head's likelihood term.

Boxes are x1,y1,x2,y2 in image fractions [0, 1], so L1 / MSE are in image fractions and the IoU terms
are torchvision's. Targets are what the DataBlock gives: every lesion's box, padded to a fixed count
([B, 2M, 2] corners or [B, M, 4] boxes in fastai's [-1, 1]) and a [B, M] score, 1 for a real lesion.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from fastai.vision.all import TensorBBox, TensorPoint

from .boxes import box_params, params_to_boxes, targets_to_unit
from .data import TensorScore
from .heatmap import Decoding, centre_cells, focal_loss, heatmap_target

__all__ = ['TERMS', 'BoxLoss', 'gaussian_nll', 'DetectionLoss']

TERMS = {
    'ciou': lambda p, t: complete_box_iou_loss(p, t, reduction='mean'),
    'diou': lambda p, t: distance_box_iou_loss(p, t, reduction='mean'),
    'giou': lambda p, t: generalized_box_iou_loss(p, t, reduction='mean'),
    'l1': F.l1_loss,
    'mse': F.mse_loss,
}
# the same terms per box pair ([n]), for targets of unequal weight
PER_BOX = {
    'ciou': lambda p, t: complete_box_iou_loss(p, t, reduction='none'),
    'diou': lambda p, t: distance_box_iou_loss(p, t, reduction='none'),
    'giou': lambda p, t: generalized_box_iou_loss(p, t, reduction='none'),
    'l1': lambda p, t: F.l1_loss(p, t, reduction='none').mean(-1),
    'mse': lambda p, t: F.mse_loss(p, t, reduction='none').mean(-1),
}


class BoxLoss:
    "Sum of the named terms, e.g. BoxLoss('ciou+diou+giou') or BoxLoss('giou+l1')."
    def __init__(self, spec: str = 'ciou+diou+giou'):
        self.terms = [s.strip().lower() for s in spec.split('+') if s.strip()]
        unknown = [t for t in self.terms if t not in TERMS]
        if unknown or not self.terms:
            raise ValueError(f"loss {spec!r}: unknown term(s) {unknown}; expected terms from {sorted(TERMS)} joined by '+'")
        self.spec = '+'.join(self.terms)

    def __call__(self, pred, targ, weights=None):
        """Mean of each term over [n, 4] box pairs, summed (0, still differentiable, for n = 0); with
        `weights` [n], each term's weighted mean."""
        if not len(pred): return pred.sum() * 0.
        p, t = pred.float(), targ.float()
        if weights is None: return sum(TERMS[name](p, t) for name in self.terms)
        w = weights.float()
        return sum((PER_BOX[name](p, t) * w).sum() / w.sum() for name in self.terms)

    def __repr__(self): return f"BoxLoss('{self.spec}')"


def gaussian_nll(mean: torch.Tensor, std: torch.Tensor, target: torch.Tensor, weights=None) -> torch.Tensor:
    """Mean negative log-likelihood of `target` under independent Normal(`mean`, `std`) per number: the
    Gaussian head's calibration term. It is lowest when `std` equals the typical error |target - mean|,
    so a std trained with it is an uncertainty, where the sampled box's loss alone only shrinks it.
    The mean is detached: box accuracy stays the box loss's job, this term only sets the std. With
    `weights` [n], the weighted mean over the boxes."""
    z = (target - mean.detach()) / std
    nll = std.log() + .5 * z ** 2
    if weights is None: return nll.mean() + .5 * math.log(2 * math.pi)
    w = weights.float()
    return (nll.mean(-1) * w).sum() / w.sum() + .5 * math.log(2 * math.pi)


class DetectionLoss:
    """CenterNet's recipe for every lesion of the slice: `map_weight` times the focal loss of the centre
    heatmap against Gaussian peaks at all lesion centres (`heatmap`), plus the box terms (`spec`) of the
    box at each lesion's centre cell, plus, with `radius` > 0, the box terms of the sizes predicted at
    the cells within `radius` of it, each placed on the lesion's centre (when the peak lands a cell off
    at inference, that cell's size has been trained), plus, for the Gaussian head, `nll_weight` times
    the likelihood of each lesion under its centre cell's mean and std (`gaussian_nll`).

    As fastai's loss function it also decodes a batch of outputs (`decodes`): the best boxes of each
    slice as the model's `decoding` says (the same object: give `decoding=model.decoding`), in the
    layout of the targets (`target`: 'points' or 'bbox', [-1, 1]), with their scores, so
    `learn.predict` and `show_results` get boxes in pixels and scores."""
    def __init__(self, spec: str = 'ciou+diou+giou', map_weight: float = 1., radius: int = 1, nll_weight: float = .1,
                 target: str = 'points', decoding: Decoding | None = None):
        self.box = BoxLoss(spec)
        self.map_weight, self.radius, self.nll_weight = map_weight, radius, nll_weight
        self.target, self.decoding = target, decoding or Decoding()

    def __call__(self, out, y, flags):
        heat, params = out[0], out[1]
        boxes, valid = targets_to_unit(y), flags > 0                               # [B, M, 4] in [0, 1], [B, M]
        weighted = bool(((flags != 0) & (flags != 1)).any())                       # carried or pseudo-labels among the targets
        lesion_w = flags.float() if weighted else None
        B, h, w = heat.shape
        image_w = None if not weighted else torch.where(valid.any(1), lesion_w.amax(1), torch.ones(B, device=flags.device))
        loss = self.map_weight * focal_loss(heat, heatmap_target(boxes, valid, h, w), image_w)
        iy, ix = centre_cells(boxes, h, w)
        rows = torch.arange(B, device=heat.device)[:, None].expand_as(iy)
        cell = iy * w + ix
        targ = boxes[valid]                                                       # [n, 4]
        tw = None if lesion_w is None else lesion_w[valid]
        loss = loss + self.box(params_to_boxes(params[rows, cell][valid]), targ, tw)
        if self.radius > 0: loss = loss + self._size_loss(params, boxes, valid, iy, ix, h, w, lesion_w)
        if len(out) > 3 and self.nll_weight:
            mean, sd = out[2][rows, cell][valid], out[3][rows, cell][valid]
            if len(targ): loss = loss + self.nll_weight * gaussian_nll(mean, sd, box_params(targ), tw)
        return loss

    def _size_loss(self, params, boxes, valid, iy, ix, h, w, lesion_w=None):
        "The box terms on the sizes at the cells around each centre, each box placed on the lesion's centre."
        r = torch.arange(-self.radius, self.radius + 1, device=params.device)
        ny, nx = iy[..., None, None] + r[:, None], ix[..., None, None] + r[None, :]      # [B, M, k, k]
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w) & ~((ny == iy[..., None, None]) & (nx == ix[..., None, None]))
        keep = (inside & valid[..., None, None]).flatten(2)                               # [B, M, k*k]
        cells = (ny.clamp(0, h - 1) * w + nx.clamp(0, w - 1)).flatten(2)
        rows = torch.arange(len(params), device=params.device)[:, None, None].expand_as(cells)
        p = params[rows, cells][keep]                                                     # [n, 4] cx, cy, log w, log h
        t = boxes[..., None, :].expand(*cells.shape, 4)[keep]
        centre = box_params(t)[:, :2]
        tw = None if lesion_w is None else lesion_w[..., None].expand(*cells.shape)[keep]
        return self.box(params_to_boxes(torch.cat([centre, p[:, 2:]], 1)), t, tw)

    def activation(self, out): return out

    def decodes(self, out):
        "A batch of outputs -> (the k best boxes in the targets' layout and [-1, 1], their scores)."
        boxes, scores, _ = self.decoding(out, all_k=True)
        b = boxes * 2 - 1
        b = TensorPoint(b.reshape(len(b), -1, 2)) if self.target == 'points' else TensorBBox(b)
        return b, TensorScore(scores, operating_score=getattr(self.decoding, 'operating_score', None))      # show_results' threshold

    def __setstate__(self, state):  # exports written before the decoding travelled with the model kept k and nms_iou here
        if 'decoding' not in state: state['decoding'] = Decoding(state.pop('k', Decoding.k), state.pop('nms_iou', None))
        self.__dict__.update(state)

    def __repr__(self): return f"DetectionLoss('{self.box.spec}', map_weight={self.map_weight}, radius={self.radius})"
