"""fastai DataBlocks over DeepLesion: CT slices (HU -> windows -> [0, 1] -> half resolution by area
averaging, neighbour slices as extra channels) with every lesion of the slice as a `PointBlock` or
`BBoxBlock` target, padded to a fixed count and flagged (`TensorScore`), and image-only blocks for the
autoencoder.

Facts this module is built around (checked on fastai 2.8.12): PIL's RGB / L conversions destroy
16-bit CT, so slices are read in HU by `deeplesion.load_hu` and windowed here; `PointScaler` scales
points by the size of the image tensor in the same tuple; flips and rotations neither re-sort nor
clip corners, so `BoxTidy` does both after augmentation; fastai's `bb_pad` pads each batch to its own
largest count with boxes at the image centre, which augmentation moves, so padding is fixed and
flagged here instead; `test_set` does not carry `n_inp` over (`labelled_dl` sets it).

Batches are made by `SliceDL`, fastai's `TfmdDL` without the per-item pipeline for the pixels: a
batch's slices are stacked from the cache in one read (one fancy index into the disk cache's
memory-mapped array), each item's targets are built once by the DataBlock's own transforms and kept,
and augmentation runs on the whole batch on its device (`batch_tfms`). The batches are the ones the
per-item pipeline makes, value for value (tested).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.data.core import TfmdDL
from fastai.vision.all import (DataBlock, TransformBlock, PointBlock, BBoxBlock, TensorBase, TensorImage, TensorPoint,
                               TensorBBox, Transform, ItemTransform, aug_transforms, noop, dispatch, get_grid, show_image, chunked,
                               fa_collate,
                               FuncSplitter)

from .deeplesion import SliceFileError, SliceRecord, context_paths, evaluation_records, load_data, load_hu, patient_of, resolve_windows, window

__all__ = ['TensorCT', 'TensorBoxCorners', 'TensorScore', 'SliceSpec', 'CTSlice', 'plane_key', 'SliceDL', 'SlicePixels', 'LesionBoxes', 'LesionFlags',
           'target_slots', 'MIN_TARGET_SLOTS', 'BoxTidy', 'split_records', 'select_patients',
           'box_augmentations', 'detection_block', 'detection_dls', 'autoencoder_block', 'autoencoder_dls',
           'labelled_dl', 'slice_transform', 'downsample', 'n_channels']


class TensorCT(TensorImage):
    """Windowed CT [C, H, W] in [0, 1]; channel 0 is the key slice in the first window. Shown in 'bone'.
    `orig_size` (width, height) is the slice file's size, so boxes can be decoded into its pixels."""
    _show_args = {'cmap': 'bone'}

    def show(self, ctx=None, **kwargs):
        return show_image(self[0] if self.ndim == 3 else self, ctx=ctx, **{**self._show_args, 'vmin': 0, 'vmax': 1, **kwargs})


class TensorBoxCorners(TensorPoint):
    "Boxes as pairs of corner points (x1, y1), (x2, y2), [2M, 2]; shown as rectangles (ground truth green)."
    def show(self, ctx=None, color='lime', **kwargs): return _show_boxes(self, None, ctx, color)[0]


