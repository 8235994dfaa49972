"""DeepLesion's files as NIH ships them: `DL_info.csv`, `Images_png/` and 16-bit slices in HU.

This module knows the dataset's columns, paths and pixel encoding and nothing about fastai:
`data.py` builds DataBlocks on top of what is read here.
"""
from __future__ import annotations

import csv
import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .pngs import HU_OFFSET, MAX_SLICE_PX, SliceFileError, check_png, load_hu, open_png, save_hu

__all__ = ['COLUMNS', 'SPLITS', 'WINDOWS', 'HU_OFFSET', 'read_dl_info', 'image_path', 'SliceFileError', 'open_png', 'load_hu', 'check_png', 'save_hu',
           'window', 'resolve_windows', 'neighbour_path', 'context_paths', 'list_slices', 'SliceRecord',
           'slice_records', 'evaluation_records', 'load_data', 'lesion_statistics', 'patient_of', 'ships_neighbours', 'format_numbers']

# The 18 columns of DL_info.csv, in the official order.
COLUMNS = ('File_name', 'Patient_index', 'Study_index', 'Series_ID', 'Key_slice_index',
           'Measurement_coordinates', 'Bounding_boxes', 'Lesion_diameters_Pixel_',
           'Normalized_lesion_location', 'Coarse_lesion_type', 'Possibly_noisy', 'Slice_range',
           'Spacing_mm_px_', 'Image_size', 'DICOM_windows', 'Patient_gender', 'Patient_age',
           'Train_Val_Test')
SPLITS = {1: 'train', 2: 'val', 3: 'test'}

# Named CT windows, (low, high) in HU. Widths/levels as in fastai.medical.imaging's dicom_windows,
# plus the wide window of the reference detectors (3DCE, MULAN).
WINDOWS = {
    'soft': (-150., 250.),     # abdomen soft tissue, width 400 level 50
    'liver': (-45., 105.),     # width 150 level 30
    'lung': (-1350., 150.),    # width 1500 level -600
    'bone': (-500., 1300.),    # spine bone, width 1800 level 400
    'wide': (-1024., 3071.),   # reference preprocessing of Ke Yan's detectors
}

_FILE_RE = re.compile(r'^(\d+)_(\d+)_(\d+)_(\d+)\.png$')
_INT_RE = re.compile(r'^-?\d{1,9}$')      # the index columns: DeepLesion's are a few digits; 9 keeps them in int64

LESION_TYPES = (-1, 1, 2, 3, 4, 5, 6, 7, 8)   # Coarse_lesion_type: -1 unlabelled (all of train), 1-8 the eight types
MAX_FIELD_CHARS = 10_000  # no DeepLesion field is longer than a few dozen characters
# How far past the slice border a box or a RECIST point may reach and still be read (boxes are then clipped to the
# slice): DeepLesion pads the RECIST extent by 5 px each side, and its RECIST points sit up to a pixel past the last
# pixel, so a lesion touching the border has a box up to 6 px outside it (the official test split: 1.7 px).
BORDER_TOLERANCE_PX = 6.

# Multi-number columns: (csv column, how many numbers, output column names).
_VECTORS = (
    ('Measurement_coordinates', 8, ('long_x1', 'long_y1', 'long_x2', 'long_y2',
                                    'short_x1', 'short_y1', 'short_x2', 'short_y2')),
    ('Bounding_boxes', 4, ('x1', 'y1', 'x2', 'y2')),
    ('Lesion_diameters_Pixel_', 2, ('diameter_long_px', 'diameter_short_px')),
    ('Normalized_lesion_location', 3, ('location_x', 'location_y', 'location_z')),
    ('Slice_range', 2, ('slice_first', 'slice_last')),
    ('Spacing_mm_px_', 3, ('spacing_x_mm', 'spacing_y_mm', 'spacing_z_mm')),
    ('Image_size', 2, ('width', 'height')),
    ('DICOM_windows', 2, ('window_low', 'window_high')),
)
_SCALARS = (('Patient_index', 'patient'), ('Study_index', 'study'), ('Series_ID', 'series_id'),
            ('Key_slice_index', 'key_slice'), ('Coarse_lesion_type', 'lesion_type'))
