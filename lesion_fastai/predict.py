"""python -m lesion_fastai.predict: run an exported detector (finetune's export.pkl) on new scans.

Inputs, files or folders (searched recursively): DeepLesion 16-bit PNG slices; DICOM files or folders
holding a series (HU from RescaleSlope / RescaleIntercept, pixel spacing from the header, slices
ordered by their position along the slice normal, so that --context models get their real
neighbours); NIfTI volumes (.nii, .nii.gz), slice by slice along the last axis. DICOM and NIfTI need
the optional extra: pip install -e '.[dicom]'. The model's own windows, context and input size come
from the export.

Writes to OUT: predictions.csv (File_name, x1, y1, x2, y2, score as the evaluation's predictions.csv,
in the input's pixels, then slice_index, source, the box in mm where the spacing is known, and the
Gaussian head's std in pixels), skipped.csv (every input that was not predicted, and why) and, with
--overlays, overlays/*.png (the slice, its boxes above --min-score in yellow with their scores).

Exit status: 0 when every input was predicted, 3 when some were skipped (the rest are predicted;
skipped.csv names them), 1 on an error (with --strict, any input that cannot be predicted is one,
and nothing is written).

Examples:
    python -m lesion_fastai.predict runs/demo/sandwich/export.pkl data/synthetic/Images_png/000001_01_01 --out runs/predict
    python -m lesion_fastai.predict export.pkl scans/ct_series/ volume.nii.gz --out runs/p --overlays --device cuda --bs 64 --workers 4
"""
from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .deeplesion import SliceFileError, _open_png, window

__all__ = ['Series', 'find_inputs', 'read_dicom_series', 'predict', 'main']

_NIFTI = ('.nii', '.nii.gz')
_DEEPLESION_FOLDER = re.compile(r'^\d+_\d+_\d+$')
SKIPPED = 3   # exit status when some inputs were skipped


def _extra(module: str):
    "pydicom / nibabel, or a clear error saying how to install them."
    try: return __import__(module)
    except ImportError: raise SystemExit(f"error: reading DICOM and NIfTI needs {module}: pip install -e '.[dicom]'") from None


@dataclass
class Series:
    """Slices in order: PNG files (`kind` 'png', neighbours found by slice number as in training),
    the files of one DICOM series sorted by position ('dicom'), or one NIfTI volume ('nifti').
    `spacing` is (row, column) mm per pixel or None; `windows` a DICOM window per slice or None."""
    kind: str
    source: str
    files: list = field(default_factory=list)
    names: list = field(default_factory=list)
    spacing: tuple | None = None
    windows: list | None = None

    def __len__(self): return len(self.names)

    def hu(self, i: int) -> np.ndarray:
        "Slice `i` in HU, [H, W] float32."
        if self.kind == 'dicom': return _dicom_hu(self.files[i])
        nib = _extra('nibabel')
        img = nib.load(self.source)
        a = np.asarray(img.dataobj[..., i], dtype=np.float32)                # scl_slope / scl_inter applied by nibabel
        return np.ascontiguousarray(a.T)                                     # rows = second voxel axis, as viewers show it


def _dicom_hu(path) -> np.ndarray:
    pydicom = _extra('pydicom')
    ds = pydicom.dcmread(path)
    try: a = ds.pixel_array
    except Exception as e: raise SliceFileError(path, f"DICOM pixel data unreadable ({type(e).__name__}: {e})") from None
    if a.ndim != 2: raise SliceFileError(path, f"DICOM pixel data of shape {a.shape}, expected one grey CT slice")
    return (a.astype(np.float32) * float(getattr(ds, 'RescaleSlope', 1) or 1) + float(getattr(ds, 'RescaleIntercept', 0) or 0)).astype(np.float32)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in ('.dcm', '.dicom'): return True
    if path.suffix: return False
    try:
        with open(path, 'rb') as f: return f.read(132)[128:] == b'DICM'
    except OSError: return False


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith('.png'): return 'png'
    if name.endswith(_NIFTI): return 'nifti'
    return 'dicom' if _is_dicom(path) else None


