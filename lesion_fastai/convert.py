"""CT volumes with lesion masks (NIfTI) -> DeepLesion's layout: `Images_png/<patient:06d>_01_01/<slice:03d>.png`
and `DL_info.csv`, one row per lesion (a 3-D connected component of the mask) on its largest axial slice.

Input is pairs of NIfTI files of the same name, as the Medical Segmentation Decathlon ships them (`imagesTr/`,
`labelsTr/`). Each volume is one patient: `Patient_index` 1..N in natural order of the names, one study, one
series, split 70 / 15 / 15 by volume with --seed, or as a --split file says. Slices are shown as DeepLesion's
are (radiological convention: anterior at the top, the patient's left on the image's right) and numbered from
1 at the most superior slice, head to feet. Volumes are converted one at a time, each written once: run the
same command again after an interruption and it goes on with the volumes not yet written.

example:
    python -m lesion_fastai.convert --images Task03_Liver/imagesTr --labels Task03_Liver/labelsTr \\
        --organ-values 1 --out data/liver
"""
from __future__ import annotations

from .log import hush_third_party
hush_third_party(__name__)       # run as a command: quiet known third-party warnings before fastai loads

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .settings import SettingError, add_settings, check_fields, from_args, option, parse_ints
from .deeplesion import COLUMNS, HU_OFFSET, LESION_TYPES, SPLITS, format_numbers as _fmt, save_hu
from .files import NO_SPACE, check_out_folder, output_folder, write_csv, write_json
from .log import log, progress
from .scans import axial

__all__ = ['Options', 'ConvertSettings', 'Volume', 'Lesion', 'find_volumes', 'assign_splits', 'read_split', 'load_volume', 'spacing_of', 'axial',
           'lesion_mask', 'find_lesions', 'recist', 'convert_volume', 'convert', 'parser', 'main']

NIFTI = ('.nii.gz', '.nii')               # .nii.gz first: 'a.nii.gz' also ends with neither '.nii' alone
AFFINE_ATOL_MM = 1e-2    # float32 headers written by two tools differ by far less; a real mismatch is a voxel (~0.5 mm) or more
AIR_HU = -500            # CT in HU holds air (about -1000) around the body: a volume whose minimum is above this is not HU
SPLIT_CODES = {'1': 1, '2': 2, '3': 3, 'train': 1, 'val': 2, 'test': 3}
WORK = '.convert'        # OUT/.convert: settings, one fragment per finished volume, temp folders of the volume being written
VOLUMES_HEADER = ('volume', 'patient', 'split', 'slices_written', 'lesions_written', 'lesions_skipped', 'empty_mask')


@dataclass(frozen=True)
class Options:
    """The choices that decide what is written; kept in OUT/.convert/settings.json, so a rerun that would mix
    volumes converted two ways is refused."""
    label_values: tuple[int, ...] | None = None   # mask values that are lesions; None: every value > 0 not in organ_values
    organ_values: tuple[int, ...] = ()
    pad_px: int = 5                   # DeepLesion pads its RECIST extent by 5 px each side to make Bounding_boxes
    min_diameter_mm: float = 3.       # DeepLesion's smallest measured lesions are a few mm; below that, mostly label specks
    neighbours_mm: float = 30.        # DeepLesion ships about 30 mm above and below each key slice
    all_slices: bool = False
    lesion_type: int = -1
    window: tuple[float, float] = (-175., 275.)
    seed: int = 0


@dataclass
class Volume:
    "One CT volume reoriented to RAS+: HU [X, Y, Z], its mask [X, Y, Z] and the voxel size (x, y, z) in mm."
    hu: np.ndarray
    mask: np.ndarray
    spacing_mm: tuple[float, float, float]


@dataclass
class Lesion:
    "One 3-D lesion: its largest axial slice (1-based, superior first) and its pixels there, [N, 2] (x = column, y = row)."
    key_slice: int
    pixels: np.ndarray


# --- inputs --------------------------------------------------------------------------------------

