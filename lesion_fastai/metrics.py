"""Localization metrics for a one-box model, always beside the mean-box baseline.

* `mean_iou`: a fastai metric (IoU with the slice's training target) for epoch logs and model selection.
* `evaluate`: per slice, the prediction is matched to the lesion it overlaps most (the nearest lesion
  by centre distance when it overlaps none); reports hit rate at IoU >= 0.5 against any lesion of the
  slice, mean IoU with that lesion, centre error in mm (from the slice's pixel spacing), a breakdown
  by coarse lesion type where types are known, and for the Gaussian head the calibration of its std.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou

from .boxes import box_params, paired_iou, to_pixels, to_unit

__all__ = ['LESION_TYPES', 'mean_iou', 'evaluate', 'match_lesion', 'calibration', 'mean_box']

# Coarse_lesion_type 1-8 as listed in the DeepLesion release's readme; -1 = not labelled.
LESION_TYPES = {1: 'bone', 2: 'abdomen', 3: 'mediastinum', 4: 'liver', 5: 'lung', 6: 'kidney', 7: 'soft tissue', 8: 'pelvis'}


def mean_iou(pred, targ) -> torch.Tensor:
    "fastai metric: mean IoU between the predicted and the target box (any layout, [-1, 1])."
    return paired_iou(to_unit(pred), to_unit(targ)).mean()


def mean_box(records) -> np.ndarray:
    "The mean training target box, x1,y1,x2,y2 in [0, 1]: the baseline every model must beat."
    return np.mean([r.target / np.array([r.width, r.height, r.width, r.height]) for r in records], 0)


def match_lesion(box_px: np.ndarray, r) -> tuple[int, float, float]:
    """The lesion of slice `r` a predicted box (pixels) is scored against: the one it overlaps most, or,
    when it overlaps none, the nearest by centre distance in mm. Returns (lesion index, IoU, centre
    error in mm)."""
    ious = box_iou(torch.tensor(box_px[None], dtype=torch.float64), torch.tensor(r.boxes, dtype=torch.float64))[0].numpy()
    centre = (box_px[:2] + box_px[2:]) / 2
    dist_mm = np.hypot(*(((r.boxes[:, :2] + r.boxes[:, 2:]) / 2 - centre) * np.asarray(r.spacing_mm)).T)
    j = int(ious.argmax()) if ious.max() > 0 else int(dist_mm.argmin())
    return j, float(ious[j]), float(dist_mm[j])


def calibration(pred_unit: np.ndarray, pred_std: np.ndarray, records, lesions: list[int], ious=None) -> dict:
    """How well the Gaussian head's std describes its errors: for each slice's predicted box and its
    matched lesion (`lesions[i]`), the target's centre x, y and log width, log height (the head's
    coordinates, `boxes.box_params`) against the predicted mean and std. Reports the fraction of target
    coordinates within 1 and 2 std of the mean (a calibrated Gaussian: 0.683 and 0.954), per coordinate
    too, with the median std and median absolute error; with `ious`, the same again on the slices
    whose box found its lesion (IoU >= 0.5), where the error is the box's, not the choice of object."""
    scale = lambda r: np.array([r.width, r.height, r.width, r.height], np.float64)
    targ = np.stack([r.boxes[j] / scale(r) for r, j in zip(records, lesions)])
    mu, t = box_params(torch.as_tensor(pred_unit, dtype=torch.float64)), box_params(torch.as_tensor(targ))
    err, std = (t - mu).abs().numpy(), np.asarray(pred_std, np.float64)
    out = _coverage(err, std)
    if ious is not None:
        found = np.asarray(ious) >= .5
        out['found'] = {'n': int(found.sum()), **(_coverage(err[found], std[found]) if found.any() else {})}
    return out


def _coverage(err, std) -> dict:
    z = err / std
    names = ('cx', 'cy', 'log_w', 'log_h')
    return {'within_1std': float((z <= 1).mean()), 'within_2std': float((z <= 2).mean()), 'ideal': [0.683, 0.954],
            'per_coordinate': {k: {'within_1std': float((z[:, i] <= 1).mean()), 'within_2std': float((z[:, i] <= 2).mean()),
                                   'median_std': float(np.median(std[:, i])), 'median_abs_error': float(np.median(err[:, i]))}
                               for i, k in enumerate(names)}}


def _summary(ious, errs):
    ious, errs = np.asarray(ious), np.asarray(errs)
    return {'n': int(len(ious)), 'hit@0.5': float((ious >= .5).mean()) if len(ious) else float('nan'),
            'mean_iou': float(ious.mean()) if len(ious) else float('nan'),
            'centre_error_mm': float(np.median(errs)) if len(errs) else float('nan'),
            'centre_error_mm_mean': float(errs.mean()) if len(errs) else float('nan')}


def evaluate(pred_unit: np.ndarray, records, baseline_unit: np.ndarray | None = None, pred_std: np.ndarray | None = None) -> dict:
    """Score predictions `pred_unit` [N, 4] (x1,y1,x2,y2 in [0, 1] of each slice) against every lesion of
    the matching `records` (`match_lesion`). Returns hit@0.5, mean IoU, median / mean centre error in mm,
    per-type breakdown (types > 0 only, by the matched lesion's type), the same for the mean-box
    baseline when given, and `calibration` when the Gaussian head's `pred_std` [N, 4] is given."""
    pred_unit = np.asarray(pred_unit, np.float64)
    if len(pred_unit) != len(records): raise ValueError(f"{len(pred_unit)} predictions for {len(records)} slices")
    matches = [match_lesion(to_pixels(p, r.width, r.height), r) for p, r in zip(pred_unit, records)]
    scores = [(iou, err, r.lesion_types[j]) for (j, iou, err), r in zip(matches, records)]
    out = _summary([s[0] for s in scores], [s[1] for s in scores])
    by_type = {}
    for t in sorted({s[2] for s in scores if s[2] > 0}):
        sel = [s for s in scores if s[2] == t]
        by_type[f'{t}_{LESION_TYPES.get(t, "unknown")}'] = _summary([s[0] for s in sel], [s[1] for s in sel])
    out['by_type'] = by_type
    if pred_std is not None: out['calibration'] = calibration(pred_unit, pred_std, records, [m[0] for m in matches], [m[1] for m in matches])
    if baseline_unit is not None:
        base = evaluate(np.repeat(np.asarray(baseline_unit)[None], len(records), 0), records)
        base.pop('by_type')
        out['mean_box_baseline'] = base
    return out