_INT_COLUMNS = ('patient', 'study', 'series_id', 'key_slice', 'lesion_type', 'slice_first', 'slice_last',
                'width', 'height', 'line')


def _rows(reader, path):
    "The header row of `reader`, a csv.Error named as the file's line 1."
    try: return next(reader, ())
    except csv.Error as e: raise ValueError(f"{path} line 1: {e}") from None


def image_path(file_name: str, root: Path | str = '.') -> Path:
    """The PNG of a `File_name`: `000001_01_01_109.png` -> `root/Images_png/000001_01_01/109.png`."""
    m = _FILE_RE.match(file_name)
    if m is None: raise ValueError(f"File_name {file_name!r}: expected <patient>_<study>_<series>_<slice>.png")
    patient, study, series, key = m.groups()
    return Path(root) / 'Images_png' / f'{patient}_{study}_{series}' / f'{int(key):03d}.png'


def format_numbers(*values) -> str:
    "Numbers as a DL_info.csv field writes them: `233.537, 95.0204` (integers plain, others to 4 decimals, trailing zeros cut)."
    return ', '.join(f'{x:g}' if isinstance(x, (int, np.integer)) else f'{x:.4f}'.rstrip('0').rstrip('.') for x in values)


def patient_of(series_dir: str) -> int:
    "Patient index of a series folder name such as `000001_01_01`."
    return int(series_dir.split('_')[0])


def _numbers(text: str, n: int, column: str) -> list[float]:
    parts = [p.strip() for p in text.split(',')]
    if len(parts) != n or any(p == '' for p in parts):
        raise ValueError(f"{column} has {len([p for p in parts if p])} numbers, expected {n}")
    try: values = [float(p) for p in parts]
    except ValueError: raise ValueError(f"{column} {text!r} is not {n} comma-separated numbers") from None
    if not all(np.isfinite(values)): raise ValueError(f"{column} {text!r} holds NaN or an infinity, expected {n} finite numbers")
    return values


def _integer(text: str, column: str) -> int:
    text = text.strip()
    if not _INT_RE.match(text): raise ValueError(f"{column} {text!r}: expected a whole number of at most 9 digits")
    return int(text)