def _nibabel():
    "nibabel, imported when a volume is read, or the one-line error saying how to install it."
    try: import nibabel
    except ImportError: raise SystemExit("error: converting NIfTI volumes needs nibabel: pip install -e '.[convert]'") from None
    return nibabel


def _volume_name(file_name: str) -> str | None:
    ext = next((e for e in NIFTI if file_name.endswith(e)), None)
    return file_name[:-len(ext)] if ext else None


def _natural(name: str) -> list:
    "Sort key putting liver_2 before liver_10."
    return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def _nifti_files(folder: Path, flag: str) -> dict[str, Path]:
    "The NIfTI files of `folder` by volume name (the file name less .nii / .nii.gz)."
    if not folder.is_dir(): raise FileNotFoundError(f"{flag} {folder}: no such folder")
    found = {}
    for p in sorted(folder.iterdir()):
        name = _volume_name(p.name)
        if name is None or p.name.startswith('._') or not p.is_file(): continue   # ._*: macOS AppleDouble files, not volumes
        if name in found: raise ValueError(f"{flag} {folder}: {found[name].name} and {p.name} are both volume {name!r}, expected one file per name")
        found[name] = p
    return found


def find_volumes(images: Path | str, labels: Path | str) -> list[tuple[str, Path, Path]]:
    """(name, image, mask) of each volume, in natural order of the names: NIfTI files of `images` and `labels`
    paired by name. An image without its mask, or a mask without its image, is a ValueError naming it."""
    images, labels = Path(images), Path(labels)
    ims, masks = _nifti_files(images, '--images'), _nifti_files(labels, '--labels')
    if not ims: raise ValueError(f"--images {images} holds no NIfTI volume (.nii, .nii.gz), expected CT volumes such as MSD's imagesTr/")
    for name, p in ims.items():
        if name not in masks: raise ValueError(f"{p}: no mask of the same name in --labels {labels}, expected {labels / p.name}")
    for name, p in masks.items():
        if name not in ims: raise ValueError(f"{p}: no image of the same name in --images {images}, expected {images / p.name}")
    return [(n, ims[n], masks[n]) for n in sorted(ims, key=_natural)]


def assign_splits(names: list[str], seed: int) -> dict[str, int]:
    """Train_Val_Test (1 / 2 / 3) of each volume, 70 / 15 / 15 by volume, shuffled by `seed`; one volume
    is one patient, so the splits are patient-disjoint. From 3 volumes on, each split has at least one."""
    n_held = max(1, round(len(names) * .15)) if len(names) >= 3 else 0
    splits = [1] * (len(names) - 2 * n_held) + [2] * n_held + [3] * n_held
    np.random.default_rng(seed).shuffle(splits)
    return dict(zip(names, splits))


def read_split(path: Path | str, names: list[str]) -> dict[str, int]:
    """Train_Val_Test of each of `names` from a CSV file of `name,split` lines (split 1 / 2 / 3 or train / val /
    test; an optional `name,split` header; names with or without .nii / .nii.gz). A volume without a line is
    a ValueError naming it."""
    path = Path(path)
    if not path.is_file(): raise FileNotFoundError(f"--split {path}: no such file")
    table = {}
    for number, line in enumerate(path.read_text(encoding='utf-8-sig').splitlines(), 1):
        cells = [c.strip() for c in line.split(',')]
        if cells == [''] or (number == 1 and [c.lower() for c in cells] == ['name', 'split']): continue
        if len(cells) != 2 or cells[1].lower() not in SPLIT_CODES:
            raise ValueError(f"--split {path} line {number}: {line!r}, expected name,split with split 1, 2, 3 or train, val, test")
        table[_volume_name(cells[0]) or cells[0]] = SPLIT_CODES[cells[1].lower()]
    missing = [n for n in names if n not in table]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ''
        raise ValueError(f"--split {path}: no line for volume {missing[0]!r}{more}, expected a line such as {missing[0]},train for every volume")
    return {n: table[n] for n in names}


# --- one volume ----------------------------------------------------------------------------------

