"""python -m lesion_fastai.predict: run a trained detector (finetune's export.pkl or model.safetensors) on new scans.

Inputs, files or folders (searched recursively): DeepLesion 16-bit PNG slices; DICOM files or folders
holding a series (HU from RescaleSlope / RescaleIntercept, pixel spacing from the header, slices
ordered by their position along the slice normal, the most superior first as convert numbers a volume,
so that --context models get their real neighbours in training's order; localizers skipped); NIfTI volumes (.nii, .nii.gz), shown and numbered as python -m lesion_fastai.convert writes
them (reoriented to RAS+, anterior at the top, slice 1 the most superior), so a model trained on converted
volumes sees the same slices. DICOM and NIfTI need the optional extra: pip install -e '.[dicom]'. The
model's own windows, context and input size come from the export.

Writes to OUT: predictions.csv (File_name, x1, y1, x2, y2, score as the evaluation's predictions.csv,
in the pixels of the slice as shown: a PNG's own, a DICOM or NIfTI slice turned as DeepLesion shows one,
anterior at the top and the patient's left on the right, then slice_index (a PNG's slice number; for a NIfTI volume the slice as convert
numbers it; for a DICOM series its place, the most superior 1, by InstanceNumber where a file
lacks its position), source, the box in mm where the
spacing is known, and the Gaussian head's std in pixels), skipped.csv (every input that was not predicted, and why) and, with
--overlays, overlays/*.png (the slice, its boxes above --min-score in yellow with their scores, and its top box
always: orange, marked 'below', where it scores less). --min-score defaults to the model's operating
point, stored in its export: the score of 1 false positive per validation slice. PNG slices in
DeepLesion's layout (a folder Images_png/<series>/ beside DL_info.csv) take their pixel spacing from
DL_info.csv, so their boxes have mm columns too, and a --windows dicom model reads each in its row's
DICOM_windows (a slice without a row: the nearest key slice's of its series), as training does.

Exit status: 0 when every input was predicted, 3 when some were skipped (the rest are predicted;
skipped.csv names them), 1 on an error (with --strict, any input that cannot be predicted is one,
and nothing is written).

Examples:
    python -m lesion_fastai.predict runs/demo/sandwich/export.pkl data/synthetic/Images_png/000004_01_01 --out runs/predict
    python -m lesion_fastai.predict export.pkl scans/ct_series/ volume.nii.gz --out runs/p --overlays --device cuda --bs 64 --workers 4
"""
from __future__ import annotations

from .log import hush_third_party
hush_third_party(__name__)       # run as a command: quiet known third-party warnings before fastai loads

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch

from .config import PredictConfig, add_settings, from_args
from .data import CTSlice
from .deeplesion import SliceFileError, window
from .scans import Series, find_inputs, forget_volumes, read_dicom_series

__all__ = ['find_inputs', 'read_dicom_series', 'predict', 'parser', 'main', 'SKIPPED']

SKIPPED = 3   # exit status when some inputs were skipped


class _SeriesSlice:
    """`detect`'s reading of slice `i` of a series (module-level, so DataLoader workers can take it):
    (model input, width, height, error), the key slice and its `context` neighbours on each side
    prepared exactly as training prepares them (`CTSlice`); an unreadable slice gives zeros and its
    error, a row of skipped.csv, while the rest go on."""
    def __init__(self, ct): self.ct = ct

    def __call__(self, item):
        s, i = item
        c = self.ct.spec.context
        try:
            if s.kind == 'png': x = self.ct.load(s.files[i], s.windows[i] if s.windows else None)
            else:
                order = [i] + [min(max(i + d, 0), len(s) - 1) for o in range(1, c + 1) for d in (-o, o)]
                hus = [s.hu(k) for k in order]
                if any(h.shape != hus[0].shape for h in hus): raise SliceFileError(s.source, f"slice {i}: its neighbours differ in size")
                if not np.isfinite(hus[0]).any(): raise SliceFileError(s.source, f"slice {i}: no finite HU value (all NaN or infinite)")
                x = self.ct.from_hu(hus, s.windows[i] if s.windows else None)
            w, h = x.orig_size
            return x.as_subclass(torch.Tensor), w, h, ''
        except Exception as e:                   # whatever a reader raises for this slice
            why = str(e) if isinstance(e, SliceFileError) else f"unreadable ({type(e).__name__}: {e})"
            return torch.zeros(self.ct.n_channels, self.ct.spec.size, self.ct.spec.size), 0, 0, why


