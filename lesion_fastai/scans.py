"""CT scans other than DeepLesion's labelled layout, read as series of slices in HU for prediction:
PNG slices (DeepLesion's 16-bit encoding; neighbours by slice number, as in training), DICOM series
(HU from RescaleSlope / RescaleIntercept, pixel spacing from the header, slices ordered by their
position along the slice normal, the most superior first), NIfTI volumes (reoriented and numbered as `convert` writes them: RAS+,
anterior at the top, slice 1 the most superior, whatever the stored axis order). DICOM and NIfTI
need the optional extra: pip install -e '.[dicom]'. Like `deeplesion.py` beside it, this module knows
files and pixels, nothing about models.
"""
from __future__ import annotations

import csv
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .deeplesion import SliceFileError, open_png

__all__ = ['Series', 'find_inputs', 'read_dicom_series', 'dicom_hu', 'deeplesion_rows', 'axial', 'nifti_spacing']

_NIFTI = ('.nii', '.nii.gz')
_DEEPLESION_FOLDER = re.compile(r'^\d+_\d+_\d+$')


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
    view: tuple = (False, False, False)   # DICOM: (transpose, flip rows, flip columns) that show a slice as DeepLesion does

    def __len__(self): return len(self.names)

    def hu(self, i: int) -> np.ndarray:
        "Slice `i` (0-based, in the series' order) in HU, [H, W] float32, shown as DeepLesion shows a slice."
        if self.kind == 'dicom':
            a = dicom_hu(self.files[i])
            transpose, flip_rows, flip_cols = self.view
            if transpose: a = a.T
            return np.ascontiguousarray(a[::-1 if flip_rows else 1, ::-1 if flip_cols else 1])
        st = Path(self.source).stat()
        volume = _nifti_volume(self.source, st.st_size, st.st_mtime_ns)     # a file rewritten meanwhile is read again
        return np.ascontiguousarray(axial(volume, volume.shape[2] - 1 - i))   # slice i + 1, the most superior first


def axial(volume: np.ndarray, k: int) -> np.ndarray:
    """Axial slice `k` (RAS+ index, inferior first) of a RAS+ volume [X, Y, Z] as DeepLesion shows it, [H=Y, W=X]:
    axis 0 runs toward the patient's right and axis 1 toward anterior, so both are reversed (anterior at the top,
    the patient's left on the image's right) and transposed to rows x columns."""
    return volume[::-1, ::-1, k].T


def _canonical_axes(img, nib) -> np.ndarray:
    "nibabel's orientation of `img` ([stored axis] -> (RAS+ axis, flip)), the one `as_closest_canonical` applies."
    ornt = nib.orientations.io_orientation(img.affine)
    if np.isnan(ornt).any(): raise ValueError(f"affine {img.affine.tolist()} has no axis orientation, expected a CT volume's")
    return ornt


@functools.lru_cache(maxsize=1)
def _nifti_volume(source: str, size: int, mtime_ns: int) -> np.ndarray:
    """The NIfTI volume at `source` in HU, float32, reoriented to RAS+ as `convert` reads it (nibabel's
    `as_closest_canonical`); the last one read is kept, as predict reads a volume's slices one after another."""
    nib = _extra('nibabel')
    return np.asarray(nib.as_closest_canonical(nib.load(source)).dataobj, dtype=np.float32)   # scl_slope / scl_inter applied


def forget_volumes() -> None:
    "Let go of the NIfTI volume kept for `Series.hu` (a predict run calls this when it is done)."
    _nifti_volume.cache_clear()


def nifti_spacing(img, nib) -> tuple[float, float]:
    "(row, column) mm per pixel of a NIfTI volume's slices as `Series.hu` shows them: the RAS+ y and x voxel sizes, from the affine as `convert` takes them."
    ornt, sizes = _canonical_axes(img, nib), nib.affines.voxel_sizes(img.affine)
    size = {int(ornt[i, 0]): float(sizes[i]) for i in range(3)}
    return size[1], size[0]


