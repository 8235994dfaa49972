"""CenterNet's centre heatmap: targets splatted at every lesion centre, the penalty-reduced focal loss,
and decoding a head's maps into scored boxes (peaks by 3x3 max-pooling, top K, optionally NMS): the
one decoding of training (the validation FROC), evaluation, `learn.predict` and `lesion_fastai.predict`.

Conventions: maps are [B, h, w] over the image at a stride (4 by default); boxes are x1,y1,x2,y2 in
image fractions [0, 1]; `valid` [B, M] marks the real lesions among the M padded target slots.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from .boxes import params_to_boxes

__all__ = ['centre_cells', 'heatmap_target', 'focal_loss', 'peaks', 'suppress', 'detections', 'Decoding', 'TTF_ALPHA', 'KEEP',
           'MIN_SCORE', 'NMS_IOU']

# Gaussian spread of a target peak: std = TTF_ALPHA * side / 6 in each direction (TTFNet's elliptical
# Gaussian; the peak stays 1 at the centre cell and falls to ~0.1 at the box's edge).
TTF_ALPHA = .54

# What a detector keeps per slice for evaluation, as MULAN does: at most 50 boxes, score at least 0.05.
# Peaks of the heatmap are already one per 3x3 cells; NMS is off unless asked for.
KEEP, MIN_SCORE, NMS_IOU = 50, .05, None
DRAWN_SCORE = .3   # the threshold of drawn boxes for a model without an operating point


def centre_cells(boxes: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    "Map row and column of each box's centre, [B, M] each (long)."
    cx, cy = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
    return (cy * h).long().clamp(0, h - 1), (cx * w).long().clamp(0, w - 1)


def heatmap_target(boxes: torch.Tensor, valid: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h, w] target: for each valid box an elliptical Gaussian peaking at exactly 1 on its centre
    cell, std TTF_ALPHA / 6 of the box's width and height (at least a third of a cell); the maximum
    where lesions overlap."""
    B, M = valid.shape
    iy, ix = centre_cells(boxes, h, w)
    sx = ((boxes[..., 2] - boxes[..., 0]) * w * TTF_ALPHA / 6).clamp(min=1 / 3)             # [B, M] in cells
    sy = ((boxes[..., 3] - boxes[..., 1]) * h * TTF_ALPHA / 6).clamp(min=1 / 3)
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype)[None, None, :, None]
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype)[None, None, None, :]
    g = torch.exp(-((xs - ix[..., None, None]) ** 2) / (2 * sx[..., None, None] ** 2)
                  - ((ys - iy[..., None, None]) ** 2) / (2 * sy[..., None, None] ** 2))       # [B, M, h, w]
    g = g * valid[..., None, None].to(g.dtype)
    return g.amax(1) if M else torch.zeros(B, h, w, device=boxes.device)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, weights=None, alpha: float = 2., beta: float = 4.) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss, summed and divided by the number of centres
    (cells where the target is 1; at least one): near a centre the negative term is damped by
    (1 - target) ** beta, so a peak one cell off costs little. With `weights` [B], each image's terms
    and centres count that much (images whose targets are carried or pseudo-labels)."""
    logits, target = logits.float(), target.float()
    p = torch.sigmoid(logits)
    pos = target.eq(1).float()
    log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
    if weights is None:
        pos_loss = -(log_p * (1 - p) ** alpha * pos).sum()
        neg_loss = -(log_1mp * p ** alpha * (1 - target) ** beta * (1 - pos)).sum()
        return (pos_loss + neg_loss) / pos.sum().clamp(min=1)
    per_image = -(log_p * (1 - p) ** alpha * pos + log_1mp * p ** alpha * (1 - target) ** beta * (1 - pos)).flatten(1).sum(1)
    w = weights.float()
    centres = (pos.flatten(1).sum(1) * w).sum()
    return (per_image * w).sum() / torch.where(centres > 0, centres, torch.ones_like(centres))


def peaks(heat: torch.Tensor, k: int = 50, kernel: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` highest local maxima of a score map [B, h, w] (a cell that equals the max of its
    `kernel` x `kernel` neighbourhood): (scores [B, k], flat cell indices [B, k]). Cells that are not
    peaks score 0, so a map with fewer than `k` peaks pads with zero scores."""
    B, h, w = heat.shape
    pooled = F.max_pool2d(heat[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
    kept = heat * (heat == pooled)
    scores, cells = kept.flatten(1).topk(min(k, h * w), dim=1)
    return scores, cells


def suppress(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Non-maximum suppression per image with `torchvision.ops.batched_nms`: scores of suppressed boxes
    [B, K] become 0 (shapes stay fixed)."""
    B, K = scores.shape
    flat, idx = boxes.reshape(-1, 4).float(), torch.arange(B, device=boxes.device).repeat_interleave(K)
    keep = batched_nms(flat, scores.reshape(-1).float(), idx, iou)
    mask = torch.zeros(B * K, dtype=torch.bool, device=boxes.device)
    mask[keep] = True
    return scores * mask.view(B, K)


def detections(out, k: int = KEEP, nms_iou: float | None = None, min_score: float = 0.):
    """The `k` best boxes of each slice from a head's output (`models.detector`): heatmap peaks (3x3
    max-pooling), their boxes and, for the Gaussian head, their std. Returns (boxes [B, k, 4]
    x1,y1,x2,y2 in [0, 1], scores [B, k] in [0, 1], sd [B, k, 4] or None). With `nms_iou` overlapping
    boxes are suppressed (`torchvision.ops.batched_nms`); suppressed boxes and boxes under `min_score`
    score 0."""
    heat, params = out[0], out[1]
    sd = out[3] if len(out) > 3 else None
    scores, cells = peaks(torch.sigmoid(heat.float()), k)
    pick = lambda t: t[torch.arange(len(t), device=t.device)[:, None], cells]
    boxes = params_to_boxes(pick(params))
    if nms_iou is not None: scores = suppress(boxes, scores, nms_iou)
    scores = scores * (scores >= min_score)
    return boxes, scores, (pick(sd) if sd is not None else None)


@dataclass
class Decoding:
    """How a detector's maps become scored boxes, carried by the model (`Detector.decoding`) into its
    export: `k` boxes per slice, optional NMS at `nms_iou`, boxes under `min_score` dropped for
    evaluation (`min_score` 0 in `decode(..., all_k=True)`: every kept peak, as `learn.predict` gives).
    `operating_score` is the score at which the model made `operating_fp` false positives per
    validation slice (set by `finetune`): the default threshold of every figure and overlay of boxes."""
    k: int = KEEP
    nms_iou: float | None = NMS_IOU
    min_score: float = MIN_SCORE
    operating_score: float | None = None
    operating_fp: float = 1.

    def shown_above(self, min_score: float | None = None) -> tuple[float, str]:
        "The threshold boxes are drawn at, and where it comes from: `min_score` if given, else the operating point."
        if min_score is not None: return float(min_score), 'as asked'
        if self.operating_score is not None:
            return self.operating_score, (f"the model's operating point: {self.operating_fp:g} false positive"
                                          f"{'' if self.operating_fp == 1 else 's'} per validation slice")
        return DRAWN_SCORE, 'the model has no operating point (exported before it had one)'

    def __setstate__(self, state):  # exports written before the operating point kept none
        self.__dict__.update({'operating_score': None, 'operating_fp': 1., **state})

    def __call__(self, out, all_k: bool = False):
        "`detections` of a head's output with these settings."
        return detections(out, self.k, self.nms_iou, 0. if all_k else self.min_score)
