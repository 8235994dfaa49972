"""What the unlabelled slices can teach the detector besides pretraining.

* **Labels carried to neighbouring slices** (`carry_labels`): a lesion is a 3-D blob, so a key slice's
  boxes hold, shrunk, on the slices next to it. Each box goes to the shipped neighbours within the
  lesion's extent along z, taken as its long diameter (the lesion as a ball: half the long diameter
  above and below the key slice, at the series' slice interval), shrunk as a ball's cross-section
  shrinks, as a training target of its own weight.
* **Pseudo-labels** (`pseudo_label`, self-training): a teacher detector predicts on slices whose labels
  the run does not use (the key slices of training patients outside the label subset, and every
  non-key slice of the training patients); its boxes scoring above a threshold chosen on validation
  (the score at which the teacher makes `fp` false positives per validation slice) become a student's
  targets, written as a DeepLesion-style CSV first (`write_pseudo_labels`) so that a user can look at
  them. Only image paths of unused patients are read, never their boxes.
"""
from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np

from .deeplesion import SliceRecord, list_slices, open_png, patient_of

__all__ = ['carry_labels', 'unlabelled_slices', 'pseudo_label', 'write_pseudo_labels', 'read_pseudo_labels',
           'PSEUDO_COLUMNS', 'MAX_PSEUDO_BOXES']

PAD_PX = 5             # DeepLesion's boxes are the RECIST extent padded by 5 px on each side
MAX_PSEUDO_BOXES = 3   # boxes a pseudo-labelled slice keeps, best first (DeepLesion's key slices have 1-3 lesions)
PSEUDO_COLUMNS = ('File_name', 'Patient_index', 'Study_index', 'Series_ID', 'Key_slice_index', 'Bounding_boxes', 'Image_size',
                  'Spacing_mm_px_', 'Train_Val_Test', 'score', 'teacher')


def _slice_path(key_path: str, index: int) -> Path:
    return Path(key_path).with_name(f'{index:03d}.png')


def carry_labels(records, weight: float) -> list[SliceRecord]:
    """Training targets on the neighbour slices of `records` (labelled key slices): each box carried to
    every shipped slice within half its long diameter (in mm, over the series' slice interval) of
    its key slice, its lesion extent shrunk by sqrt(1 - (dz / r) ** 2) about the box centre and padded
    by DeepLesion's 5 px again, at `weight`. A slice that is itself a labelled key slice gets nothing
    carried; a slice near two key slices gets the boxes of both."""
    keys = {str(Path(r.image_path)) for r in records}
    carried: dict[str, tuple[SliceRecord, list]] = {}
    for r in records:
        if not r.spacing_z_mm or r.spacing_z_mm <= 0: continue
        k = int(Path(r.image_path).stem)
        spacing = float(np.mean(r.spacing_mm))
        for box, d_px in zip(r.boxes, r.diameters_px or [max(b[2] - b[0], b[3] - b[1]) - 2 * PAD_PX for b in r.boxes]):
            radius_mm = d_px * spacing / 2
            reach = int(math.floor(radius_mm / r.spacing_z_mm - 1e-9))
            for o in [o for d in range(1, reach + 1) for o in (-d, d)]:
                path = _slice_path(r.image_path, k + o)
                if str(path) in keys or not path.is_file(): continue
                f = math.sqrt(max(0., 1 - (abs(o) * r.spacing_z_mm / radius_mm) ** 2))
                cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                hw, hh = max(.5, ((box[2] - box[0]) / 2 - PAD_PX) * f) + PAD_PX, max(.5, ((box[3] - box[1]) / 2 - PAD_PX) * f) + PAD_PX
                b = np.array([max(0., cx - hw), max(0., cy - hh), min(float(r.width), cx + hw), min(float(r.height), cy + hh)], np.float32)
                carried.setdefault(str(path), (r, []))[1].append(b)
    out = []
    for path, (r, boxes) in carried.items():
        n = len(boxes)
        out.append(dataclasses.replace(r, image_path=path, boxes=np.stack(boxes), lesion_types=(-1,) * n, noisy=(False,) * n,
                                       lines=(), diameters_px=(), file_name=f"{Path(path).parent.name}_{Path(path).name}", weight=weight))
    return out


def unlabelled_slices(data, records, used) -> list[Path]:
    """The slices of the training patients that carry no label the run uses: every PNG of their series
    but the key slices in `used` (the run's labelled records). Validation and test patients' slices
    are never among them."""
    train_patients = {r.patient for r in records if r.split == 'train'}
    labelled = {str(Path(r.image_path)) for r in used}
    return [p for p in list_slices(data, train_patients) if str(p) not in labelled]


def _series_settings(records) -> dict:
    "Per series folder: the pixel spacing and DICOM window its DL_info.csv rows give (acquisition settings, not labels)."
    return {Path(r.image_path).parent.name: (r.spacing_mm, r.dicom_window, r.spacing_z_mm) for r in records}