def read_dicom_series(paths) -> tuple[list[Series], list[tuple[str, str]]]:
    """DICOM files grouped by SeriesInstanceUID and sorted by position along the slice normal
    (ImagePositionPatient projected on the cross product of ImageOrientationPatient's axes; the
    InstanceNumber without them). Returns the series and the (file, reason) pairs of files skipped:
    unreadable, not CT, colour or multi-frame."""
    pydicom = _extra('pydicom')
    groups, skipped = {}, []
    for p in paths:
        try: ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception as e:
            skipped.append((str(p), f"not a readable DICOM file ({type(e).__name__}: {e})")); continue
        modality = getattr(ds, 'Modality', 'CT')
        if modality != 'CT': skipped.append((str(p), f"DICOM Modality {modality}, expected CT")); continue
        if int(getattr(ds, 'SamplesPerPixel', 1)) != 1:
            skipped.append((str(p), f"DICOM SamplesPerPixel {ds.SamplesPerPixel} (colour), expected one grey CT slice")); continue
        if int(getattr(ds, 'NumberOfFrames', 1) or 1) > 1:
            skipped.append((str(p), f"DICOM with {ds.NumberOfFrames} frames, expected one slice per file")); continue
        if 'PixelData' not in ds and not hasattr(ds, 'Rows'):
            skipped.append((str(p), 'DICOM without pixel data')); continue
        if hasattr(ds, 'ImagePositionPatient') and hasattr(ds, 'ImageOrientationPatient'):
            o = np.asarray(ds.ImageOrientationPatient, float)
            pos = float(np.dot(np.asarray(ds.ImagePositionPatient, float), np.cross(o[:3], o[3:])))
        else: pos = float(getattr(ds, 'InstanceNumber', 0) or 0)
        spacing = tuple(float(v) for v in ds.PixelSpacing) if hasattr(ds, 'PixelSpacing') else None
        win = None
        if hasattr(ds, 'WindowCenter') and hasattr(ds, 'WindowWidth'):
            first = lambda v: float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
            c, w = first(ds.WindowCenter), first(ds.WindowWidth)
            win = (c - w / 2, c + w / 2)
        uid = str(getattr(ds, 'SeriesInstanceUID', Path(p).parent))
        groups.setdefault(uid, []).append((pos, str(p), spacing, win))
    series = []
    for uid, items in groups.items():
        items.sort(key=lambda t: (t[0], t[1]))
        series.append(Series('dicom', str(Path(items[0][1]).parent), [t[1] for t in items], [t[1] for t in items],
                             items[0][2], [t[3] for t in items]))
    return series, skipped


def _png_name(path: Path) -> str:
    "DeepLesion's File_name (<patient>_<study>_<series>_<slice>.png) for a slice in its layout, else the path."
    return f'{path.parent.name}_{path.name}' if _DEEPLESION_FOLDER.match(path.parent.name) else str(path)


def find_inputs(inputs) -> tuple[list[Series], list[tuple[str, str]], int]:
    """The series to predict from files and folders (searched recursively), the (file, reason) pairs
    of inputs that cannot be predicted, and how many other files inside folders were ignored."""
    kinds, skipped, ignored = {}, [], 0                       # path -> 'png', 'dicom' or 'nifti', in input order
    for given in map(Path, inputs):
        if given.is_dir():
            for p in sorted(q for q in given.rglob('*') if q.is_file()):
                kind = _kind(p)
                if kind: kinds.setdefault(p, kind)
                else: ignored += 1
        elif given.is_file():
            kind = _kind(given)
            if kind: kinds.setdefault(given, kind)
            else: skipped.append((str(given), 'not a PNG, DICOM (.dcm or DICM header) or NIfTI (.nii, .nii.gz) file'))
        else: skipped.append((str(given), 'no such file or folder'))
    of_kind = lambda k: [f for f, kind in kinds.items() if kind == k]
    series = []
    pngs = {}
    for p in of_kind('png'):
        try:
            with _open_png(p): pass                           # the header: 8-bit, RGB, not an image, empty
        except (SliceFileError, FileNotFoundError) as e:
            skipped.append((str(p), str(e).split(': ', 1)[-1])); continue
        pngs.setdefault(p.parent, []).append(p)
    for folder, ps in pngs.items():
        ps.sort(key=lambda q: (int(q.stem) if q.stem.isdigit() else 0, q.name))
        series.append(Series('png', str(folder), ps, [_png_name(q) for q in ps]))
    dicoms = of_kind('dicom')
    if dicoms:
        s, sk = read_dicom_series(dicoms)
        series += s; skipped += sk
    for p in of_kind('nifti'):
        nib = _extra('nibabel')
        try:
            img = nib.load(p)
            shape = img.shape
        except Exception as e:
            skipped.append((str(p), f"not a readable NIfTI volume ({type(e).__name__}: {e})")); continue
        if len(shape) != 3: skipped.append((str(p), f"NIfTI of shape {shape}, expected a 3-D CT volume")); continue
        zooms = img.header.get_zooms()
        series.append(Series('nifti', str(p), [], [str(p)] * shape[2], (float(zooms[1]), float(zooms[0]))))
    return series, skipped, ignored