def _header(path: Path, nib, what: str):
    "The NIfTI image at `path`, its header read and its shape checked; the voxels are read later."
    try: img = nib.load(str(path))
    except Exception as e: raise ValueError(f"{path}: not a readable NIfTI {what} ({type(e).__name__}: {e})") from None
    if len(img.shape) != 3:
        raise ValueError(f"{path}: a {len(img.shape)}-D {what} of shape {img.shape}, expected a 3-D CT volume (x, y, z)")
    return img


def _voxels(img, path: Path, nib) -> tuple[np.ndarray, np.ndarray]:
    "The voxels of `img` reoriented to RAS+ (the closest canonical orientation) and the affine that goes with them."
    try:
        canonical = nib.as_closest_canonical(img)
        return np.asanyarray(canonical.dataobj), canonical.affine
    except Exception as e: raise ValueError(f"{path}: voxels unreadable ({type(e).__name__}: {e}), expected a complete NIfTI file") from None


OBLIQUE_DEG = 3.    # a volume whose axes are further off the patient's is named: its slices are not truly axial


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """(x, y, z) mm of a RAS+ affine's voxels: the lengths of its first two axes, and the distance between slice
    planes, which a gantry tilt (a sheared affine) makes shorter than the third axis's length."""
    a = np.asarray(affine, float)[:3, :3]
    across = np.linalg.norm(np.cross(a[:, 0], a[:, 1]))
    return float(np.linalg.norm(a[:, 0])), float(np.linalg.norm(a[:, 1])), float(abs(np.linalg.det(a)) / across)


def _check_hu(hu: np.ndarray, path: Path) -> None:
    low, high = float(hu.min()), float(hu.max())
    if not (-HU_OFFSET <= low <= AIR_HU and high < HU_OFFSET):
        raise ValueError(f"{path}: intensities {low:g} to {high:g}, expected CT in HU: a minimum of {-HU_OFFSET} to {AIR_HU} "
                         f"(air is about -1000) and a maximum below {HU_OFFSET} (an MRI, or CT stored with an offset, is not HU)")


def _check_labels(mask: np.ndarray, path: Path) -> None:
    if mask.dtype.kind in 'biu': return
    bad = mask[mask != np.round(mask)]                   # NaN too: it differs from itself
    if bad.size:
        raise ValueError(f"{path}: mask value {bad.flat[0]:g} is not an integer ({bad.size:,} voxels), expected integer labels "
                         f"(0 background, then organ and lesion values)")


def load_volume(image: Path | str, mask: Path | str) -> Volume:
    """The CT volume `image` and its label volume `mask`, both reoriented to RAS+ with
    `nibabel.as_closest_canonical`. ValueError naming the file for: a volume that is not 3-D, a mask whose
    shape or affine differs from its image's, intensities that are not HU, mask values that are not integers."""
    nib = _nibabel()
    image, mask = Path(image), Path(mask)
    img, seg = _header(image, nib, 'image'), _header(mask, nib, 'mask')
    if seg.shape != img.shape: raise ValueError(f"{mask}: mask of shape {seg.shape}, expected its image's {img.shape} ({image})")
    if not np.allclose(seg.affine, img.affine, rtol=0, atol=AFFINE_ATOL_MM):
        worst = float(np.nanmax(np.abs(seg.affine - img.affine)))
        raise ValueError(f"{mask}: affine differs from its image's ({image}) by up to {worst:.3g}, expected the same voxel grid "
                         f"(within {AFFINE_ATOL_MM} mm)")
    tilt = float(np.degrees(nib.affines.obliquity(img.affine)).max())
    if tilt > OBLIQUE_DEG:
        log.warning(f"{image}: its voxel axes are {tilt:.1f} degrees off the patient's axes; its slices are written along the nearest "
                    f"axes as stored (not resampled), so boxes and RECIST axes are in that tilted grid")
    hu, affine = _voxels(img, image, nib)
    _check_hu(hu, image)
    labels, _ = _voxels(seg, mask, nib)
    _check_labels(labels, mask)
    return Volume(hu, labels, spacing_of(affine))