def pseudo_label(model, spec, decoding, paths, threshold: float, weight: float, records=(), bs: int = 16, cache=None) -> list[tuple]:
    """The teacher's (`model`, with its `spec` and `decoding`) boxes scoring at least `threshold` on
    each of `paths`, at most `MAX_PSEUDO_BOXES` a slice, through the one inference path
    (`inference.detect`): (training record of `weight`, its boxes' scores) per slice where a box
    reaches it. A slice's spacing and DICOM window come from its series' rows in `records`; `cache`: a run's
    (`cache.prepare_slices`), whose `absent` files are read as not shipped."""
    from .inference import detect
    settings = _series_settings(records)

    def unlabelled(p) -> SliceRecord:          # a slice with its series' spacing and DICOM window, its boxes to come
        spacing, window, spacing_z = settings.get(Path(p).parent.name, ((0., 0.), (-150., 250.), 0.))
        return SliceRecord(image_path=str(p), split='train', patient=patient_of(Path(p).parent.name), width=0, height=0, spacing_mm=spacing,
                           dicom_window=window, boxes=np.zeros((0, 4), np.float32), lesion_types=(),
                           file_name=f"{Path(p).parent.name}_{Path(p).name}", spacing_z_mm=spacing_z, weight=weight)
    items = [unlabelled(p) for p in paths]
    dets, _ = detect(model, spec, decoding, items, bs=bs, cache=cache)
    out = []
    for r, b, s in zip(items, dets.boxes, dets.scores):
        keep = np.flatnonzero(s >= threshold)[:MAX_PSEUDO_BOXES]
        if not len(keep): continue
        with open_png(r.image_path) as im: w, h = im.size
        px = (b[keep] * np.array([w, h, w, h], np.float32)).astype(np.float32)
        out.append((dataclasses.replace(r, width=w, height=h, boxes=px, lesion_types=(-1,) * len(keep)), s[keep]))
    return out


def write_pseudo_labels(path: Path | str, labelled, teacher: str) -> Path:
    """The pseudo-labels (`pseudo_label`'s (record, scores) pairs) as a DeepLesion-style CSV: one row
    per box, DL_info.csv's columns for the slice and its box (training split), its score and the
    teacher that gave it."""
    from .files import write_csv
    rows = []
    for r, scores in labelled:
        series = Path(r.image_path).parent.name.split('_')
        for b, score in zip(r.boxes, scores):
            rows.append([r.file_name, int(series[0]), int(series[1]), int(series[2]), int(Path(r.image_path).stem),
                         ', '.join(f'{v:.2f}' for v in b), f'{r.width}, {r.height}',
                         ', '.join(f'{v:g}' for v in (*r.spacing_mm, r.spacing_z_mm)), 1, f'{score:.4f}', teacher])
    return write_csv(path, PSEUDO_COLUMNS, rows)


def read_pseudo_labels(path: Path | str, data, records, weight: float) -> list[SliceRecord]:
    """The training records of a pseudo-label CSV (`write_pseudo_labels`) over the data folder `data`, at
    `weight`; a slice of a validation or test patient (`records` says whose) is an error: those are
    never trained on. Spacing and DICOM window come from the series' rows in `records`."""
    from .deeplesion import image_path
    path = Path(path)
    if not path.is_file(): raise FileNotFoundError(f"--pseudo-labels {path}: no such file")
    held_out = {r.patient for r in records if r.split != 'train'}
    settings = _series_settings(records)
    by_slice: dict[str, list] = {}
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != PSEUDO_COLUMNS:
            raise ValueError(f"{path} line 1: not a pseudo-label CSV (expected the columns {', '.join(PSEUDO_COLUMNS)})")
        for row in reader:
            try:
                box = [float(v) for v in row['Bounding_boxes'].split(',')]
                w, h = (int(v) for v in row['Image_size'].split(','))
                patient = int(row['Patient_index'])
                if len(box) != 4 or not all(map(math.isfinite, box)) or not box[0] < box[2] or not box[1] < box[3]:
                    raise ValueError(f"Bounding_boxes {row['Bounding_boxes']!r}")
            except ValueError as e:
                raise ValueError(f"{path} line {reader.line_num}: {e}, expected a box x1, y1, x2, y2 and a size w, h") from None
            if patient in held_out:
                raise ValueError(f"{path} line {reader.line_num}: patient {patient} is a validation or test patient, never trained on")
            by_slice.setdefault(row['File_name'], [w, h, patient, []])[3].append(box)
    out = []
    for name, (w, h, patient, boxes) in by_slice.items():
        img = image_path(name, data)
        spacing, window, spacing_z = settings.get(img.parent.name, ((0., 0.), (-150., 250.), 0.))
        out.append(SliceRecord(image_path=str(img), split='train', patient=patient, width=w, height=h, spacing_mm=spacing,
                               dicom_window=window, boxes=np.array(boxes, np.float32), lesion_types=(-1,) * len(boxes), file_name=name,
                               spacing_z_mm=spacing_z, weight=weight))
    return out
