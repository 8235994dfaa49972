"""Localization metrics for a one-box model, always beside the mean-box baseline.

* `mean_iou`: a fastai metric (IoU with the slice's training target) for epoch logs and model selection.
* `evaluate`: per slice, the prediction is matched to the lesion it overlaps most; reports hit rate
  at IoU >= 0.5 against any lesion of the slice, mean IoU with that lesion, centre error in mm
  (from the slice's pixel spacing), and a breakdown by coarse lesion type where types are known.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou

from .losses import to_unit

__all__ = ['LESION_TYPES', 'mean_iou', 'paired_iou', 'evaluate', 'mean_box', 'to_pixels']

# Coarse_lesion_type 1-8 as listed in the DeepLesion release's readme; -1 = not labelled.
LESION_TYPES = {1: 'bone', 2: 'abdomen', 3: 'mediastinum', 4: 'liver', 5: 'lung', 6: 'kidney', 7: 'soft tissue', 8: 'pelvis'}


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    "IoU of a[i] with b[i], both [N, 4] x1,y1,x2,y2."
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(1)
    return inter / (area(a) + area(b) - inter).clamp(min=1e-12)


def mean_iou(pred, targ) -> torch.Tensor:
    "fastai metric: mean IoU between the predicted and the target box (any layout, [-1, 1])."
    return paired_iou(to_unit(pred), to_unit(targ)).mean()


def to_pixels(box_unit: np.ndarray, width: int, height: int) -> np.ndarray:
    "x1,y1,x2,y2 in [0, 1] -> pixels of a width x height slice."
    return np.asarray(box_unit, np.float64) * np.array([width, height, width, height])


def mean_box(records) -> np.ndarray:
    "The mean training target box, x1,y1,x2,y2 in [0, 1]: the baseline every model must beat."
    return np.mean([r.target / np.array([r.width, r.height, r.width, r.height]) for r in records], 0)


def _slice_scores(box_px: np.ndarray, r) -> tuple[float, float, int]:
    ious = box_iou(torch.tensor(box_px[None], dtype=torch.float64), torch.tensor(r.boxes, dtype=torch.float64))[0]
    j = int(ious.argmax())
    centre = (box_px[:2] + box_px[2:]) / 2
    lesion = (r.boxes[j, :2] + r.boxes[j, 2:]) / 2
    err_mm = float(np.hypot(*((centre - lesion) * np.asarray(r.spacing_mm))))
    return float(ious[j]), err_mm, r.lesion_types[j]


def _summary(ious, errs):
    ious, errs = np.asarray(ious), np.asarray(errs)
    return {'n': int(len(ious)), 'hit@0.5': float((ious >= .5).mean()) if len(ious) else float('nan'),
            'mean_iou': float(ious.mean()) if len(ious) else float('nan'),
            'centre_error_mm': float(np.median(errs)) if len(errs) else float('nan'),
            'centre_error_mm_mean': float(errs.mean()) if len(errs) else float('nan')}


def evaluate(pred_unit: np.ndarray, records, baseline_unit: np.ndarray | None = None) -> dict:
    """Score predictions `pred_unit` [N, 4] (x1,y1,x2,y2 in [0, 1] of each slice) against every lesion of
    the matching `records`. Returns hit@0.5, mean IoU, median / mean centre error in mm, per-type
    breakdown (types > 0 only), and the same for the mean-box baseline when given."""
    pred_unit = np.asarray(pred_unit, np.float64)
    if len(pred_unit) != len(records): raise ValueError(f"{len(pred_unit)} predictions for {len(records)} slices")
    scores = [_slice_scores(to_pixels(p, r.width, r.height), r) for p, r in zip(pred_unit, records)]
    out = _summary([s[0] for s in scores], [s[1] for s in scores])
    by_type = {}
    for t in sorted({s[2] for s in scores if s[2] > 0}):
        sel = [s for s in scores if s[2] == t]
        by_type[f'{t}_{LESION_TYPES.get(t, "unknown")}'] = _summary([s[0] for s in sel], [s[1] for s in sel])
    out['by_type'] = by_type
    if baseline_unit is not None:
        base = evaluate(np.repeat(np.asarray(baseline_unit)[None], len(records), 0), records)
        base.pop('by_type')
        out['mean_box_baseline'] = base
    return out
