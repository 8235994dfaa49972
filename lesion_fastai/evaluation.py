"""A trained detector over the validation and test slices, and what a run reports about it: metrics
(FROC and top-1, beside the mean-box baseline), `predictions.csv` (File_name,x1,y1,x2,y2,score in
slice pixels, one row per box), `froc.png` and `results.png`. Used by `finetune` after training and by
`python -m lesion_fastai.evaluate` (or `finetune --eval`) on an exported model; `lesion_fastai.predict` writes its predictions.csv
with the same columns first (`PREDICTION_COLUMNS`, `prediction_row`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from .boxes import one_std_boxes, protocol_iou, to_pixels
from .cache import prepare_slices, readable
from .data import CTSlice
from .deeplesion import evaluation_records, load_data
from .inference import detect
from .files import check_out_folder, output_folder, write_csv, write_json
from .froc import froc_curve, score_at_fp
from .log import log
from .metrics import Detections, evaluate_detections, froc_inputs, match_lesion, mean_box
from .plots import plot_froc, plot_results

__all__ = ['PREDICTION_COLUMNS', 'prediction_row', 'predict_detections', 'write_predictions', 'report', 'operating_point',
           'slice_errors', 'evaluate_export']

# predictions.csv: the evaluation's columns, as the reference evaluation code reads them (predict adds its own after them)
PREDICTION_COLUMNS = ('File_name', 'x1', 'y1', 'x2', 'y2', 'score')


def prediction_row(file_name: str, box_px, score) -> list[str]:
    "One predictions.csv row: the slice's File_name, its box x1,y1,x2,y2 in slice pixels and its score (4 decimals each)."
    return [file_name, *(f'{float(v):.4f}' for v in box_px), f'{float(score):.4f}']


def predict_detections(model, spec, decoding, records, bs: int = 16, cache=None) -> Detections:
    """The detector's boxes on `records` (`Detections`, decoded as `decoding` says: the best `k` per
    slice, boxes scoring under its `min_score` dropped), through the one inference path (`inference.detect`)."""
    return detect(model, spec, decoding, records, bs=bs, cache=cache)[0]


def write_predictions(path: Path, dets: Detections, records) -> Path:
    "`predictions.csv`: File_name,x1,y1,x2,y2,score, one row per box (slice pixels), best first within a slice."
    rows = [prediction_row(r.file_name, b, s) for (boxes, scores), r in zip(dets.in_pixels(records), records) for b, s in zip(boxes, scores)]
    return write_csv(path, PREDICTION_COLUMNS, rows)


def report(model, spec, decoding, splits: dict, baseline: np.ndarray, out: Path, prefix: str = '', n_figure: int = 8, bs: int = 16,
           cache=None) -> dict:
    """Evaluate the detector `model` (its input prepared as `spec` says, decoded by `decoding`) on each
    split of `splits` ({'valid': records, 'test': records}, already filtered by DeepLesion's protocol)
    beside the `baseline` mean box; write `<prefix>predictions.csv` (test;
    `<prefix>predictions_valid.csv` for validation), `<prefix>froc.png` and, for the test split,
    `<prefix>results.png` (its first slices) and `<prefix>errors.png` (its worst misses and false
    positives). With a validation split, its operating point (`operating_point`) is returned in its
    metrics and is the threshold of the figures' boxes; the model is not changed (the caller stores the
    point with it: `export.at_operating_point`). Returns the metrics of each split."""
    results, curves, shown = {}, {}, decoding
    for name in sorted(splits, key=lambda k: k != 'valid'):           # validation first: it sets the operating point
        recs = splits[name]
        if not recs: continue
        dets = predict_detections(model, spec, decoding, recs, bs, cache)
        results[name] = evaluate_detections(dets, recs, baseline)
        write_predictions(out / f"{prefix}predictions{'' if name == 'test' else '_' + name}.csv", dets, recs)
        fps, sens, scores = froc_curve(*froc_inputs(dets, recs))
        curves[name] = fps, sens
        if name == 'valid':
            op = results[name]['operating_point'] = operating_point(fps, sens, scores)
            shown = dataclasses.replace(decoding, operating_score=op['score'], operating_fp=op['fp_per_slice'])
        if name == 'test':
            threshold, why = shown.shown_above()
            images = CTSlice(spec, cache).batch(recs[:min(n_figure, bs)])[:, 0].numpy()
            drawn = _results_figure(recs, dets, images, out / f'{prefix}results.png', n_figure, threshold)
            _errors_figure(spec, recs, dets, out / f'{prefix}errors.png', threshold, n_figure, cache)
            log.info(f"{prefix}results.png: {drawn} box(es) drawn at score >= {threshold:.3f} ({why}); the top box of each slice always, "
                     f"dashed where it scores less")
    last = 'test' if 'test' in results else next(iter(results))
    plot_froc({k: curves[k] for k in splits if k in curves}, {k: results[k]['froc'] for k in splits if k in results},
              results[last]['mean_box_baseline']['froc'], out / f'{prefix}froc.png')
    return results


def operating_point(fps, sens, scores, fp: float = 1.) -> dict:
    """The score at which the validation curve (`froc_curve`'s FPs per slice, sensitivity, scores)
    reaches `fp` false positives per slice, with the sensitivity there: the model's operating point."""
    score = score_at_fp(fps, scores, fp)
    at = np.flatnonzero(np.asarray(scores) >= score)
    return {'score': score, 'fp_per_slice': fp, 'sensitivity': float(sens[at[-1]]) if len(at) else 0.,
            'fp_per_slice_reached': float(fps[at[-1]]) if len(at) else 0.}


def _results_figure(records, dets: Detections, images, path, n, threshold: float, max_boxes: int = 5) -> int:
    """Test slices: ground truth green; up to `max_boxes` predicted boxes scoring at least `threshold`
    yellow with their scores, and the top box always (dashed where it scores less); for the Gaussian
    head the top box's one-std range dashed. Returns how many boxes were drawn."""
    n = min(n, len(images))
    H, W = images.shape[-2:]
    scale = np.array([W, H, W, H])
    keep = [_drawn(dets, i, threshold, max_boxes) for i in range(n)]
    ious = [match_lesion(to_pixels(dets.boxes[i, 0], r.width, r.height), r)[1] for i, r in enumerate(records[:n])]
    margins = None if dets.sd is None else [one_std_boxes(dets.boxes[i, 0], dets.sd[i, 0]) * scale for i in range(n)]
    plot_results(images[:n], records[:n], [b * scale for b, _ in keep], path, pred_scores=[s for _, s in keep],
                 pred_margins=margins, ious=ious, threshold=threshold)
    return sum(len(b) for b, _ in keep)


def _drawn(dets: Detections, i: int, threshold: float, max_boxes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    "(boxes, scores) a figure draws on slice `i`: those scoring at least `threshold`, and the top box always; at most `max_boxes`."
    s = dets.scores[i]
    m = (s >= threshold) | (np.arange(len(s)) == 0)
    return dets.boxes[i][m][:max_boxes], s[m][:max_boxes]


def slice_errors(dets: Detections, records, threshold: float, n: int = 4) -> tuple[list, list]:
    """The test slices of the worst misses and false positives at `threshold`: (slice index, lesion
    index, its best overlapping box's score) of lesions no box at the threshold finds at IoU >= 0.5,
    the least covered first; (slice index, box index, score) of boxes at the threshold overlapping no
    lesion at IoU >= 0.5, the highest-scoring first. At most `n` of each, one per slice."""
    import torch
    misses, false_pos = [], []
    for i, ((boxes, scores), r) in enumerate(zip(dets.in_pixels(records), records)):
        iou = protocol_iou(torch.tensor(boxes, dtype=torch.float64), torch.tensor(r.boxes, dtype=torch.float64)).numpy()
        above = scores >= threshold
        for j in range(len(r.boxes)):
            if not (iou[above, j] >= .5).any(): misses.append((i, j, float(scores[iou[:, j] >= .5].max(initial=0))))
        for k in np.flatnonzero(above):
            if iou[k].max(initial=0) < .5: false_pos.append((i, int(k), float(scores[k])))
    first = lambda items: list({t[0]: t for t in items[::-1]}.values())[::-1]        # one per slice, keeping the order
    return first(sorted(misses, key=lambda t: t[2]))[:n], first(sorted(false_pos, key=lambda t: -t[2]))[:n]


def _errors_figure(spec, records, dets: Detections, path, threshold: float, n: int, cache=None):
    "The worst misses and false positives (`slice_errors`) drawn as `results.png` draws slices, each titled with its error."
    misses, false_pos = slice_errors(dets, records, threshold, max(1, n // 2))
    chosen = [(i, f'missed a lesion (its best box scores {s:.2f})') for i, _, s in misses] + \
             [(i, f'false positive scoring {s:.2f}') for i, _, s in false_pos]
    if not chosen: return plot_results(np.zeros((0, 1, 1)), [], [], path, titles=[], threshold=threshold)
    recs = [records[i] for i, _ in chosen]
    images = CTSlice(spec, cache).batch(recs)[:, 0].numpy()
    scale = np.array([images.shape[-1], images.shape[-2]] * 2)
    keep = [_drawn(dets, i, threshold) for i, _ in chosen]
    return plot_results(images, recs, [b * scale for b, _ in keep], path, pred_scores=[s for _, s in keep],
                        titles=[why for _, why in chosen], threshold=threshold)


def evaluate_export(model_path: Path | str, data: Path | str, out: Path | str | None = None, bs: int = 16, device: str = 'auto',
                    skip_unreadable: bool = False) -> dict:
    """Evaluate a trained detector (either export form, `export.load_model`) on the test patients of
    `data` (DeepLesion's protocol), beside the mean-box baseline it was trained with (stored with it);
    writes `eval_metrics.json`, `eval_predictions.csv`, `eval_froc.png`, `eval_results.png`,
    `eval_errors.png` and `eval_report.html`. Checks the output folder and every test slice before
    evaluating (`skip_unreadable`: leaves out, naming them, those that cannot be read, as training does)."""
    from .export import load_model
    model_path = Path(model_path)
    if not model_path.exists(): raise FileNotFoundError(f"{model_path}: no such exported model")
    if device == 'auto': device = 'cuda' if torch.cuda.is_available() else 'cpu'
    out = check_out_folder(Path(out) if out else (model_path if model_path.is_dir() else model_path.parent))
    _, records = load_data(data, missing_ok=skip_unreadable)
    test = evaluation_records(records, 'test')
    if not test: raise ValueError(f"{data}: no test slices (Train_Val_Test = 3) with a lesion not Possibly_noisy")
    model, spec, info = load_model(model_path, device)
    cache = prepare_slices('none', test, spec, skip_unreadable=skip_unreadable)   # every test slice readable as the model reads it
    test = readable(test, cache)
    baseline, source = (np.asarray(info['mean_box']), 'stored with the model') if info else \
        (mean_box(evaluation_records(records, 'train')), 'training split of --data (the export stores none)')
    with output_folder(out):
        results = report(model, spec, model.decoding, {'test': test}, baseline, out, prefix='eval_', bs=bs, cache=cache)
        metrics = {'test': results['test'], 'model': str(model_path), 'mean_box_source': source}
        write_json(metrics, out / 'eval_metrics.json')
        from .report import run_report
        run_report(out, metrics, prefix='eval_', title=f'lesion_fastai.evaluate of {model_path}')
    log.info(f"wrote {out / 'eval_metrics.json'}, eval_predictions.csv, eval_froc.png, eval_results.png, eval_errors.png and "
             f"eval_report.html in {out}")
    return metrics
