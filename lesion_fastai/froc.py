"""DeepLesion's FROC, as the field computes it (3DCE `rcnn/utils/evaluation.py`, MULAN `DL_eval.py`).

* The slices are the key slices of a split after `deeplesion.evaluation_records` (Possibly_noisy
  lesions dropped, then slices left without a lesion); several rows of one File_name are one slice.
* All predicted boxes of all slices are pooled and sorted by score, highest first (ties keep slice order).
* Going down that list, a box whose IoU with every lesion of its slice is below 0.5 is a false
  positive; otherwise it marks every not-yet-found lesion of its slice it overlaps at IoU >= 0.5 as
  found, and a box that only overlaps lesions found before is neither a hit nor a false positive.
* Sensitivity = found lesions / all lesions; false positives per slice = FPs / slices; the curve
  is read at 0.5, 1, 2, 4, 8 and 16 FPs per slice by linear interpolation between its points, as
  scipy's `interp1d` reads it in the reference code, and beyond its last point its last value is
  held (MULAN; 3DCE extrapolated). Model selection uses the mean over 0.5-4, as MULAN does.
* IoU counts pixels inclusively (`boxes.protocol_iou`, the reference code's `+ 1`).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.interpolate import interp1d

from .boxes import protocol_iou

__all__ = ['FP_RATES', 'SELECTION_RATES', 'PUBLISHED', 'froc_curve', 'sensitivity_at', 'score_at_fp', 'froc']

FP_RATES = (0.5, 1, 2, 4, 8, 16)
SELECTION_RATES = (0.5, 1, 2, 4)

# Published sensitivities on DeepLesion's official test split (IoU >= 0.5) at 0.5, 1, 2, 4, 8 FPs per slice.
PUBLISHED = {
    'Faster R-CNN, 3 slices': (56.9, 67.3, 75.6, 81.6, 85.8),
    '3DCE, 27 slices': (62.5, 73.4, 80.7, 85.7, 89.1),
    'MULAN': (76.1, 83.7, 88.8, 92.3, 94.7),
}


def froc_curve(pred_boxes, pred_scores, gt_boxes, iou_threshold: float = .5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The FROC curve of detections on a set of slices. `pred_boxes[i]` [n_i, 4] (pixels, x1,y1,x2,y2)
    with `pred_scores[i]` [n_i] are slice i's predictions, `gt_boxes[i]` [m_i, 4] its lesions (at least
    one). Returns (FPs per slice, sensitivity, score) after each prediction in score order."""
    n_slices = len(gt_boxes)
    if len(pred_boxes) != n_slices or len(pred_scores) != n_slices:
        raise ValueError(f"{len(pred_boxes)} prediction sets and {len(pred_scores)} score sets for {n_slices} slices")
    n_lesions = sum(len(g) for g in gt_boxes)
    if n_lesions == 0: raise ValueError("FROC needs at least one lesion")
    slice_of = np.concatenate([np.full(len(s), i) for i, s in enumerate(pred_scores)] + [np.zeros(0, int)]).astype(int)
    scores = np.concatenate([np.asarray(s, np.float64).reshape(-1) for s in pred_scores] + [np.zeros(0)])
    order = np.argsort(-scores, kind='stable')
    # IoU of every prediction with every lesion of its own slice, computed per slice
    ious = [protocol_iou(torch.as_tensor(np.asarray(b, np.float64).reshape(-1, 4)), torch.as_tensor(np.asarray(g, np.float64))).numpy()
            for b, g in zip(pred_boxes, gt_boxes)]
    position = np.concatenate([np.arange(len(s)) for s in pred_scores] + [np.zeros(0, int)]).astype(int)
    found = [np.zeros(len(g), bool) for g in gt_boxes]
    hits = fps = 0
    tp_curve, fp_curve = np.empty(len(order)), np.empty(len(order))
    for k, j in enumerate(order):
        i, overlaps = slice_of[j], ious[slice_of[j]][position[j]]
        if overlaps.max(initial=0) < iou_threshold: fps += 1
        else:
            new = (overlaps >= iou_threshold) & ~found[i]
            found[i] |= new
            hits += int(new.sum())
        tp_curve[k], fp_curve[k] = hits, fps
    return fp_curve / n_slices, tp_curve / n_lesions, scores[order]


def sensitivity_at(fp_per_slice: np.ndarray, sensitivity: np.ndarray, rates=FP_RATES) -> np.ndarray:
    """Read a FROC curve at `rates` FPs per slice as the reference code does, with scipy's `interp1d`
    (linear, `fill_value='extrapolate'`, which reads a point at an FP rate reached several times at its
    first occurrence), from (0, 0) on, and with the last sensitivity held beyond the curve's end
    (MULAN; 3DCE extrapolated). Without extrapolation interp1d hands over to `np.interp`, which reads
    such a point at its last occurrence: not the reference's reading."""
    fp = np.concatenate([[0.], fp_per_slice])
    sens = np.concatenate([[0.], sensitivity])
    rates = np.asarray(rates, np.float64)
    if len(fp) < 2: return np.zeros(len(rates))
    read = interp1d(fp, sens, kind='linear', assume_sorted=True, fill_value='extrapolate')
    with np.errstate(divide='ignore', invalid='ignore'): inside = read(rates)     # beyond the end: not used
    return np.where(rates > fp[-1], sens[-1], inside).astype(np.float64)


def score_at_fp(fp_per_slice: np.ndarray, scores: np.ndarray, fp: float) -> float:
    """The lowest score at which a detector makes at most `fp` false positives per slice, from its FROC
    curve (`froc_curve`'s FPs per slice and scores, in score order): its boxes scoring at least this,
    on slices like these, make about `fp` false positives each (the highest score if even its best
    box is a false positive too many; 1 without boxes)."""
    within = np.flatnonzero(np.asarray(fp_per_slice) <= fp)
    return float(scores[within[-1]]) if len(within) else float(scores[0]) if len(scores) else 1.


def froc(pred_boxes, pred_scores, gt_boxes, rates=FP_RATES) -> dict:
    """FROC summary: sensitivity at each of `rates` FPs per slice, their mean over 0.5-4 (the
    model-selection score), where the curve ends, and the counts behind it."""
    fp, sens, _ = froc_curve(pred_boxes, pred_scores, gt_boxes)
    at = sensitivity_at(fp, sens, rates)
    sel = [at[list(rates).index(r)] for r in SELECTION_RATES if r in rates]
    return {'sensitivity': {f'{r:g}': float(s) for r, s in zip(rates, at)}, 'mean_0.5_4': float(np.mean(sel)),
            'max_fp_per_slice': float(fp[-1]) if len(fp) else 0., 'max_sensitivity': float(sens[-1]) if len(sens) else 0.,
            'slices': len(gt_boxes), 'lesions': int(sum(len(g) for g in gt_boxes)),
            'predictions': int(sum(len(s) for s in pred_scores))}