def lesion_mask(mask: np.ndarray, opts: Options) -> np.ndarray:
    "Which voxels are lesion: `opts.label_values`, or every value above 0 that is not an organ value."
    if opts.label_values is not None: return np.isin(mask, opts.label_values)
    return (mask > 0) & ~np.isin(mask, opts.organ_values)


def find_lesions(lesions: np.ndarray) -> list[Lesion]:
    """Each 3-D connected component (26-connected) of the RAS+ lesion mask [X, Y, Z] on the axial slice where it has
    most voxels (ties: the more inferior), in display pixels and 1-based slices counted from the top (superior)."""
    from scipy import ndimage
    X, Y, Z = lesions.shape
    found = ndimage.find_objects(lesions.view(np.uint8))
    if not found: return []
    crop = found[0]                                    # labelled inside the lesions' bounding box: far less memory than the volume
    labels, _ = ndimage.label(lesions[crop], structure=np.ones((3, 3, 3)))
    out = []
    for i, box in enumerate(ndimage.find_objects(labels), 1):
        component = labels[box] == i
        k = int(np.argmax(component.sum(axis=(0, 1))))
        xs, ys = np.nonzero(component[:, :, k])
        x = X - 1 - (crop[0].start + box[0].start + xs)          # display column: patient's left to the right
        y = Y - 1 - (crop[1].start + box[1].start + ys)          # display row: anterior at the top
        out.append(Lesion(Z - (crop[2].start + box[2].start + k), np.stack([x, y], 1)))
    return sorted(out, key=lambda l: (l.key_slice, int(l.pixels[:, 1].min()), int(l.pixels[:, 0].min())))


def _hull(points: np.ndarray) -> np.ndarray:
    "The convex hull's vertices of points [N, 2], where the longest chord ends; all points when too few or collinear for a hull."
    if len(points) < 4: return points
    from scipy.spatial import ConvexHull, QhullError
    try: return points[ConvexHull(points).vertices]
    except QhullError: return points


