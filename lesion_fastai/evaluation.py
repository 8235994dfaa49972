"""A trained detector over the validation and test slices, and what a run reports about it: metrics
(FROC and top-1, beside the mean-box baseline), `predictions.csv` (File_name,x1,y1,x2,y2,score in
slice pixels, one row per box), `froc.png` and `results.png`. Used by `finetune` after training and by
`python -m finetune --eval` on an exported learner; `lesion_fastai.predict` writes its predictions.csv
with the same columns first (`PREDICTION_COLUMNS`, `prediction_row`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from .boxes import one_std_boxes, to_pixels
from .cache import prepare_slices
from .deeplesion import evaluation_records, load_data
from .export import detector_settings, load_export
from .files import check_out_folder, output_folder, write_csv, write_json
from .froc import froc_curve
from .metrics import Detections, evaluate_detections, froc_inputs, match_lesion, mean_box
from .plots import plot_froc, plot_results

__all__ = ['PREDICTION_COLUMNS', 'prediction_row', 'predict_detections', 'write_predictions', 'report', 'evaluate_export']

# predictions.csv: the evaluation's columns, as the reference evaluation code reads them (predict adds its own after them)
PREDICTION_COLUMNS = ('File_name', 'x1', 'y1', 'x2', 'y2', 'score')


def prediction_row(file_name: str, box_px, score) -> list[str]:
    "One predictions.csv row: the slice's File_name, its box x1,y1,x2,y2 in slice pixels and its score (4 decimals each)."
    return [file_name, *(f'{float(v):.4f}' for v in box_px), f'{float(score):.4f}']


@torch.no_grad()
def predict_detections(learn, records, bs: int | None = None) -> tuple[Detections, np.ndarray]:
    """The detector's boxes on `records` (`Detections`, decoded as the model's own `decoding` says: the
    best `k` per slice, boxes scoring under its `min_score` dropped), and the first batch's key-slice
    images [n, H, W] for figures."""
    _, decoding = detector_settings(learn)
    dl = learn.dls.test_dl(records, with_labels=False, bs=bs or learn.dls.bs)
    model = learn.model.eval()
    parts, images = [], None
    for b in dl:
        x = b[0]
        boxes, scores, sd = decoding(model(x))
        parts.append([t.float().cpu().numpy() if t is not None else None for t in (boxes, scores, sd)])
        if images is None: images = x[:, 0].float().cpu().numpy()
    cat = lambda i: None if parts[0][i] is None else np.concatenate([p[i] for p in parts])
    return Detections(cat(0), cat(1), cat(2)), images


def write_predictions(path: Path, dets: Detections, records) -> Path:
    "`predictions.csv`: File_name,x1,y1,x2,y2,score, one row per box (slice pixels), best first within a slice."
    rows = [prediction_row(r.file_name, b, s) for (boxes, scores), r in zip(dets.in_pixels(records), records) for b, s in zip(boxes, scores)]
    return write_csv(path, PREDICTION_COLUMNS, rows)


def report(learn, splits: dict, baseline: np.ndarray, out: Path, prefix: str = '', n_figure: int = 8) -> dict:
    """Evaluate the learner on each split of `splits` ({'valid': records, 'test': records}, already
    filtered by DeepLesion's protocol) beside the `baseline` mean box; write `<prefix>predictions.csv`
    (test; `<prefix>predictions_valid.csv` for validation), `<prefix>froc.png` and, for the test split,
    `<prefix>results.png`. Returns the metrics of each split."""
    results, curves = {}, {}
    for name, recs in splits.items():
        if not recs: continue
        dets, images = predict_detections(learn, recs)
        results[name] = evaluate_detections(dets, recs, baseline)
        write_predictions(out / f"{prefix}predictions{'' if name == 'test' else '_' + name}.csv", dets, recs)
        curves[name] = froc_curve(*froc_inputs(dets, recs))[:2]
        if name == 'test': _results_figure(recs, dets, images, out / f'{prefix}results.png', n_figure)
    last = 'test' if 'test' in results else next(iter(results))
    plot_froc(curves, {k: v['froc'] for k, v in results.items()}, results[last]['mean_box_baseline']['froc'], out / f'{prefix}froc.png')
    return results


def _results_figure(records, dets: Detections, images, path, n, min_score: float = .3, max_boxes: int = 5):
    """Test slices: ground truth green; up to `max_boxes` predicted boxes scoring at least `min_score`
    yellow with their scores (the top box always); for the Gaussian head the top box's one-std range
    dashed."""
    n = min(n, len(images))
    H, W = images.shape[-2:]
    scale = np.array([W, H, W, H])
    shown = [(s >= min_score) | (np.arange(len(s)) == 0) for s in dets.scores[:n]]          # the top box always
    keep = [(b[m][:max_boxes], s[m][:max_boxes]) for b, s, m in zip(dets.boxes[:n], dets.scores[:n], shown)]
    ious = [match_lesion(to_pixels(dets.boxes[i, 0], r.width, r.height), r)[1] for i, r in enumerate(records[:n])]
    margins = None if dets.sd is None else [one_std_boxes(dets.boxes[i, 0], dets.sd[i, 0]) * scale for i in range(n)]
    return plot_results(images[:n], records[:n], [b * scale for b, _ in keep], path, pred_scores=[s for _, s in keep],
                        pred_margins=margins, ious=ious)


def evaluate_export(model_path: Path | str, data: Path | str, out: Path | str | None = None) -> dict:
    """Evaluate an exported learner (`export.pkl`) on the test patients of `data` (DeepLesion's
    protocol), beside the mean-box baseline it was trained with (stored in the export); writes
    `eval_metrics.json`, `eval_predictions.csv`, `eval_froc.png` and `eval_results.png`. Checks the
    output folder and every test slice before evaluating."""
    model_path = Path(model_path)
    if not model_path.is_file(): raise FileNotFoundError(f"--eval {model_path}: no such exported model")
    out = check_out_folder(Path(out) if out else model_path.parent)
    _, records = load_data(data)
    test = evaluation_records(records, 'test')
    if not test: raise ValueError(f"{data}: no test slices (Train_Val_Test = 3) with a lesion not Possibly_noisy")
    learn = load_export(model_path, cpu=not torch.cuda.is_available(), flag='--eval')
    spec, _ = detector_settings(learn)                # the preprocessing the model was trained with
    prepare_slices('none', test, spec)
    info = getattr(learn, 'train_info', None)
    baseline, source = (np.asarray(info['mean_box']), 'stored with the model') if info else \
        (mean_box(evaluation_records(records, 'train')), 'training split of --data (the export stores none)')
    with output_folder(out):
        results = report(learn, {'test': test}, baseline, out, prefix='eval_')
        metrics = {'test': results['test'], 'model': str(model_path), 'mean_box_source': source}
        write_json(metrics, out / 'eval_metrics.json')
    return metrics