class _Slices(torch.utils.data.Dataset):
    """(model input, width, height, error) of every slice of every series: the key slice and its
    `context` neighbours on each side, prepared exactly as training prepares them (`CTSlice`)."""
    def __init__(self, series: list[Series], ct):
        self.series, self.ct = series, ct
        self.index = [(si, i) for si, s in enumerate(series) for i in range(len(s))]

    def __len__(self): return len(self.index)

    def __getitem__(self, j):
        si, i = self.index[j]
        s, c = self.series[si], self.ct.context
        try:
            if s.kind == 'png': x = self.ct.load(s.files[i])
            else:
                order = [i] + [min(max(i + d, 0), len(s) - 1) for o in range(1, c + 1) for d in (-o, o)]
                hus = [s.hu(k) for k in order]
                if any(h.shape != hus[0].shape for h in hus): raise SliceFileError(s.source, f"slice {i}: its neighbours differ in size")
                x = self.ct.from_hu(hus, s.windows[i] if s.windows else None)
            w, h = x.orig_size
            return x.as_subclass(torch.Tensor), w, h, ''
        except (SliceFileError, OSError, ValueError) as e:
            return torch.zeros(self.ct.n_channels, self.ct.size, self.ct.size), 0, 0, str(e)


def _overlay(path: Path, hu: np.ndarray, boxes, scores, lo_hi) -> None:
    from PIL import Image, ImageDraw
    from .files import atomic_path
    img = Image.fromarray((window(hu, *lo_hi) * 255).astype(np.uint8)).convert('RGB')
    draw = ImageDraw.Draw(img)
    for b, s in zip(boxes, scores):
        draw.rectangle([float(v) for v in b], outline=(255, 255, 0), width=max(1, img.width // 256))
        draw.text((float(b[0]), max(0., float(b[1]) - 11)), f'{s:.2f}', fill=(255, 255, 0))
    with atomic_path(path) as tmp: img.save(tmp, format='PNG')


@torch.no_grad()
def predict(model_path, inputs, out, device: str = 'auto', bs: int = 16, workers: int = 0, overlays: bool = False,
            min_score: float = .3, max_boxes: int = 5, strict: bool = False, quiet: bool = False) -> dict:
    """Predict every slice of `inputs` with the exported learner at `model_path` and write OUT's files
    (see the module's help). Returns {'predicted': slices, 'boxes': rows, 'skipped': [(file, reason)]}."""
    from fastai.learner import load_learner
    from fastprogress.fastprogress import progress_bar
    from .data import slice_transform
    from .files import atomic_write_text, check_out_folder, output_folder
    from .metrics import KEEP, MIN_SCORE, NMS_IOU
    from .models.localizer import detections
    model_path = Path(model_path)
    if not model_path.is_file(): raise FileNotFoundError(f"{model_path}: no such exported model")
    if device == 'auto': device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda' and not torch.cuda.is_available(): raise ValueError("--device cuda: no CUDA GPU here")
    out = check_out_folder(out)
    series, skipped, ignored = find_inputs(inputs)
    if strict and skipped: raise ValueError(f"--strict: {len(skipped)} input(s) cannot be predicted, first {skipped[0][0]}: {skipped[0][1]}")
    try: learn = load_learner(model_path, cpu=device == 'cpu')
    except Exception as e: raise ValueError(f"{model_path}: not a learner exported by finetune ({type(e).__name__}: {e})") from None
    ct = slice_transform(learn.dls)
    k, nms = getattr(learn.loss_func, 'k', KEEP), getattr(learn.loss_func, 'nms_iou', NMS_IOU)
    model = learn.model.to(device).eval()
    data = _Slices(series, ct)
    dl = torch.utils.data.DataLoader(data, batch_size=bs, num_workers=workers, pin_memory=device == 'cuda')
    rows, drawn, n_ok, where = [], [], 0, iter(data.index)
    std_cols = ['std_x1', 'std_y1', 'std_x2', 'std_y2']
    bar = dl if quiet else progress_bar(dl)
    if not quiet: bar.comment = 'predicting'
    for x, ws, hs, errs in bar:
        boxes, scores, sd = detections(model(x.to(device)), k, nms, MIN_SCORE)
        boxes, scores = boxes.float().cpu().numpy(), scores.float().cpu().numpy()
        sd = None if sd is None else sd.float().cpu().numpy()
        for j, err in enumerate(errs):
            si, i = next(where)
            s = series[si]
            src = s.files[i] if s.kind != 'nifti' else s.source
            if err:
                if strict: raise ValueError(f"--strict: {src}: {err}")
                skipped.append((str(src), err)); continue
            n_ok += 1
            w, h = int(ws[j]), int(hs[j])
            scale = np.array([w, h, w, h], np.float64)
            order = np.argsort(-scores[j], kind='stable')
            keep = [o for o in order if scores[j][o] > 0]
            for o in keep:
                b = boxes[j][o] * scale
                row = {'File_name': s.names[i], 'x1': b[0], 'y1': b[1], 'x2': b[2], 'y2': b[3], 'score': scores[j][o],
                       'slice_index': int(Path(src).stem) if s.kind == 'png' and Path(src).stem.isdigit() else i, 'source': str(src)}
                if s.spacing: row.update(x1_mm=b[0] * s.spacing[1], y1_mm=b[1] * s.spacing[0], x2_mm=b[2] * s.spacing[1], y2_mm=b[3] * s.spacing[0])
                if sd is not None: row.update(zip(std_cols, sd[j][o] * scale))
                rows.append(row)
            if overlays:
                shown = [o for o in keep if scores[j][o] >= min_score][:max_boxes]
                drawn.append((s, i, [boxes[j][o] * scale for o in shown], [scores[j][o] for o in shown]))
    cols = ['File_name', 'x1', 'y1', 'x2', 'y2', 'score', 'slice_index', 'source', 'x1_mm', 'y1_mm', 'x2_mm', 'y2_mm', *std_cols]
    fmt = lambda v: f'{v:.4f}' if isinstance(v, (float, np.floating)) else str(v)
    with output_folder(out):                          # written only now: a failed or --strict run leaves nothing
        for s, i, b, sc in drawn:                     # the key slice in the model's first window, its boxes in yellow
            stem = Path(s.names[i]).stem if s.kind == 'png' else f'{Path(s.names[i]).name}_{i:04d}'
            _overlay(out / 'overlays' / (re.sub(r'[^A-Za-z0-9_.-]+', '_', stem) + '.png'), _key_hu(s, i), b, sc,
                     _first_window(ct, s.windows[i] if s.windows else None))
        atomic_write_text(out / 'predictions.csv', _csv(cols, [[fmt(r[c]) if c in r else '' for c in cols] for r in rows]))
        atomic_write_text(out / 'skipped.csv', _csv(['file', 'reason'], skipped))
    print(f"predicted {n_ok} slice(s) of {len(series)} series: {len(rows)} boxes in {out / 'predictions.csv'}"
          + (f"; overlays in {out / 'overlays'}" if overlays else '')
          + (f"; {len(skipped)} input(s) skipped, named in {out / 'skipped.csv'}" if skipped else '')
          + (f"; {ignored} other file(s) in the folders ignored" if ignored else ''))
    return {'predicted': n_ok, 'boxes': len(rows), 'skipped': skipped}


def _csv(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _key_hu(s: Series, i: int) -> np.ndarray:
    from .deeplesion import load_hu
    return load_hu(s.files[i]) if s.kind == 'png' else s.hu(i)


def _first_window(ct, dicom_window) -> tuple[float, float]:
    from .deeplesion import resolve_windows
    return resolve_windows(ct.windows, dicom_window if dicom_window is not None else (-150., 250.))[0]


def main(argv=None):
    ap = argparse.ArgumentParser(prog='python -m lesion_fastai.predict', description=__doc__.split('\n\n')[0],
                                 epilog=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('model', type=Path, help="an exported learner: finetune's OUT/export.pkl")
    ap.add_argument('inputs', nargs='+', help='PNG, DICOM or NIfTI files, or folders holding them (searched recursively)')
    ap.add_argument('--out', type=Path, required=True, help='output folder: predictions.csv, skipped.csv, overlays/')
    ap.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto', help='auto: a CUDA GPU when there is one (default)')
    ap.add_argument('--bs', type=int, default=16, help='slices per batch (default 16)')
    ap.add_argument('--workers', type=int, default=0, help='DataLoader worker processes reading the slices (default 0: the main process)')
    ap.add_argument('--overlays', action='store_true', help='write OUT/overlays/*.png: each slice with its boxes above --min-score')
    ap.add_argument('--min-score', type=float, default=.3, help='lowest score of a box drawn on an overlay (default 0.3)')
    ap.add_argument('--max-boxes', type=int, default=5, help='most boxes drawn on an overlay, best first (default 5)')
    ap.add_argument('--strict', action='store_true', help='any input that cannot be predicted is an error (exit 1, nothing written)')
    args = ap.parse_args(argv)
    if args.bs < 1: ap.error(f'--bs must be at least 1, got {args.bs}')
    if args.workers < 0: ap.error(f'--workers must be 0 or more, got {args.workers}')
    try: res = predict(args.model, args.inputs, args.out, args.device, args.bs, args.workers, args.overlays, args.min_score,
                       args.max_boxes, args.strict)
    except (FileNotFoundError, ValueError) as e: sys.exit(f"error: {e}")
    if res['skipped']: sys.exit(SKIPPED)


if __name__ == '__main__':
    main()