def dicom_hu(path) -> np.ndarray:
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
    """DICOM files grouped into series (SeriesInstanceUID, and within it the image size and orientation, so a
    localizer or a second stack sharing the UID is a series of its own) and ordered as `convert` numbers a
    volume's slices: the most superior first (ImagePositionPatient projected on the slice normal,
    ImageOrientationPatient's cross product, counted toward the head; the InstanceNumber where a file of
    the series lacks them). Returns the series and the (file, reason) pairs of files skipped: unreadable,
    not CT, colour, multi-frame or a localizer."""
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
        if 'LOCALIZER' in [str(v).upper() for v in getattr(ds, 'ImageType', [])]:
            skipped.append((str(p), 'DICOM ImageType LOCALIZER (a scout image), expected an axial CT slice')); continue
        height = orientation = None
        try:
            o = np.asarray(ds.ImageOrientationPatient, float)
            orientation, normal = tuple(np.round(o, 2)), np.cross(o[:3], o[3:])
            height = float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)) * (-1. if normal[2] < 0 else 1.)   # toward the head
        except (AttributeError, ValueError, TypeError): pass
        spacing = tuple(float(v) for v in ds.PixelSpacing) if hasattr(ds, 'PixelSpacing') else None
        uid = str(getattr(ds, 'SeriesInstanceUID', Path(p).parent))
        number = float(getattr(ds, 'InstanceNumber', 0) or 0)
        groups.setdefault((uid, getattr(ds, 'Rows', None), getattr(ds, 'Columns', None), orientation), []).append(
            (height, number, str(p), spacing, _dicom_window(ds, pydicom)))
    for key in [k for k in groups if k[3] is None]:                  # no orientation: with the largest stack of its UID and size
        known = [k for k in groups if k[:3] == key[:3] and k[3] is not None]
        if known: groups[max(known, key=lambda k: len(groups[k]))] += groups.pop(key)
    series = []
    for (_, _, _, orientation), items in groups.items():
        if all(t[0] is not None for t in items): items.sort(key=lambda t: (-t[0], t[2]))   # the most superior first
        else: items.sort(key=lambda t: (t[1], t[2]))                   # positions unknown: the scanner's numbering
        view = _dicom_view(orientation)
        spacing = items[0][3][::-1] if items[0][3] and view[0] else items[0][3]
        series.append(Series('dicom', str(Path(items[0][2]).parent), [t[2] for t in items], [t[2] for t in items],
                             spacing, [t[4] for t in items], view))
    return series, skipped


def _dicom_view(orientation) -> tuple[bool, bool, bool]:
    """(transpose, flip rows, flip columns) that show an axial DICOM slice stored along `orientation`
    (ImageOrientationPatient, LPS) as DeepLesion and `convert` show one: the patient's left on the image's
    right, anterior at the top. Other orientations (sagittal, coronal) and unknown ones are shown as stored."""
    if orientation is None: return False, False, False
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    if abs(np.cross(row, col)[2]) < .5: return False, False, False    # not an axial slice
    transpose = abs(row[1]) > abs(row[0])                               # columns run front to back: rows and columns swap
    if transpose: row, col = col, row
    return transpose, col[1] < 0, row[0] < 0


def _dicom_window(ds, pydicom) -> tuple[float, float] | None:
    "The (low, high) HU of a file's first WindowCenter / WindowWidth, or None where they are absent, empty or not a window."
    first = lambda v: float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
    try: c, w = first(ds.WindowCenter), first(ds.WindowWidth)
    except (AttributeError, IndexError, TypeError, ValueError): return None
    return (c - w / 2, c + w / 2) if math.isfinite(c) and math.isfinite(w) and w > 0 else None


def _png_name(path: Path) -> str:
    "DeepLesion's File_name (<patient>_<study>_<series>_<slice>.png) for a slice in its layout, else the path."
    return f'{path.parent.name}_{path.name}' if _DEEPLESION_FOLDER.match(path.parent.name) else str(path)