def _check_values(rec: dict) -> None:
    """What the pipeline reads must be possible: sizes, boxes, axes and diameters inside the slice (boxes and axes
    up to `BORDER_TOLERANCE_PX` past its border),
    spacing positive, a known lesion type, a window with low < high, the key slice in its range.
    Raises ValueError naming the field and what was expected."""
    w, h = rec['width'], rec['height']
    if not (1 <= w <= MAX_SLICE_PX and 1 <= h <= MAX_SLICE_PX):
        raise ValueError(f"Image_size ({w:g}, {h:g}): expected a width and height of 1 to {MAX_SLICE_PX} px")
    box = rec['x1'], rec['y1'], rec['x2'], rec['y2']
    if not (rec['x1'] < rec['x2'] and rec['y1'] < rec['y2']):
        raise ValueError(f"Bounding_boxes ({', '.join(f'{v:g}' for v in box)}) has no area, expected x1 < x2 and y1 < y2")
    t = BORDER_TOLERANCE_PX
    if rec['x1'] < -t or rec['y1'] < -t or rec['x2'] > w + t or rec['y2'] > h + t:
        raise ValueError(f"Bounding_boxes ({', '.join(f'{v:g}' for v in box)}) is not inside the {w:g} x {h:g} slice of Image_size, "
                         f"expected 0 <= x1 < x2 <= {w:g} and 0 <= y1 < y2 <= {h:g} (up to {t:g} px past the border is clipped to it)")
    if min(rec['x2'], w) - max(rec['x1'], 0) <= 0 or min(rec['y2'], h) - max(rec['y1'], 0) <= 0:
        raise ValueError(f"Bounding_boxes ({', '.join(f'{v:g}' for v in box)}) lies outside the {w:g} x {h:g} slice of Image_size, "
                         f"expected a box that overlaps it")
    axes = [rec[k] for k in ('long_x1', 'long_y1', 'long_x2', 'long_y2', 'short_x1', 'short_y1', 'short_x2', 'short_y2')]
    if not all(-t <= v <= max(w, h) + t for v in axes):
        raise ValueError(f"Measurement_coordinates ({', '.join(f'{v:g}' for v in axes)}) leaves the {w:g} x {h:g} slice, "
                         f"expected pixel coordinates inside it (up to {t:g} px past the border)")
    diagonal = float(np.hypot(w, h))
    if not all(0 <= rec[k] <= diagonal for k in ('diameter_long_px', 'diameter_short_px')):
        raise ValueError(f"Lesion_diameters_Pixel_ ({rec['diameter_long_px']:g}, {rec['diameter_short_px']:g}): expected lengths "
                         f"of 0 to the slice's diagonal, {diagonal:.0f} px")
    if not all(0 <= rec[k] <= 1 for k in ('location_x', 'location_y', 'location_z')):
        raise ValueError(f"Normalized_lesion_location ({rec['location_x']:g}, {rec['location_y']:g}, {rec['location_z']:g}): "
                         f"expected three numbers in [0, 1]")
    spacing = rec['spacing_x_mm'], rec['spacing_y_mm'], rec['spacing_z_mm']
    if not all(0 < v <= 100 for v in spacing):
        raise ValueError(f"Spacing_mm_px_ ({', '.join(f'{v:g}' for v in spacing)}): expected pixel spacing and slice interval "
                         f"in mm, each above 0 (DeepLesion: pixels 0.18-0.98, slices mostly 1 or 5)")
    if rec['lesion_type'] not in LESION_TYPES:
        raise ValueError(f"Coarse_lesion_type {rec['lesion_type']}: expected -1 (unlabelled) or 1-8")
    if not rec['window_low'] < rec['window_high']:
        raise ValueError(f"DICOM_windows ({rec['window_low']:g}, {rec['window_high']:g}): expected low < high in HU")
    if not rec['slice_first'] <= rec['key_slice'] <= rec['slice_last']:
        raise ValueError(f"Slice_range ({rec['slice_first']:g}, {rec['slice_last']:g}) does not hold Key_slice_index "
                         f"{rec['key_slice']}, expected first <= key <= last")


def _clip_box(rec: dict) -> bool:
    "Clip the row's box to its slice (it may reach `BORDER_TOLERANCE_PX` past it); whether it moved."
    inside = (max(rec['x1'], 0.), max(rec['y1'], 0.), min(rec['x2'], float(rec['width'])), min(rec['y2'], float(rec['height'])))
    moved = inside != (rec['x1'], rec['y1'], rec['x2'], rec['y2'])
    rec['x1'], rec['y1'], rec['x2'], rec['y2'] = inside
    return moved