ABOVE, BELOW = (255, 255, 0), (255, 150, 0)     # overlay colours: boxes at the threshold yellow, a top box under it orange


def _overlay(path: Path, hu: np.ndarray, boxes, scores, lo_hi, threshold: float) -> None:
    from PIL import Image, ImageDraw
    from .files import atomic_path
    img = Image.fromarray((window(hu, *lo_hi) * 255).astype(np.uint8)).convert('RGB')
    draw = ImageDraw.Draw(img)
    for b, s in zip(boxes, scores):
        below = s < threshold
        colour = BELOW if below else ABOVE
        draw.rectangle([float(v) for v in b], outline=colour, width=max(1, img.width // 256))
        draw.text((float(b[0]), max(0., float(b[1]) - 11)), f'{s:.2f}' + (' below' if below else ''), fill=colour)
    with atomic_path(path) as tmp: img.save(tmp, format='PNG')


EXTRA_COLUMNS = ('slice_index', 'source', 'x1_mm', 'y1_mm', 'x2_mm', 'y2_mm', 'std_x1', 'std_y1', 'std_x2', 'std_y2')


def predict(model_path, inputs, out, device: str = 'auto', bs: int = 16, workers: int = 0, overlays: bool = False,
            min_score: float | None = None, max_boxes: int = 5, strict: bool = False) -> dict:
    """Predict every slice of `inputs` with the trained detector at `model_path` (either export form)
    and write OUT's files (see the module's help); overlays draw boxes scoring at least `min_score`
    (default: the model's operating point) and each slice's top box whatever it scores. Returns
    {'predicted': slices, 'boxes': rows, 'skipped': [(file, reason)], 'drawn': boxes on overlays,
    'threshold': theirs}."""
    try: return _predict(model_path, inputs, out, device, bs, workers, overlays, min_score, max_boxes, strict)
    finally: forget_volumes()                      # the last NIfTI volume read: not kept past the run


def _predict(model_path, inputs, out, device, bs, workers, overlays, min_score, max_boxes, strict) -> dict:
    from .evaluation import PREDICTION_COLUMNS, prediction_row
    from .export import load_model
    from .files import check_out_folder, output_folder, write_csv
    from .inference import detect
    from .log import log
    model_path = Path(model_path)
    if not model_path.exists(): raise FileNotFoundError(f"{model_path}: no such exported model")
    if device == 'auto': device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda' and not torch.cuda.is_available(): raise ValueError("--device cuda: no CUDA GPU here")
    out = check_out_folder(out)
    series, skipped, ignored = find_inputs(inputs)
    if strict and skipped: raise ValueError(f"--strict: {len(skipped)} input(s) cannot be predicted, first {skipped[0][0]}: {skipped[0][1]}")
    if not series:
        raise ValueError("nothing to predict: " + (f"{len(skipped)} input(s) cannot be predicted, first {skipped[0][0]}: {skipped[0][1]}"
                                                   if skipped else f"no slices in {', '.join(map(str, inputs))}"))
    model, spec, _ = load_model(model_path, device)
    decoding = model.decoding
    threshold, why = decoding.shown_above(min_score)
    items = [(s, i) for s in series for i in range(len(s))]
    dets, extras = detect(model, spec, decoding, items, bs, device, workers, read=_SeriesSlice(CTSlice(spec)), bar='predicting')
    rows, drawn, n_ok = [], [], 0
    mm = lambda b, s: [f'{v:.4f}' for v in b * np.array([s[1], s[0], s[1], s[0]])] if s else [''] * 4
    for j, ((s, i), (w, h, err)) in enumerate(zip(items, extras)):
        src = s.files[i] if s.kind != 'nifti' else s.source
        if err:
            if strict: raise ValueError(f"--strict: {src}: {err}")
            skipped.append((str(src), err)); continue
        n_ok += 1
        scale = np.array([w, h, w, h], np.float64)
        scores = dets.scores[j]
        keep = [o for o in range(len(scores)) if scores[o] > 0]         # best first (`Detections`)
        index = int(Path(src).stem) if s.kind == 'png' and Path(src).stem.isdigit() else i + 1     # 1-based as convert's PNGs
        for o in keep:
            b = dets.boxes[j][o] * scale
            std = [f'{v:.4f}' for v in dets.sd[j][o] * scale] if dets.sd is not None else [''] * 4
            rows.append([*prediction_row(s.names[i], b, scores[o]), str(index), str(src), *mm(b, s.spacing), *std])
        if overlays:
            shown = [o for n, o in enumerate(keep) if n == 0 or scores[o] >= threshold][:max_boxes]     # the top box always
            drawn.append((s, i, [dets.boxes[j][o] * scale for o in shown], [scores[o] for o in shown]))
    n_drawn = sum(len(b) for *_, b, _ in drawn)
    with output_folder(out):                          # written only now: a failed or --strict run leaves nothing
        for s, i, b, sc in drawn:                     # the key slice in the model's first window, its boxes in yellow
            stem = Path(s.names[i]).stem if s.kind == 'png' else f'{Path(s.names[i]).name}_{i + 1:04d}'
            _overlay(out / 'overlays' / (re.sub(r'[^A-Za-z0-9_.-]+', '_', stem) + '.png'), _key_hu(s, i), b, sc,
                     _first_window(spec, s.windows[i] if s.windows else None), threshold)
        write_csv(out / 'predictions.csv', [*PREDICTION_COLUMNS, *EXTRA_COLUMNS], rows)
        write_csv(out / 'skipped.csv', ['file', 'reason'], skipped)
    log.info(f"predicted {n_ok} slice(s) of {len(series)} series: {len(rows)} boxes in {out / 'predictions.csv'}"
             + (f"; overlays in {out / 'overlays'}: {n_drawn} box(es) at score >= {threshold:.3f} ({why}), "
                f"and the top box of each slice always, orange where it scores less" if overlays else '')
             + (f"; {len(skipped)} input(s) skipped, named in {out / 'skipped.csv'}" if skipped else '')
             + (f"; {ignored} other file(s) in the folders ignored" if ignored else ''))
    return {'predicted': n_ok, 'boxes': len(rows), 'skipped': skipped, 'drawn': n_drawn, 'threshold': threshold}


def _key_hu(s: Series, i: int) -> np.ndarray:
    from .deeplesion import load_hu
    return load_hu(s.files[i]) if s.kind == 'png' else s.hu(i)


def _first_window(spec, dicom_window) -> tuple[float, float]:
    from .deeplesion import resolve_windows
    return resolve_windows(spec.windows, dicom_window if dicom_window is not None else (-150., 250.))[0]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='python -m lesion_fastai.predict', description=__doc__.split('\n\n')[0],
                                 epilog=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = PredictConfig.__dataclass_fields__
    ap.add_argument('model', type=Path, help=fields['model'].metadata['help'])
    ap.add_argument('inputs', nargs='+', help=fields['inputs'].metadata['help'])
    add_settings(ap, PredictConfig, required=('out',))
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    cfg = from_args(PredictConfig, ap, args, inputs=tuple(args.inputs))
    try: res = predict(cfg.model, cfg.inputs, cfg.out, cfg.device, cfg.bs, cfg.num_workers, cfg.overlays, cfg.min_score, cfg.max_boxes,
                       cfg.strict)
    except (FileNotFoundError, ValueError) as e: sys.exit(f"error: {e}")
    if res['skipped']: sys.exit(SKIPPED)


if __name__ == '__main__':
    main()