def downsample(img: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    "Area-average [C, H, W] to `size` (each output pixel is the mean of the input pixels it covers)."
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(img.shape[-2:]) == size: return img
    return F.interpolate(img[None], size=size, mode='area')[0]


def n_channels(windows: str, context: int) -> int:
    "Input channels of a slice block: one per window and per slice (key slice and `context` on each side)."
    return len(resolve_windows(windows, (0, 1))) * (2 * context + 1)


@dataclass(frozen=True)
class SliceSpec:
    """How a slice becomes model input, the settings every stage must agree on: `windows` (names as in
    `deeplesion.resolve_windows`, comma separated), `context` neighbour slices on each side, `size` px."""
    windows: str = 'soft'
    context: int = 0
    size: int = 256

    @property
    def n_channels(self) -> int: return n_channels(self.windows, self.context)

    @classmethod
    def of(cls, cfg) -> 'SliceSpec':
        """The spec of a resolved run config (`finetuning.resolve`, `pretraining.resolve`) or of the config a
        checkpoint records (a dict): its windows, context and size."""
        if isinstance(cfg, dict): return cls(cfg['windows'], cfg['context'], cfg['size'])
        return cls(cfg.windows, cfg.context, cfg.size)


DEFAULT_DICOM_WINDOW = (-150., 250.)   # a 'dicom' window for slices that come without a record: the soft-tissue window


def plane_key(path, wins) -> str:
    "The cache key of one PNG prepared in these windows ((low, high) pairs): 'path|-150:250,-1350:150'."
    return f"{path}|" + ','.join(f'{lo:g}:{hi:g}' for lo, hi in wins)


class CTSlice(Transform):
    """Load a slice (a `SliceRecord` or a PNG path) as `TensorCT` [C, size, size] as `spec` (a `SliceSpec`)
    says: for each window, the key slice then its neighbours k-1, k+1, ..., k-c, k+c (missing
    neighbours, and those the cache holds as unreadable, `absent`, fall back to the nearest shipped slice); 'dicom' uses the record's own DICOM window (a
    plain path falls back to 'soft'). `cache`: a dict-like (`plane_key` -> (planes [windows, size, size],
    (width, height))) of prepared PNGs, so that each PNG is decoded once however many key slices use it
    as a neighbour, and epochs after the first decode nothing (use with num_workers=0, or a
    `cache.SliceCache` shared by workers)."""
    input_types = (SliceRecord, str, Path)  # lets learn.predict take a PNG path as well as a record

    def __init__(self, spec: SliceSpec = SliceSpec(), cache=None):
        super().__init__()
        if not isinstance(spec, SliceSpec): raise TypeError(f"CTSlice takes a SliceSpec, got {spec!r}")
        self.spec, self.cache = spec, cache
        self._found = {}                 # path -> its neighbours' paths, looked up on disk once per run

    @property
    def n_channels(self) -> int: return self.spec.n_channels

    def windows_for(self, dicom_window=None) -> list[tuple[float, float]]:
        "The (low, high) HU windows of a slice whose DICOM window is `dicom_window` (None: a plain path)."
        return resolve_windows(self.spec.windows, dicom_window if dicom_window is not None else DEFAULT_DICOM_WINDOW)

    def neighbours(self, path) -> list[Path]:
        """The PNGs of a slice's channels in channel order within a window: the key slice, then k-1, k+1,
        ..., k-c, k+c (found on disk once per path: they are looked up again only by a new transform)."""
        found = self._found.get(str(path))
        if found is None:
            c = self.spec.context
            paths = context_paths(path, c, getattr(self.cache, 'absent', frozenset()))     # the files a run left out: not shipped
            found = self._found[str(path)] = [paths[c]] + [paths[i] for o in range(1, c + 1) for i in (c - o, c + o)]
            if c and found.count(found[0]) == len(found): self._warn_alone(found[0])
        return found

    def _warn_alone(self, path) -> None:
        "Once per transform: a slice with no neighbour on disk is read with the key slice in their places."
        if getattr(self, '_warned', False): return         # exports made before this attribute lack it
        self._warned = True
        why = ("its name is not a slice number as DeepLesion's <slice:03d>.png, so its neighbours cannot be named"
               if not Path(path).stem.isdigit() else "no slice of its series lies beside it on disk")
        warnings.warn(f"{path}: {why}; the model's {2 * self.spec.context} neighbour channels (--context {self.spec.context}) "
                      f"repeat the key slice, as at the first and last slice of a DeepLesion series (any other such slice "
                      f"of this run likewise, without another warning)", stacklevel=2)

    def planes(self, path, wins) -> tuple[torch.Tensor, tuple[int, int]]:
        """One PNG windowed in `wins` and area-averaged to the model size, [windows, size, size] float32,
        and the file's (width, height); from the cache when it holds them (and kept there)."""
        key = plane_key(path, wins)
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is not None: return hit
        hu = load_hu(path)
        planes = downsample(torch.from_numpy(np.stack([window(hu, lo, hi) for lo, hi in wins])), self.spec.size)
        value = (planes, (hu.shape[1], hu.shape[0]))
        if self.cache is not None: self.cache[key] = value
        return value

    def load(self, path, dicom_window=None) -> TensorCT:
        "The windowed, downsampled channels of the slice at `path`, [C, size, size] float32, with its `orig_size`."
        wins = self.windows_for(dicom_window)
        paths = self.neighbours(path)
        got = [self.planes(p, wins) for p in paths]
        (w, h) = got[0][1]
        for p, (_, (pw, ph)) in zip(paths, got):
            if (pw, ph) != (w, h): raise SliceFileError(p, f"size {(ph, pw)} differs from its key slice's {(h, w)}")
        chans = torch.stack([planes[j] for j in range(len(wins)) for planes, _ in got])      # window-major
        return TensorCT(chans, orig_size=(w, h))

    def from_hu(self, hus: list, dicom_window=None) -> TensorCT:
        """The model input from slices in HU ([H, W] each, the key slice then k-1, k+1, ..., k-c, k+c),
        prepared exactly as `load` prepares PNGs: the one preprocessing of training, evaluation and
        `lesion_fastai.predict` (PNG, DICOM, NIfTI)."""
        wins = self.windows_for(dicom_window)
        chans = np.stack([window(h, lo, hi) for lo, hi in wins for h in hus])
        shape = hus[0].shape
        return TensorCT(downsample(torch.from_numpy(chans), self.spec.size), orig_size=(shape[1], shape[0]))

    def channels(self, path, dicom_window=None) -> torch.Tensor:
        "`load` as a plain tensor."
        return self.load(path, dicom_window).as_subclass(torch.Tensor)

    def encodes(self, item) -> TensorCT:
        if isinstance(item, SliceRecord): return self.load(item.image_path, item.dicom_window)
        return self.load(str(item))

    def batch(self, items) -> TensorCT:
        """`encodes` of every item, stacked: [B, C, size, size], with the first item's `orig_size` (as
        fastai's collation keeps it). From a disk cache that holds every PNG the items need, one read of
        all their rows (sorted, so that the memory-mapped array is read in order)."""
        items = list(items)
        rows = self._rows(items) if hasattr(self.cache, 'index') else None
        if rows is None: return TensorCT(torch.stack([self.encodes(it).as_subclass(torch.Tensor) for it in items]),
                                         orig_size=self.encodes(items[0]).orig_size)
        rows, sizes, n = rows
        unique, inverse = np.unique(rows, return_inverse=True)
        planes = torch.from_numpy(self.cache.array[unique][inverse].astype(np.float32))            # [B * n, windows, S, S]
        B, S = len(items), self.spec.size
        x = planes.view(B, n, -1, S, S).transpose(1, 2).reshape(B, -1, S, S)                       # window-major channels
        return TensorCT(x.contiguous(), orig_size=sizes[0])

    def _rows(self, items):
        "The disk cache's rows of every PNG the items need, in channel order, and each item's size; None if one is missing."
        rows, sizes = [], []
        for it in items:
            path, dw = (it.image_path, it.dicom_window) if isinstance(it, SliceRecord) else (str(it), None)
            wins, paths = self.windows_for(dw), self.neighbours(path)
            entries = [self.cache.index.get(plane_key(p, wins)) for p in paths]
            if any(e is None for e in entries) or any(tuple(e[1:]) != tuple(entries[0][1:]) for e in entries): return None
            rows += [e[0] for e in entries]
            sizes.append(tuple(entries[0][1:]))
        return np.asarray(rows), sizes, len(paths)

    def __getstate__(self):  # an exported learner carries the settings, not the cached pixels nor paths of this machine
        return {**self.__dict__, 'cache': None, '_found': {}}

    def __setstate__(self, state):  # exports written before SliceSpec held windows, context and size themselves
        if 'spec' not in state: state['spec'] = SliceSpec(state.pop('windows'), state.pop('context'), state.pop('size'))
        state.pop('n_channels', None)
        state.setdefault('_found', {})
        self.__dict__.update(state)


class SlicePixels(Transform):
    """Decoding only: boxes from pixels of the model input to pixels of the slice file, using the
    `orig_size` the decoded `TensorCT` carries. With it `learn.predict('slice.png')` returns corners in
    the file's own pixels whatever the training size. It runs its decodes after `PointScaler`'s."""
    order = 0

    def decodes(self, x: TensorCT):
        w, h = getattr(x, 'orig_size', None) or (x.shape[-1], x.shape[-2])
        self.scale = torch.tensor([w / x.shape[-1], h / x.shape[-2]])
        return x

    def decodes(self, x: TensorPoint | TensorBBox):  # x, y pairs along the last axis
        return x * getattr(self, 'scale', torch.ones(2)).to(x.device).repeat(x.shape[-1] // 2)


def _display_scale(img) -> torch.Tensor:
    "Slice-file pixels -> pixels of the displayed (model input) image, [2] x, y."
    w, h = getattr(img, 'orig_size', None) or (img.shape[-1], img.shape[-2])
    return torch.tensor([img.shape[-1] / w, img.shape[-2] / h])


class TensorScore(TensorBase):
    """[M] (an item) or [B, M] (a batch) scores of boxes: for a target 1 marks a real lesion and 0 a
    padding slot; for a prediction it is the detection score. Image augmentations leave it alone."""


MIN_TARGET_SLOTS = 4   # target slots per slice at least (DeepLesion has 1-3 lesions per key slice)


def target_slots(records) -> int:
    "How many lesions a target holds: the most of any record, and at least `MIN_TARGET_SLOTS`."
    return max([MIN_TARGET_SLOTS] + [len(r.boxes) for r in records])


class LesionBoxes:
    """Every lesion of a record, in pixels of the `size` x `size` input, padded to `slots`: `points`
    gives each box's four corners ([4 * slots, 2]: rotation moves all of them, `BoxTidy` reduces them
    to two), `bbox` gives [slots, 4] x1,y1,x2,y2. Padding repeats the first lesion: it is found by
    `LesionFlags`, never by value (augmentation moves it like any box)."""
    def __init__(self, size: int, kind: str = 'points', slots: int = MIN_TARGET_SLOTS):
        if kind not in ('points', 'bbox'): raise ValueError(f"target {kind!r}: expected 'points' or 'bbox'")
        self.size, self.kind, self.slots = size, kind, slots

    def __call__(self, r: SliceRecord):
        if len(r.boxes) > self.slots:
            raise ValueError(f"{r.image_path} ({r.where()}): {len(r.boxes)} lesions, more than the {self.slots} a target of this "
                             f"model holds")
        b = np.asarray(r.boxes, np.float64) * np.array([self.size / r.width, self.size / r.height] * 2)
        b = np.concatenate([b, np.repeat(b[:1], self.slots - len(b), 0)])
        if self.kind == 'bbox': return b.tolist()
        return [[x, y] for x1, y1, x2, y2 in b for x, y in ((x1, y1), (x2, y1), (x2, y2), (x1, y2))]


class LesionFlags:
    """[slots] `TensorScore`: the record's `weight` (1 for a label) for each of its lesions, 0 for the
    padding slots."""
    def __init__(self, slots: int = MIN_TARGET_SLOTS): self.slots = slots
    def __call__(self, r: SliceRecord):
        return TensorScore(torch.tensor([float(r.weight)] * len(r.boxes) + [0.] * (self.slots - len(r.boxes))))


class BoxTidy(ItemTransform):
    """After augmentation, on the whole batch (image, boxes, flags): each box's corner points -> its
    enclosing two corners (x1, y1), (x2, y2) ([B, 2M, 2]), boxes re-sorted so x1 <= x2 and y1 <= y2
    (a flip swaps corners) and clipped to the image ([-1, 1]); a lesion whose centre the augmentation
    pushed out of the image is dropped (its flag becomes 0). Every real target stays a valid box."""
    order = 50  # after fastai's affine (30) and lighting (40) transforms

    def encodes(self, b):
        if len(b) < 3: return b                           # images only (a test DataLoader without labels)
        x, y, flags = b
        B, is_points = len(y), not isinstance(y, TensorBBox)       # (a TensorBBox is a TensorPoint too)
        plain = y.as_subclass(torch.Tensor)
        pts = plain.reshape(B, -1, 4, 2) if is_points else plain.reshape(B, -1, 2, 2)            # corners per box
        lo, hi = pts.min(2).values, pts.max(2).values                                           # [B, M, 2]
        centre = (lo + hi) / 2
        inside = ((centre > -1) & (centre < 1)).all(-1)
        boxes = torch.cat([lo, hi], -1).clamp(-1, 1)                                              # [B, M, 4]
        size = getattr(y, 'img_size', None)
        out = TensorBoxCorners(boxes.reshape(B, -1, 2), img_size=size) if is_points else TensorBBox(boxes, img_size=size)
        return x, out, TensorScore(flags.as_subclass(torch.Tensor) * inside.to(flags.dtype))


def box_augmentations(flip: bool = True, max_rotate: float = 10., max_zoom: float = 1.1, max_lighting: float = 0.1,
                      p_affine: float = 0.75) -> list:
    """Batch augmentations that keep the box on the lesion: horizontal flip, small rotation and zoom
    (corners move with the image; the enclosing box grows a little under rotation), brightness /
    contrast on the windowed [0, 1] image; then `BoxTidy`."""
    return [*aug_transforms(do_flip=flip, flip_vert=False, max_rotate=max_rotate, min_zoom=1., max_zoom=max_zoom,
                            max_lighting=max_lighting, max_warp=0., p_affine=p_affine, pad_mode='zeros'), BoxTidy()]


def split_records(records: list, train: str = 'train', valid: str = 'val'):
    "Indices of records in the `train` and `valid` splits (DeepLesion's Train_Val_Test, by patient)."
    return ([i for i, r in enumerate(records) if r.split == train], [i for i, r in enumerate(records) if r.split == valid])


def select_patients(records: list[SliceRecord], fraction: float, seed: int = 0) -> list[SliceRecord]:
    """Records of a seeded random `fraction` of the patients (at least one): labels are withheld per
    patient, never per slice, so no patient is half labeled."""
    if not 0 < fraction <= 1: raise ValueError(f"label fraction {fraction}: expected 0 < fraction <= 1")
    patients = sorted({r.patient for r in records})
    if fraction >= 1: return list(records)
    n = max(1, round(fraction * len(patients)))
    keep = set(np.random.default_rng(seed).choice(patients, size=n, replace=False).tolist())
    return [r for r in records if r.patient in keep]


class SliceDL(TfmdDL):
    """fastai's `TfmdDL` for the slice blocks, with batches made without the per-item pipeline (module
    docstring): the slices stacked by `CTSlice.batch`, each item's targets (boxes and flags, as the
    DataBlock's getters, type and item transforms make them) built on first use and kept. Anything
    else (a pipeline of other transforms) is batched by fastai's own `create_batches`."""
    def create_batches(self, samps):
        ct = self._slice_transform()
        if ct is None:
            yield from super().create_batches(samps)
            return
        for idx in chunked(samps, self.bs, drop_last=self.drop_last):
            items = [self.dataset.items[i] for i in idx]
            x = ct.batch(items)
            if len(self.dataset.tls) == 1: yield (x,)
            else: yield (x, *self.retain(fa_collate([self._targets(i, ct) for i in idx]), self._targets(idx[0], ct)))

    def _slice_transform(self):
        "The `CTSlice` if the inputs are made by it alone (after the getter), else None."
        if not hasattr(self.dataset, 'tls') or not self.indexed: return None
        fs = [f for f in self.dataset.tls[0].tfms.fs if getattr(f, 'name', None) != 'noop']      # the getter, noop wrapped
        return fs[0] if len(fs) == 1 and isinstance(fs[0], CTSlice) else None

    def _targets(self, i: int, ct: CTSlice) -> tuple:
        "Item `i`'s targets after the item transforms (which read the image's size only: a blank image stands in)."
        kept = self.__dict__.setdefault('_kept', {})
        if i not in kept:
            blank = TensorCT(torch.zeros(ct.n_channels, ct.spec.size, ct.spec.size))
            kept[i] = tuple(self.after_item((blank, *(tl[i] for tl in self.dataset.tls[1:]))))[1:]
        return kept[i]


class _IndexSplitter:
    "Splits a list of records by their `split` field (picklable, for `learn.export`)."
    def __init__(self, train='train', valid='val'): self.train, self.valid = train, valid
    def __call__(self, items): return split_records(items, self.train, self.valid)


def detection_block(spec: SliceSpec, target='points', augment=True, cache=None, slots: int = MIN_TARGET_SLOTS) -> DataBlock:
    """DataBlock over `SliceRecord`s: a CT slice block (module-level `CTSlice`), every lesion of the
    slice as a `PointBlock` (four corners each) or `BBoxBlock` target padded to `slots`, and their
    `TensorScore` flags (1 real, 0 padding), a fixed count that needs no per-batch padding (fastai's
    `bb_pad` puts padding at the image centre, where augmentation moves it; a fixed count also keeps
    batches gatherable across processes). Train / valid follow the records' `split` ('train' / 'val')."""
    target_block = PointBlock if target == 'points' else BBoxBlock
    return DataBlock(blocks=(TransformBlock(type_tfms=CTSlice(spec, cache), dl_type=SliceDL), target_block, TransformBlock()),
                     getters=[noop, LesionBoxes(spec.size, target, slots), LesionFlags(slots)], splitter=_IndexSplitter(), n_inp=1,
                     item_tfms=[SlicePixels()], batch_tfms=box_augmentations() if augment else [BoxTidy()])


def detection_dls(records: list[SliceRecord], spec: SliceSpec = SliceSpec(), target='points', bs=16,
                  augment=True, num_workers=0, seed=None, cache=None, **kwargs):
    """DataLoaders for detection: batches (image [B, C, size, size], boxes, flags [B, M]) where boxes are
    [B, 2M, 2] corners (`points`) or [B, M, 4] (`bbox`, with `before_batch=noop`: no labels to pad),
    M = `target_slots(records)`."""
    block = detection_block(spec, target, augment, cache, target_slots(records))
    if target == 'bbox': kwargs.setdefault('before_batch', noop)
    dls = block.dataloaders(records, bs=bs, num_workers=num_workers, seed=seed, **kwargs)
    if len(dls.valid_ds) == 0: raise ValueError("no validation slices: the data has no rows with Train_Val_Test = 2")
    return dls


def slice_transform(dls) -> CTSlice:
    "The `CTSlice` of a learner's DataLoaders (also of an exported learner's empty ones): its `spec` says windows, context and size."
    for t in dls.valid.dataset.tls[0].tfms.fs:
        if isinstance(t, CTSlice): return t
    raise ValueError("these DataLoaders do not read CT slices with CTSlice")


def labelled_dl(learn, data, split: str = 'test', bs: int | None = None):
    """A labelled DataLoader of the `split` slices ('test' or 'val', scored as DeepLesion's protocol
    scores them) of the data folder `data`, built with `learn`'s own transforms. It makes the visual
    check work on an exported learner, whose own DataLoaders hold no items:
    `learn.show_results(dl=labelled_dl(learn, 'data/synthetic'))`."""
    _, records = load_data(data)
    recs = evaluation_records(records, split)
    if not recs: raise ValueError(f"{data}: no {split} slices (Train_Val_Test {'3' if split == 'test' else '2'}) left to show")
    dl = learn.dls.test_dl(recs, with_labels=True, bs=bs or min(len(recs), 9))
    dl.dataset.n_inp = learn.dls.n_inp      # fastai's test_set does not carry n_inp over: with two targets it would guess 2
    return dl


def autoencoder_block(spec: SliceSpec, valid_patients=(), augment=True, cache=None) -> DataBlock:
    "DataBlock of image-only items (slice paths) for autoencoder pretraining; the target is made by the corruption callback."
    return DataBlock(blocks=(TransformBlock(type_tfms=CTSlice(spec, cache), dl_type=SliceDL),), n_inp=1,
                     splitter=FuncSplitter(_InPatients(set(valid_patients))),
                     batch_tfms=aug_transforms(max_rotate=10., max_zoom=1.1, max_lighting=0., max_warp=0.) if augment else None)


class _InPatients:
    def __init__(self, patients): self.patients = patients
    def __call__(self, path): return patient_of(Path(path).parent.name) in self.patients


def autoencoder_dls(paths: list, valid_patients, spec: SliceSpec = SliceSpec(), bs=16, num_workers=0,
                    seed=None, cache=None, **kwargs):
    "DataLoaders over slice paths; slices of `valid_patients` form the validation set."
    block = autoencoder_block(spec, valid_patients, cache=cache)
    return block.dataloaders([str(p) for p in paths], bs=bs, num_workers=num_workers, seed=seed, **kwargs)


# --- display: CT in 'bone', ground truth green, prediction yellow --------------------------------------------

# Decoded boxes are in slice-file pixels (`SlicePixels`); they are drawn on the model-size image. A batch's
# targets are (boxes, flags), its decoded predictions (boxes, scores).

@dispatch
def show_batch(x: TensorCT, y: tuple, samples, ctxs=None, max_n=9, nrows=None, ncols=None, figsize=None, **kwargs):
    if ctxs is None: ctxs = get_grid(min(len(samples), max_n), nrows=nrows, ncols=ncols, figsize=figsize)
    ctxs = [s[0].show(ctx=c) for s, c, _ in zip(samples, ctxs, range(max_n))]
    return [_show_boxes(s[1], s[2], c, 'lime', _display_scale(s[0]))[0] for s, c in zip(samples, ctxs)]


@dispatch
def show_results(x: TensorCT, y: tuple, samples, outs, ctxs=None, max_n=9, nrows=None, ncols=None, figsize=None,
                 min_score: float | None = None, **kwargs):
    """Ground truth green; predicted boxes scoring at least `min_score` yellow, each with its score, and
    the top box of each slice always (dashed where it scores less). `min_score` defaults to the
    model's operating point (the score of 1 false positive per validation slice, stored in its
    export). Says how many boxes it drew and at which threshold."""
    from .heatmap import Decoding
    from .log import log
    op = getattr(outs[0][1], 'operating_score', None) if len(outs) else None
    threshold, why = Decoding(operating_score=op).shown_above(min_score)
    if ctxs is None: ctxs = get_grid(min(len(samples), max_n), nrows=nrows, ncols=ncols, figsize=figsize)
    ctxs = [s[0].show(ctx=c) for s, c, _ in zip(samples, ctxs, range(max_n))]
    ctxs = [_show_boxes(s[1], s[2], c, 'lime', _display_scale(s[0]))[0] for s, c in zip(samples, ctxs)]
    drawn = [_show_boxes(o[0], o[1], c, 'yellow', _display_scale(s[0]), threshold, label=True, top=True) for s, o, c in zip(samples, outs, ctxs)]
    log.info(f"show_results: {sum(n for _, n in drawn)} box(es) drawn at score >= {threshold:.3f} ({why}); "
             f"the top box of each slice always, dashed where it scores less")
    return [c for c, _ in drawn]


def _show_boxes(boxes, scores, ctx, color, scale=None, min_score: float = .5, label: bool = False, top: bool = False):
    """Draw decoded boxes (corner pairs or x1,y1,x2,y2, slice pixels) whose score (or target flag) is at
    least `min_score`, and with `top` the first (best) one whatever it scores, dashed if it is less;
    with `label`, each with its score. Returns (`ctx`, how many it drew)."""
    from .plots import draw_box
    b = torch.as_tensor(boxes).detach().reshape(-1, 2, 2).float().cpu()
    if scale is not None: b = b * scale
    b = torch.cat([b.min(1).values, b.max(1).values], 1)                                # [M, 4]
    sc = torch.ones(len(b)) if scores is None else torch.as_tensor(scores).detach().float().cpu().reshape(-1)
    n = 0
    for i, (box, score) in enumerate(zip(b.tolist(), sc.tolist())):
        below = score < min_score
        if below and not (top and i == 0): continue
        draw_box(ctx, box, color, ls='--' if below else '-')
        n += 1
        if label: ctx.text(box[0], box[1] - 1, f'{score:.2f}' + (' (below)' if below else ''), color=color, fontsize=7)
    return ctx, n