def _parse_row(row: dict, root: Path) -> dict:
    "One CSV row -> typed fields. Raises ValueError naming the field; the caller adds file and line."
    for col, text in row.items():
        if '\x00' in text or '\n' in text or '\r' in text:
            raise ValueError(f"{col} holds a {'NUL byte' if chr(0) in text else 'line break'}, expected one line of text")
        if len(text) > MAX_FIELD_CHARS: raise ValueError(f"{col} is {len(text):,} characters long, expected at most {MAX_FIELD_CHARS:,}")
    rec = {'file_name': row['File_name'].strip()}
    for col, name in _SCALARS: rec[name] = _integer(row[col], col)
    for col, n, names in _VECTORS: rec.update(zip(names, _numbers(row[col], n, col)))
    m = _FILE_RE.match(rec['file_name'])
    if m is None: raise ValueError(f"File_name {rec['file_name']!r}: expected <patient>_<study>_<series>_<slice>.png")
    if (int(m[1]), int(m[2]), int(m[3]), int(m[4])) != (rec['patient'], rec['study'], rec['series_id'], rec['key_slice']):
        raise ValueError(f"File_name {rec['file_name']!r} disagrees with Patient_index/Study_index/Series_ID/Key_slice_index")
    if rec['x2'] < rec['x1'] or rec['y2'] < rec['y1']:
        raise ValueError(f"Bounding_boxes ({rec['x1']:g}, {rec['y1']:g}, {rec['x2']:g}, {rec['y2']:g}) "
                         f"has x2 < x1 or y2 < y1, expected x1 <= x2 and y1 <= y2")
    if rec['slice_last'] < rec['slice_first']: raise ValueError(f"Slice_range {row['Slice_range'].strip()!r}: last < first, expected first, last with first <= last")
    for name, col in (('slice_first', 'Slice_range'), ('slice_last', 'Slice_range'), ('width', 'Image_size'), ('height', 'Image_size')):
        if rec[name] != int(rec[name]) or abs(rec[name]) > 1e9: raise ValueError(f"{col} {row[col].strip()!r}: {rec[name]:g}, expected whole numbers (slice indices, sizes in px)")
    _check_values(rec)
    rec['clipped'] = _clip_box(rec)
    split = row['Train_Val_Test'].strip()
    if split not in ('1', '2', '3'): raise ValueError(f"Train_Val_Test {split!r} is unknown, expected 1, 2 or 3")
    rec['split'] = SPLITS[int(split)]
    noisy = row['Possibly_noisy'].strip()
    if noisy not in ('0', '1'): raise ValueError(f"Possibly_noisy {noisy!r}, expected 0 or 1")
    rec['noisy'] = noisy == '1'
    rec['gender'] = row['Patient_gender'].strip()
    age = row['Patient_age'].strip()
    try: rec['age'] = float(age) if age not in ('', 'NaN', 'nan') else np.nan
    except ValueError: raise ValueError(f"Patient_age {age!r}: expected a number (or nothing)") from None
    path = image_path(rec['file_name'], root)
    rec['series_dir'], rec['image_path'] = path.parent.name, str(path)
    return rec


