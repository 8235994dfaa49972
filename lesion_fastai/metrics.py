"""Detection metrics, always beside the mean-box baseline.

* `evaluate_detections`: DeepLesion's FROC (`froc.py`) of every slice's scored boxes, and beside it the
  top box of each slice scored as a one-box prediction (`top1_metrics`).
* `top1_metrics`: per slice, the box is matched to the lesion it overlaps most (the nearest lesion by
  centre distance when it overlaps none); hit rate at IoU >= 0.5 against any lesion of the slice,
  mean IoU with that lesion, centre error in mm (from the slice's pixel spacing), a breakdown by
  coarse lesion type where types are known, and for the Gaussian head the calibration of its std.
* `ValidFROC`: the FROC score (mean sensitivity over 0.5-4 FPs per slice) as a fastai metric, for the
  epoch log and for choosing the best epoch.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou

from fastai.learner import Metric
from fastai.torch_core import get_model

from . import distributed
from .boxes import box_params, to_pixels
from .froc import froc

__all__ = ['LESION_TYPES', 'Detections', 'ValidFROC', 'evaluate_detections', 'top1_metrics', 'match_lesion', 'calibration',
           'mean_box', 'froc_inputs', 'summary_line']

# Coarse_lesion_type 1-8 as listed in the DeepLesion release's readme; -1 = not labelled.
LESION_TYPES = {1: 'bone', 2: 'abdomen', 3: 'mediastinum', 4: 'liver', 5: 'lung', 6: 'kidney', 7: 'soft tissue', 8: 'pelvis'}


def mean_box(records) -> np.ndarray:
    "The mean lesion box of `records`, x1,y1,x2,y2 in [0, 1]: the baseline every model must beat."
    return np.concatenate([r.boxes / np.array([r.width, r.height, r.width, r.height]) for r in records]).mean(0)


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


def top1_metrics(pred_unit: np.ndarray, records, pred_std: np.ndarray | None = None) -> dict:
    """Score one box per slice, `pred_unit` [N, 4] (x1,y1,x2,y2 in [0, 1] of each slice), against every
    lesion of the matching `records` (`match_lesion`). Returns hit@0.5, mean IoU, median / mean centre
    error in mm, per-type breakdown (types > 0 only, by the matched lesion's type), and `calibration`
    when the Gaussian head's `pred_std` [N, 4] is given."""
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
    return out


class Detections:
    """A detector's output on N slices, K boxes each: `boxes` [N, K, 4] x1,y1,x2,y2 in [0, 1], `scores`
    [N, K] (0: no box), `sd` [N, K, 4] (Gaussian head) or None; the highest score first in each slice."""
    def __init__(self, boxes, scores, sd=None):
        order = np.argsort(-np.asarray(scores), axis=1, kind='stable')
        take = lambda a: None if a is None else np.take_along_axis(np.asarray(a), order[..., None] if np.ndim(a) == 3 else order, 1)
        self.boxes, self.scores, self.sd = take(boxes), take(scores), take(sd)

    def __len__(self): return len(self.scores)

    def in_pixels(self, records):
        "Per slice: (boxes [n, 4] in its pixels, scores [n]) of the boxes that score above 0."
        return [(to_pixels(b[s > 0], r.width, r.height), s[s > 0]) for b, s, r in zip(self.boxes, self.scores, records)]


def froc_inputs(dets: Detections, records) -> tuple[list, list, list]:
    "The arguments of `froc` / `froc_curve` for these detections: per slice its boxes and scores in pixels, and its lesions."
    per_slice = dets.in_pixels(records)
    return [b for b, _ in per_slice], [s for _, s in per_slice], [r.boxes for r in records]


def evaluate_detections(dets: Detections, records, baseline_unit: np.ndarray | None = None) -> dict:
    """`froc`: DeepLesion's FROC of every slice's boxes against its lesions; `top1`: the highest-scoring
    box of each slice as a one-box prediction (`top1_metrics`); `mean_box_baseline`: the same two for
    the mean box as a detector (one box per slice, score 1), when given."""
    if len(dets) != len(records): raise ValueError(f"{len(dets)} detection sets for {len(records)} slices")
    out = {'froc': froc(*froc_inputs(dets, records)),
           'top1': top1_metrics(dets.boxes[:, 0], records, None if dets.sd is None else dets.sd[:, 0])}
    if baseline_unit is not None:
        base = Detections(np.repeat(np.asarray(baseline_unit, np.float64)[None, None], len(records), 0), np.ones((len(records), 1)))
        top = top1_metrics(base.boxes[:, 0], records)
        top.pop('by_type')
        out['mean_box_baseline'] = {'froc': evaluate_detections(base, records)['froc'], 'top1': top}
    return out


class ValidFROC(Metric):
    """FROC score of the validation slices, the mean sensitivity over 0.5-4 FPs per slice, as a fastai
    metric: each batch's output is decoded as the model's own `decoding` says and scored against the
    lesions of the DataLoader's records, which a validation DataLoader keeps in order. In several
    processes each rank holds a contiguous part of the validation slices (fastai's `DistributedDL`,
    padded by repeating the first ones): the parts are gathered in rank order and the padding dropped,
    so every rank scores all slices once, in order."""
    def reset(self): self.parts, self.records, self.score = [], None, None

    def accumulate(self, learn):
        if self.records is None: self.records = list(learn.dl.dataset.items)
        b, s, _ = get_model(learn.model).decoding(learn.pred)
        self.parts.append((b.detach().float().cpu().numpy(), s.detach().float().cpu().numpy()))

    def gathered(self) -> Detections:
        "This validation's detections of every rank, in the records' order (a collective: every rank calls it once)."
        ranks = distributed.gather(self.parts)
        parts = [p for rank_parts in ranks for p in rank_parts]
        n = len(self.records) if len(ranks) > 1 else None       # several ranks: drop the padding
        return Detections(np.concatenate([p[0] for p in parts])[:n], np.concatenate([p[1] for p in parts])[:n])

    @property
    def value(self):
        if not self.parts: return None
        if self.score is None:          # computed once per validation, so that every rank gathers once
            dets = self.gathered()
            self.score = froc(*froc_inputs(dets, self.records[:len(dets)]))['mean_0.5_4']
        return self.score

    @property
    def name(self): return 'froc'


def summary_line(m: dict) -> str:
    "One line of a split's metrics beside the mean box's."
    f, t, b = m['froc'], m['top1'], m['mean_box_baseline']
    sens = ' / '.join(f"{f['sensitivity'][k]:.3f}" for k in ('0.5', '1', '2', '4', '8', '16'))
    return (f"FROC sensitivity at 0.5/1/2/4/8/16 FPs per slice {sens}, mean 0.5-4 {f['mean_0.5_4']:.3f} "
            f"(mean box {b['froc']['mean_0.5_4']:.3f}); top box hit@0.5 {t['hit@0.5']:.3f} (mean box {b['top1']['hit@0.5']:.3f}), "
            f"mean IoU {t['mean_iou']:.3f} ({b['top1']['mean_iou']:.3f})")