def deeplesion_rows(folder: Path, tables: dict | None = None) -> tuple[tuple[float, float] | None, dict[int, tuple[float, float]]]:
    """What `<data>/DL_info.csv` says of a series folder in DeepLesion's layout (`<data>/Images_png/<series>/`):
    its (row, column) pixel spacing in mm from `Spacing_mm_px_` (None where no row gives a valid one), and
    the `DICOM_windows` (low, high) of each of its key slices by slice number. (None, {}) where there is no
    such file. `tables` caches the files read (csv path -> {series: (spacing, windows)})."""
    folder = Path(folder)
    csv_path = folder.parent.parent / 'DL_info.csv'
    if folder.parent.name != 'Images_png' or not csv_path.is_file(): return None, {}
    tables = {} if tables is None else tables
    if csv_path not in tables:
        found = {}
        try:
            with open(csv_path, newline='', encoding='utf-8-sig', errors='replace') as f:
                for row in csv.DictReader(f):
                    name, _, number = (row.get('File_name') or '').rpartition('_')
                    if not name: continue
                    spacing, windows = found.setdefault(name, [None, {}])
                    try: x, y = (float(v) for v in (row.get('Spacing_mm_px_') or '').split(',')[:2])
                    except ValueError: x = y = math.nan
                    if spacing is None and math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0: found[name][0] = (y, x)
                    try: lo, hi = (float(v) for v in (row.get('DICOM_windows') or '').split(','))
                    except ValueError: continue
                    if number[:-4].isdigit() and math.isfinite(lo) and math.isfinite(hi) and lo < hi: windows.setdefault(int(number[:-4]), (lo, hi))
        except (OSError, csv.Error): pass
        tables[csv_path] = found
    spacing, windows = tables[csv_path].get(folder.name, (None, {}))
    return spacing, windows


def _nearest_windows(paths, windows: dict[int, tuple[float, float]]) -> list | None:
    """Each slice's DICOM window: its own row's, else that of the key slice nearest to it in its series (the
    window a radiologist read that series in); None without any."""
    if not windows: return None
    keys = sorted(windows)
    number = lambda p: int(p.stem) if p.stem.isdigit() else keys[0]
    return [windows[min(keys, key=lambda k: (abs(k - number(p)), k))] for p in paths]


def find_inputs(inputs) -> tuple[list[Series], list[tuple[str, str]], int]:
    """The series to predict from files and folders (searched recursively), the (file, reason) pairs
    of inputs that cannot be predicted, and how many other files inside folders were ignored."""
    kinds, skipped, ignored = {}, [], 0                       # path -> 'png', 'dicom' or 'nifti', in input order
    for given in map(Path, inputs):
        if given.is_dir():
            found = 0
            for p in sorted(q for q in given.rglob('*') if q.is_file()):
                kind = _kind(p)
                if kind: kinds.setdefault(p, kind); found += 1
                else: ignored += 1
            if not found: skipped.append((str(given), 'a folder with no PNG, DICOM or NIfTI file in it'))
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
            with open_png(p): pass                           # the header: 8-bit, RGB, not an image, empty
        except (SliceFileError, FileNotFoundError) as e:
            skipped.append((str(p), str(e).split(': ', 1)[-1])); continue
        pngs.setdefault(p.parent, []).append(p)
    tables = {}
    for folder, ps in pngs.items():
        ps.sort(key=lambda q: (int(q.stem) if q.stem.isdigit() else 0, q.name))
        spacing, windows = deeplesion_rows(folder, tables)
        series.append(Series('png', str(folder), ps, [_png_name(q) for q in ps], spacing, _nearest_windows(ps, windows)))
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
        if 0 in shape: skipped.append((str(p), f"NIfTI of shape {shape}: no slices")); continue
        try: ornt = _canonical_axes(img, nib)
        except ValueError as e: skipped.append((str(p), f"NIfTI {e}")); continue
        try: np.asarray(img.dataobj[..., shape[2] - 1])     # the last slice: a truncated file fails here, not mid-run
        except Exception as e:
            skipped.append((str(p), f"NIfTI data truncated or unreadable ({type(e).__name__}: {e})")); continue
        n = shape[int(np.flatnonzero(ornt[:, 0] == 2)[0])]               # axial slices, whatever axis stores them
        series.append(Series('nifti', str(p), [], [str(p)] * n, nifti_spacing(img, nib)))
    return series, skipped, ignored