def read_dl_info(path: Path | str, root: Path | str | None = None, strict: bool = True) -> pd.DataFrame:
    """Read `DL_info.csv` into one typed row per lesion.

    Every official column is parsed: boxes `x1, y1, x2, y2` in pixels, the 8 RECIST numbers, diameters,
    normalized location, slice range, spacing in mm, image size, DICOM window, gender, age (NaN when
    missing), `split` as 'train' / 'val' / 'test', plus `series_dir` and the slice's `image_path` under
    `root` (default: the CSV's folder) and `line`, the row's line in the file. Bad input raises `ValueError` naming the file, line and field;
    with `strict=False` bad rows are skipped with one warning that lists them. A file the csv module
    cannot split into rows (a field over its limit, an unclosed quote that swallows the lines after it)
    is an error either way: which rows it holds is not known, so none can be skipped safely.
    """
    path = Path(path)
    root = path.parent if root is None else Path(root)
    records, bad, seen, repeated = [], [], {}, []
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:      # a BOM, as some editors write, is read past
            reader = csv.reader(f)
            header = tuple(h.strip() for h in _rows(reader, path))
            if header != COLUMNS:
                missing = [c for c in COLUMNS if c not in header]
                extra = [c for c in header if c not in COLUMNS]
                moved = [f"{c} at column {header.index(c) + 1}" for i, c in enumerate(COLUMNS) if c in header and header.index(c) != i]
                repeated = sorted({c for c in header if header.count(c) > 1})
                raise ValueError(f"{path} line 1: header is not DeepLesion's 18 columns in order "
                                 + (f"(missing {missing}, unexpected {extra})" if missing or extra else
                                    f"({', '.join(repeated)} more than once; expected each of the 18 once)" if repeated else
                                    f"(the right names in another order: {', '.join(moved[:4])}{' ...' if len(moved) > 4 else ''}; "
                                    f"expected {', '.join(COLUMNS)})"))
            while True:
                try: row = next(reader, None)
                except csv.Error as e:
                    row, problem = [], f"{e}: expected fields of at most {MAX_FIELD_CHARS:,} characters and closed quotes (a field longer than any DeepLesion field, or an unclosed quote)"
                else: problem = None
                if row is None: break
                if not row and problem is None: continue
                key = tuple(c.strip() for c in row)
                if key in seen:                      # the same lesion twice: read once
                    repeated.append((reader.line_num, seen[key]))
                    continue
                seen[key] = reader.line_num
                try:
                    if problem: raise ValueError(problem)
                    if len(row) != len(COLUMNS): raise ValueError(f"row has {len(row)} fields, expected {len(COLUMNS)}")
                    records.append({**_parse_row(dict(zip(COLUMNS, row)), root), 'line': reader.line_num})
                except ValueError as e:
                    msg = f"{path} line {reader.line_num}: {e}"
                    if strict or problem: raise ValueError(msg) from None
                    bad.append(msg)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); expected DL_info.csv as NIH ships it, "
                         f"ASCII / UTF-8 (a UTF-16 or Latin-1 export must be saved as UTF-8)") from None
    if bad: warnings.warn(f"skipped {len(bad)} bad row(s) of {path}:\n" + '\n'.join(bad), stacklevel=2)
    from .log import log
    if repeated:
        log.info(f"{path}: {len(repeated)} row(s) repeat an earlier row and were read once (line {repeated[0][0]} repeats line {repeated[0][1]})")
    clipped = [r['line'] for r in records if r.pop('clipped')]
    if clipped:
        log.info(f"{path}: {len(clipped)} box(es) clipped to the slice border (at most {BORDER_TOLERANCE_PX:g} px past it): "
                 f"line{'s' if len(clipped) > 1 else ''} {', '.join(map(str, clipped[:10]))}{' ...' if len(clipped) > 10 else ''}")
    df = pd.DataFrame.from_records(records)
    if df.empty: return df
    for c in _INT_COLUMNS: df[c] = df[c].astype('int64')
    df['split'] = pd.Categorical(df['split'], categories=list(SPLITS.values()))
    return df


# --- pixels: the slice files themselves are read and written in `pngs.py` ------------------------------