def recist(pixels: np.ndarray, spacing_xy: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """RECIST-like axes of a cross-section's pixels [N, 2] (x, y pixel centres), as ([2, 2] long, [2, 2] short)
    endpoints in pixels: the long axis is the longest chord in mm, the short axis the widest extent perpendicular
    to it (measured across strips one pixel wide along the long axis)."""
    s = np.asarray(spacing_xy, float)
    mm = pixels * s
    ends = _hull(mm)
    chord = np.linalg.norm(ends[:, None] - ends[None], axis=-1)
    a, b = np.unravel_index(int(np.argmax(chord)), chord.shape)
    long_mm = ends[[a, b]]
    length = float(chord[a, b])
    u = (long_mm[1] - long_mm[0]) / length if length > 0 else np.array([1., 0.])
    v = np.array([-u[1], u[0]])
    along, across = mm @ u, mm @ v
    step = float(s.min())
    strip = np.round((along - along.min()) / step).astype(int)
    low, high = np.full(strip.max() + 1, np.inf), np.full(strip.max() + 1, -np.inf)
    np.minimum.at(low, strip, across)
    np.maximum.at(high, strip, across)
    j = int(np.argmax(high - low))
    t = along.min() + j * step
    short_mm = np.stack([t * u + low[j] * v, t * u + high[j] * v])
    return long_mm / s, short_mm / s


def _slices_to_write(keys: list[int], n_slices: int, spacing_z: float, opts: Options) -> list[int]:
    if opts.all_slices: return list(range(1, n_slices + 1))
    reach = int(opts.neighbours_mm / spacing_z + 1e-6)         # whole slices within neighbours_mm of a key slice
    return sorted({s for k in keys for s in range(max(1, k - reach), min(n_slices, k + reach) + 1)})


def _write_series(hu: np.ndarray, slices: list[int], folder: Path, work: Path) -> None:
    """Slices (1-based, superior first) of the RAS+ volume `hu` as `folder`/<slice:03d>.png, written to a temp folder
    in `work` and renamed into place, so a series folder is whole or absent."""
    if not slices: return
    tmp = work / f'{folder.name}.{os.getpid()}.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for s in slices: save_hu(tmp / f'{s:03d}.png', axial(hu, hu.shape[2] - s))
        if folder.exists(): shutil.rmtree(folder)   # renamed into place by a run killed before it wrote the volume's fragment
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(folder)
    except OSError as e:
        if e.errno not in NO_SPACE: raise
        raise ValueError(f"{folder}: the disk is full, so it was not written; run the same command again once there is space "
                         f"(the volumes written are kept)") from None
    finally: shutil.rmtree(tmp, ignore_errors=True)


def _shipped_around(slices: list[int], key: int) -> tuple[int, int]:
    "Slice_range as DeepLesion gives it: the first and last of the unbroken run of written `slices` that holds the key slice."
    first = last = key
    written = set(slices)
    while first - 1 in written: first -= 1
    while last + 1 in written: last += 1
    return first, last


def _row(lesion: Lesion, axes, series: str, patient: int, split: int, shape, spacing, slice_range, opts: Options) -> list:
    "The 18 DL_info.csv fields of one lesion."
    (long_px, short_px), (W, H, Z) = axes, shape
    x, y = lesion.pixels[:, 0], lesion.pixels[:, 1]
    pad = opts.pad_px
    box = (max(0, x.min() - pad), max(0, y.min() - pad), min(W - 1, x.max() + pad), min(H - 1, y.max() + pad))
    diameters = [float(np.linalg.norm(e[1] - e[0])) for e in (long_px, short_px)]
    location = (x.mean() / W, y.mean() / H, (lesion.key_slice - 1) / max(1, Z - 1))
    return [f'{series}_{lesion.key_slice:03d}.png', patient, 1, 1, lesion.key_slice, _fmt(*long_px.ravel(), *short_px.ravel()),
            _fmt(*box), _fmt(*diameters), _fmt(*location), opts.lesion_type, 0, _fmt(*slice_range), _fmt(*spacing),
            _fmt(W, H), _fmt(*opts.window), '', '', split]


def convert_volume(image: Path, mask: Path, patient: int, split: int, out: Path, opts: Options) -> dict:
    """Write one volume's slices to `out`/Images_png/<patient:06d>_01_01/ and return its fragment: DL_info rows
    and counts (slices and lesions written, lesions skipped below `opts.min_diameter_mm`, empty mask)."""
    volume = load_volume(image, mask)
    X, Y, Z = volume.hu.shape
    sx, sy, sz = volume.spacing_mm
    lesions = lesion_mask(volume.mask, opts)
    volume.mask = None                                 # one volume's arrays at a time: the labels are done with
    empty = not lesions.any()
    kept, skipped = [], 0
    for lesion in find_lesions(lesions):
        axes = recist(lesion.pixels, (sx, sy))
        if np.linalg.norm((axes[0][1] - axes[0][0]) * (sx, sy)) < opts.min_diameter_mm: skipped += 1
        else: kept.append((lesion, axes))
    slices = _slices_to_write(sorted({l.key_slice for l, _ in kept}), Z, sz, opts)
    series = f'{patient:06d}_01_01'
    _write_series(volume.hu, slices, out / 'Images_png' / series, out / WORK)
    rows = [_row(l, axes, series, patient, split, (X, Y, Z), (sx, sy, sz), _shipped_around(slices, l.key_slice), opts) for l, axes in kept]
    return {'patient': patient, 'split': split, 'slices': len(slices), 'lesions': len(rows), 'skipped': skipped,
            'empty_mask': int(empty), 'rows': rows}


# --- the whole run -------------------------------------------------------------------------------

def _settings(opts: Options, plan: dict) -> dict:
    return json.loads(json.dumps({'options': dataclasses.asdict(opts), 'volumes': plan}))   # tuples as JSON reads them back


def _check_settings(out: Path, settings: dict) -> None:
    "Refuse to add to an --out converted with other settings (or not by this command at all)."
    path = out / WORK / 'settings.json'
    if not path.exists():
        if (out / 'DL_info.csv').exists():
            raise ValueError(f"--out {out} holds a DL_info.csv this command did not write, expected a new folder (or one it wrote)")
        return
    old = json.loads(path.read_text())
    changed = [k for k, v in settings['options'].items() if old['options'].get(k) != v]
    if old['volumes'] != settings['volumes']: changed.append('the volumes or their splits')
    if changed:
        raise ValueError(f"--out {out} was converted with other settings ({', '.join(changed)}), expected the same to resume; "
                         f"give another --out to convert anew")


def _assemble(out: Path, plan: dict) -> dict:
    "DL_info.csv and volumes.csv from the fragments, each written atomically; returns the totals."
    fragments = {name: json.loads((out / WORK / f'{p:06d}.json').read_text()) for name, (p, _) in plan.items()}
    write_csv(out / 'DL_info.csv', COLUMNS, [row for f in fragments.values() for row in f['rows']])
    write_csv(out / 'volumes.csv', VOLUMES_HEADER, [(name, f['patient'], SPLITS[f['split']], f['slices'], f['lesions'], f['skipped'],
                                                    f['empty_mask']) for name, f in fragments.items()])
    return {k: sum(f[k] for f in fragments.values()) for k in ('slices', 'lesions', 'skipped', 'empty_mask')}


def convert(images: Path | str, labels: Path | str, out: Path | str, opts: Options = Options(), split_file: Path | str | None = None) -> dict:
    """Convert every (image, mask) pair of `images` and `labels` into DeepLesion's layout in `out` and return the
    totals (slices, lesions, skipped, empty_mask). Each volume is written through a temp folder and recorded in
    `out`/.convert/<patient>.json once whole; a volume with a fragment is skipped, so a rerun resumes. DL_info.csv
    and volumes.csv are assembled from the fragments at the end."""
    _nibabel()
    volumes = find_volumes(images, labels)
    names = [name for name, _, _ in volumes]
    splits = read_split(split_file, names) if split_file is not None else assign_splits(names, opts.seed)
    if len(set(splits.values())) < 3: log.warning(f"{len(names)} volume(s) fill only splits {sorted(set(splits.values()))}: finetune needs train, val and test patients")
    plan = {name: [patient, splits[name]] for patient, name in enumerate(names, 1)}
    settings = _settings(opts, plan)
    out = check_out_folder(out)
    with output_folder(out, keep_if=f'{WORK}/settings.json'):     # a first volume that fails leaves no new folder behind
        _check_settings(out, settings)
        for stale in (out / WORK).glob('*.tmp'): shutil.rmtree(stale)       # we hold OUT's lock: these are a killed run's
        todo = [(n, im, m) for n, im, m in volumes if not (out / WORK / f'{plan[n][0]:06d}.json').exists()]
        if len(todo) < len(volumes): log.info(f"{len(volumes) - len(todo)} of {len(volumes)} volumes were converted before; going on with {len(todo)}")
        for name, image, mask in progress(todo, f'converting {len(todo)} volumes'):
            fragment = convert_volume(image, mask, *plan[name], out, opts)
            if not (out / WORK / 'settings.json').exists(): write_json(settings, out / WORK / 'settings.json')
            write_json({'volume': name, **fragment}, out / WORK / f'{plan[name][0]:06d}.json')
        totals = _assemble(out, plan)
    log.info(f"wrote {out / 'DL_info.csv'}: {totals['lesions']} lesions, {totals['slices']} slices of {len(volumes)} volumes; "
             f"{totals['skipped']} lesions under {opts.min_diameter_mm:g} mm skipped, {totals['empty_mask']} volumes without a lesion")
    return totals


# --- command line --------------------------------------------------------------------------------

def _window(text: str) -> tuple[float, float]:
    try: low, high = (float(c) for c in text.split(','))
    except ValueError: raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH in HU") from None
    return low, high


def _low_high(v) -> str | None:
    return None if len(v) == 2 and v[0] < v[1] else f"{','.join(f'{x:g}' for x in v)}: expected LOW < HIGH"


def _lesion_values(v) -> str | None:
    if not v: return 'names no value, expected integers such as 2 or 2,3'
    return None if min(v) > 0 else 'must be above 0 (0 is background)'


@dataclass(kw_only=True)
class ConvertSettings:
    """Settings of `python -m lesion_fastai.convert`: the folders, and the `Options` that decide what is
    written (their defaults are `Options`'s)."""
    images: Path = option(help='folder of CT volumes in HU, .nii or .nii.gz (MSD: imagesTr)', metavar='DIR', group='data')
    labels: Path = option(help='folder of label volumes of the same names (MSD: labelsTr)', metavar='DIR', group='data')
    out: Path = option(help='folder to write Images_png/, DL_info.csv and volumes.csv into; the same command run again resumes',
                       metavar='DIR', group='data')
    label_values: tuple[int, ...] | None = option(Options.label_values, 'mask values that are lesions, e.g. 2 or 2,3', parse=parse_ints,
                                                  check=_lesion_values, metavar='VALUES',
                                                  default_help='every value above 0 not in --organ-values', group='lesion')
    organ_values: tuple[int, ...] = option(Options.organ_values, 'mask values that are organs, not lesions, e.g. 1 (MSD liver, pancreas)',
                                           parse=parse_ints, metavar='VALUES', default_help='none', group='lesion')
    lesion_type: int = option(Options.lesion_type, "Coarse_lesion_type of every row: -1 unlabelled, or one of DeepLesion's types 1-8",
                              choices=LESION_TYPES, metavar='N', group='lesion')
    pad_px: int = option(Options.pad_px, "pixels added on each side of a lesion's extent on its key slice to make its box, as DeepLesion "
                         'pads its RECIST boxes (a one-pixel-wide lesion needs a box with area)', at_least=1, group='lesion')
    min_diameter_mm: float = option(Options.min_diameter_mm, "lesions with a shorter long axis are skipped and counted (DeepLesion's "
                                    'smallest are a few mm; smaller components are mostly label specks)', at_least=0, group='lesion')
    neighbours_mm: float = option(Options.neighbours_mm, 'slices within this distance of a key slice are written (DeepLesion ships '
                                  'about 30 mm each side)', at_least=0, group='slice')
    all_slices: bool = option(Options.all_slices, 'write every slice of every volume, those without lesions too (unlabelled slices for '
                              'pretraining)', group='slice')
    window: tuple[float, float] = option(Options.window, 'DICOM_windows of every row in HU; give it with = (--window=-160,240), as a '
                                         'leading minus reads as a flag otherwise', parse=_window, check=_low_high, metavar='LOW,HIGH',
                                         default_help=','.join(f'{v:g}' for v in Options.window), group='slice')
    seed: int = option(Options.seed, 'seed of the 70/15/15 split by volume', group='split')
    split: Path | None = option(None, 'CSV of name,split lines (1/2/3 or train/val/test) for every volume (volumes of one patient must '
                                'share a split)', metavar='FILE', default_help='the 70/15/15 split drawn with --seed', group='split')

    def __post_init__(self):
        self.images, self.labels, self.out = Path(self.images), Path(self.labels), Path(self.out)
        if self.split is not None: self.split = Path(self.split)
        check_fields(self)
        if set(self.label_values or ()) & set(self.organ_values): raise SettingError('--label-values and --organ-values share a value')

    def options(self) -> Options:
        "The settings that decide what is written."
        return Options(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Options)})


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='python -m lesion_fastai.convert', description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(ap, ConvertSettings, required=('images', 'labels', 'out'))
    return ap


def main(argv=None):
    ap = parser()
    cfg = from_args(ConvertSettings, ap, ap.parse_args(argv))
    try: convert(cfg.images, cfg.labels, cfg.out, cfg.options(), cfg.split)
    except (FileNotFoundError, ValueError) as e: sys.exit(f"error: {e}")


if __name__ == '__main__':
    main()