def window(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    "Clip HU to [low, high] and scale to float32 [0, 1]."
    return np.clip((hu - low) / (high - low), 0., 1.).astype(np.float32)


def resolve_windows(names: str | list[str], dicom_window: tuple[float, float] | None = None) -> list[tuple[float, float]]:
    """Window names -> (low, high) pairs. Names are keys of `WINDOWS`, `dicom` (the row's own
    DICOM_windows) or an explicit `low:high`."""
    if isinstance(names, str): names = [n for n in names.split(',') if n]
    out = []
    for n in names:
        if n == 'dicom':
            if dicom_window is None: raise ValueError("window 'dicom' needs the row's DICOM_windows")
            out.append(tuple(map(float, dicom_window)))
        elif n in WINDOWS: out.append(WINDOWS[n])
        elif ':' in n:
            low, high = map(float, n.split(':'))
            if high <= low: raise ValueError(f"window {n!r}: expected low < high")
            out.append((low, high))
        else: raise ValueError(f"unknown window {n!r}: expected one of {sorted(WINDOWS)}, 'dicom' or LOW:HIGH")
    return out


# --- slices on disk ------------------------------------------------------------------------------

def neighbour_path(key_path: Path | str, offset: int, max_search: int = 8, absent=frozenset()) -> Path:
    """The slice `offset` positions from `key_path` in its series, or the nearest existing slice to it
    (ties go towards the key slice) when DeepLesion did not ship it; the key slice itself when there is none,
    or when its name is not a slice number (`slice.png`), so that no neighbour can be named. Paths in
    `absent` (as strings: files a run leaves out as unreadable) count as not shipped."""
    key_path = Path(key_path)
    if not key_path.stem.isdigit(): return key_path
    k = int(key_path.stem)
    target = k + offset
    for d in range(max_search + 1):
        for cand in sorted({target - d, target + d}, key=lambda i: abs(i - k)):
            p = key_path.with_name(f'{cand:03d}.png')
            if p.exists() and str(p) not in absent: return p
    return key_path


def context_paths(key_path: Path | str, context: int, absent=frozenset()) -> list[Path]:
    "`context` slices below and above the key slice, in order: [k-c, ..., k, ..., k+c] (`absent`: as `neighbour_path`)."
    key_path = Path(key_path)
    return [key_path if o == 0 else neighbour_path(key_path, o, absent=absent) for o in range(-context, context + 1)]


def ships_neighbours(records, at_least: float = .5) -> bool:
    """Whether the data ships neighbour slices beside its key slices (DeepLesion ships about 30 mm above
    and below each): at least `at_least` of the key slices have the slices right above and below them."""
    if not records: return False
    has = lambda r: all(Path(r.image_path).with_name(f'{int(Path(r.image_path).stem) + o:03d}.png').is_file() for o in (-1, 1))
    return sum(map(has, records)) >= at_least * len(records)


def list_slices(root: Path | str, patients: set[int] | None = None) -> list[Path]:
    """Every PNG under `root/Images_png` (key slices and neighbours, labeled or not), sorted;
    only those of `patients` when given."""
    images = Path(root) / 'Images_png'
    if not images.is_dir(): raise FileNotFoundError(f"{images}: no Images_png folder (expected DeepLesion's layout)")
    series = sorted(d for d in images.iterdir() if d.is_dir())
    if patients is not None: series = [d for d in series if patient_of(d.name) in patients]
    return [p for d in series for p in sorted(d.glob('*.png'))]


# --- per-slice records ---------------------------------------------------------------------------

@dataclass
class SliceRecord:
    """One key slice and all its lesions. `boxes` [n, 4] x1,y1,x2,y2 in pixels, with one entry per lesion
    in `lesion_types`, `noisy` (Possibly_noisy), `lines` (its line in DL_info.csv) and `diameters_px`
    (long diameters). `spacing_z_mm` is the series' slice interval. `weight` is how much its lesions
    count as training targets: 1 for labels, less for labels carried to a neighbour slice or put
    there by a teacher (`unlabelled.py`)."""
    image_path: str
    split: str
    patient: int
    width: int
    height: int
    spacing_mm: tuple[float, float]
    dicom_window: tuple[float, float]
    boxes: np.ndarray
    lesion_types: tuple[int, ...]
    noisy: tuple[bool, ...] = ()
    lines: tuple[int, ...] = ()
    file_name: str = ''
    spacing_z_mm: float = 0.
    diameters_px: tuple[float, ...] = ()
    weight: float = 1.

    def __post_init__(self):
        n = len(self.boxes)
        if not self.noisy: self.noisy = (False,) * n
        if len(self.lesion_types) != n or len(self.noisy) != n or (self.lines and len(self.lines) != n):
            raise ValueError(f"{self.image_path}: {n} boxes but {len(self.lesion_types)} types, {len(self.noisy)} noisy flags")

    def where(self) -> str:
        "Where this slice is named: 'DL_info.csv line 17' (or lines 17, 18 for several lesions)."
        if not self.lines: return 'DL_info.csv'
        return f"DL_info.csv line{'s' if len(self.lines) > 1 else ''} {', '.join(map(str, self.lines))}"

    def without_noisy(self) -> 'SliceRecord | None':
        "The same slice with its `Possibly_noisy` lesions dropped; None when none is left."
        keep = [i for i, n in enumerate(self.noisy) if not n]
        if len(keep) == len(self.noisy): return self
        if not keep: return None
        pick = lambda t: tuple(t[i] for i in keep)
        return dataclasses.replace(self, boxes=self.boxes[keep], lesion_types=pick(self.lesion_types), noisy=pick(self.noisy),
                                   lines=pick(self.lines) if self.lines else (), diameters_px=pick(self.diameters_px) if self.diameters_px else ())


def slice_records(df: pd.DataFrame) -> list[SliceRecord]:
    """Group lesion rows into one `SliceRecord` per key slice (rows sharing a File_name), in file order."""
    out = []
    for fname, g in df.groupby('file_name', sort=False):
        r = g.iloc[0]
        out.append(SliceRecord(
            image_path=r.image_path, split=str(r.split), patient=int(r.patient),
            width=int(r.width), height=int(r.height), spacing_mm=(float(r.spacing_x_mm), float(r.spacing_y_mm)),
            dicom_window=(float(r.window_low), float(r.window_high)),
            boxes=g[['x1', 'y1', 'x2', 'y2']].to_numpy(np.float32), lesion_types=tuple(int(t) for t in g.lesion_type),
            noisy=tuple(bool(n) for n in g.noisy), lines=tuple(int(n) for n in g.line) if 'line' in g else (),
            file_name=str(fname), spacing_z_mm=float(r.spacing_z_mm), diameters_px=tuple(float(d) for d in g.diameter_long_px)))
    return out


def evaluation_records(records: list[SliceRecord], split: str) -> list[SliceRecord]:
    """The slices of `split` as DeepLesion's evaluation protocol scores them (3DCE, MULAN): lesions
    marked `Possibly_noisy` are dropped, then slices left without a lesion. Used for validation and
    test alike."""
    out = [r.without_noisy() for r in records if r.split == split]
    return [r for r in out if r is not None]


def load_data(data: Path | str, missing_ok: bool = False) -> tuple[pd.DataFrame, list[SliceRecord]]:
    """(lesion table, slice records) of a DeepLesion-layout folder; clear errors when it is not one or
    when a key slice named in DL_info.csv is missing (`missing_ok`: the caller leaves such slices out, as
    `--skip-unreadable` does)."""
    data = Path(data)
    if not data.is_dir(): raise FileNotFoundError(f"--data {data}: no such folder")
    csv_path = data / 'DL_info.csv'
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: missing; --data must hold DL_info.csv and Images_png/ as NIH ships them "
                                f"(to try the pipeline on built-in synthetic data, write it to a folder of its own: "
                                f"python -m lesion_fastai.synthetic --out data/synthetic, then --data data/synthetic)")
    df = read_dl_info(csv_path)
    if df.empty: raise ValueError(f"{csv_path}: no lesion rows")
    records = slice_records(df)
    missing = [] if missing_ok else [r for r in records if not Path(r.image_path).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} key slice(s) named in {csv_path} are missing, first {missing[0].image_path} "
                                f"({missing[0].where()})")
    return df, records


def lesion_statistics(df: pd.DataFrame) -> dict:
    """What a set of DL_info rows looks like: lesions per key slice and the share of slices with
    several, long diameters in mm (diameter in pixels x pixel spacing), the coarse type mix of the
    labelled lesions (types 1-8), and the share marked Possibly_noisy."""
    per_slice = df.groupby('file_name').size()
    d_mm = (df.diameter_long_px * df.spacing_x_mm).to_numpy()
    typed = df.lesion_type[df.lesion_type > 0]
    return {'lesions': int(len(df)), 'key_slices': int(len(per_slice)), 'lesions_per_slice': float(per_slice.mean()),
            'multi_lesion_slices': float((per_slice > 1).mean()),
            'diameter_mm': {f'p{q}': float(np.percentile(d_mm, q)) for q in (5, 25, 50, 75, 95)},
            'labelled_lesions': int(len(typed)), 'types': {int(t): float(c / len(typed)) for t, c in typed.value_counts().items()},
            'noisy': float(df.noisy.mean())}
