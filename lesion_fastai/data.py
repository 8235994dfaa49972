"""fastai DataBlocks over DeepLesion: CT slices (HU -> windows -> [0, 1] -> half resolution by area
averaging, neighbour slices as extra channels) with `PointBlock` or `BBoxBlock` box targets, and
image-only blocks for the autoencoder.

Facts this module is built around (checked on fastai 2.8.12): PIL's RGB / L conversions destroy
16-bit CT, so slices are read in HU by `deeplesion.load_hu` and windowed here; `PointScaler` scales
points by the size of the image tensor in the same tuple; flips and rotations neither re-sort nor
clip corners, so `BoxTidy` does both after augmentation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.vision.all import (DataBlock, TransformBlock, PointBlock, BBoxBlock, TensorImage, TensorPoint,
                               TensorBBox, Transform, aug_transforms, noop, dispatch, get_grid, show_image,
                               FuncSplitter)

from .boxes import boxes_to_xyxy
from .deeplesion import SliceFileError, SliceRecord, context_paths, evaluation_records, load_data, load_hu, resolve_windows, window

__all__ = ['TensorCT', 'TensorBoxCorners', 'CTSlice', 'SlicePixels', 'BoxTarget', 'BoxTidy', 'split_records', 'select_patients',
           'box_augmentations', 'localization_block', 'localization_dls', 'autoencoder_block', 'autoencoder_dls',
           'labelled_dl', 'slice_transform', 'downsample', 'n_channels']


class TensorCT(TensorImage):
    """Windowed CT [C, H, W] in [0, 1]; channel 0 is the key slice in the first window. Shown in 'bone'.
    `orig_size` (width, height) is the slice file's size, so boxes can be decoded into its pixels."""
    _show_args = {'cmap': 'bone'}

    def show(self, ctx=None, **kwargs):
        return show_image(self[0] if self.ndim == 3 else self, ctx=ctx, **{**self._show_args, 'vmin': 0, 'vmax': 1, **kwargs})


class TensorBoxCorners(TensorPoint):
    "Two corner points (x1, y1), (x2, y2) of one box, shown as a rectangle (ground truth green)."
    def show(self, ctx=None, color='lime', **kwargs): return _show_box(self, ctx, color)


def downsample(img: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    "Area-average [C, H, W] to `size` (each output pixel is the mean of the input pixels it covers)."
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(img.shape[-2:]) == size: return img
    return F.interpolate(img[None], size=size, mode='area')[0]


def n_channels(windows: str, context: int) -> int:
    "Input channels of a slice block: one per window and per slice (key slice and `context` on each side)."
    return len(resolve_windows(windows, (0, 1))) * (2 * context + 1)


class CTSlice(Transform):
    """Load a slice (a `SliceRecord` or a PNG path) as `TensorCT` [C, size, size]: for each window, the
    key slice then its neighbours k-1, k+1, ..., k-c, k+c (missing neighbours fall back to the
    nearest shipped slice). `windows` as in `deeplesion.resolve_windows`; 'dicom' uses the record's
    own DICOM window (a plain path falls back to 'soft'). `cache`: a dict-like (path -> tensor) that
    keeps prepared slices, so epochs after the first skip PNG decoding (use with num_workers=0)."""
    input_types = (SliceRecord, str, Path)  # lets learn.predict take a PNG path as well as a record

    def __init__(self, windows: str = 'soft', context: int = 0, size: int = 256, cache=None):
        super().__init__()
        self.windows, self.context, self.size, self.cache = windows, context, size, cache
        self.n_channels = n_channels(windows, context)

    def load(self, path, dicom_window=None) -> TensorCT:
        "The windowed, downsampled channels of the slice at `path`, [C, size, size] float32, with its `orig_size`."
        wins = resolve_windows(self.windows, dicom_window if dicom_window is not None else (-150., 250.))
        paths = context_paths(path, self.context)
        order = [self.context] + [i for o in range(1, self.context + 1) for i in (self.context - o, self.context + o)]
        hus = [load_hu(paths[i]) for i in order]
        shape = hus[0].shape
        for p, h in zip([paths[i] for i in order], hus):
            if h.shape != shape: raise SliceFileError(p, f"size {h.shape} differs from its key slice's {shape}")
        chans = np.stack([window(h, lo, hi) for lo, hi in wins for h in hus])
        return TensorCT(downsample(torch.from_numpy(chans), self.size), orig_size=(shape[1], shape[0]))

    def channels(self, path, dicom_window=None) -> torch.Tensor:
        "`load` as a plain tensor."
        return self.load(path, dicom_window).as_subclass(torch.Tensor)

    def encodes(self, item) -> TensorCT:
        if isinstance(item, SliceRecord): path, dw = item.image_path, item.dicom_window
        else: path, dw = str(item), None
        if self.cache is None: return self.load(path, dw)
        t = self.cache.get(path)
        if t is None: t = self.cache[path] = self.load(path, dw)
        return t

    def __getstate__(self):  # an exported learner carries the settings, not the cached pixels
        return {**self.__dict__, 'cache': None}


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


class BoxTarget:
    """A record's training target box (its largest lesion) in pixels of the `size` x `size` input:
    `points` gives the box's four corners [4, 2] (so rotation moves all of them; `BoxTidy` reduces
    them to two), `bbox` gives [[x1, y1, x2, y2]]."""
    def __init__(self, size: int, kind: str = 'points'):
        if kind not in ('points', 'bbox'): raise ValueError(f"target {kind!r}: expected 'points' or 'bbox'")
        self.size, self.kind = size, kind

    def __call__(self, r: SliceRecord):
        sx, sy = self.size / r.width, self.size / r.height
        x1, y1, x2, y2 = (float(v) for v in r.target)
        x1, x2, y1, y2 = x1 * sx, x2 * sx, y1 * sy, y2 * sy
        if self.kind == 'bbox': return [[x1, y1, x2, y2]]
        return [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]


class BoxTidy(Transform):
    """After augmentation: corner points -> the enclosing two corners (x1, y1), (x2, y2); boxes re-sorted
    so x1 <= x2 and y1 <= y2; everything clipped to the image ([-1, 1]). Flips swap corners and affine
    warps push them outside the image; this keeps every target a valid box."""
    order = 50  # after fastai's affine (30) and lighting (40) transforms

    def encodes(self, x: TensorBBox):
        b = boxes_to_xyxy(x).clamp(-1, 1)
        b = torch.cat([torch.minimum(b[:, :2], b[:, 2:]), torch.maximum(b[:, :2], b[:, 2:])], 1)
        return TensorBBox(b.view(-1, 1, 4), img_size=getattr(x, 'img_size', None))

    def encodes(self, x: TensorPoint):
        b = boxes_to_xyxy(x).clamp(-1, 1)
        return TensorBoxCorners(b.view(-1, 2, 2), img_size=getattr(x, 'img_size', None))


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


class _IndexSplitter:
    "Splits a list of records by their `split` field (picklable, for `learn.export`)."
    def __init__(self, train='train', valid='val'): self.train, self.valid = train, valid
    def __call__(self, items): return split_records(items, self.train, self.valid)


def localization_block(windows='soft', context=0, size=256, target='points', augment=True, cache=None) -> DataBlock:
    """DataBlock over `SliceRecord`s: a CT slice block (module-level `CTSlice`) and a `PointBlock` (box
    corners) or `BBoxBlock` target. Train / valid follow the records' `split` ('train' / 'val')."""
    target_block = PointBlock if target == 'points' else BBoxBlock
    return DataBlock(blocks=(TransformBlock(type_tfms=CTSlice(windows, context, size, cache)), target_block),
                     get_y=BoxTarget(size, target), splitter=_IndexSplitter(), n_inp=1, item_tfms=[SlicePixels()],
                     batch_tfms=box_augmentations() if augment else [BoxTidy()])


def localization_dls(records: list[SliceRecord], windows='soft', context=0, size=256, target='points', bs=16,
                     augment=True, num_workers=0, seed=None, cache=None, **kwargs):
    """DataLoaders for box regression. `BBoxBlock` targets need `before_batch=noop` (no labels to pad),
    giving [bs, 1, 4]; `PointBlock` targets come out as [bs, 2, 2] corners."""
    block = localization_block(windows, context, size, target, augment, cache)
    if target == 'bbox': kwargs.setdefault('before_batch', noop)
    dls = block.dataloaders(records, bs=bs, num_workers=num_workers, seed=seed, **kwargs)
    if len(dls.valid_ds) == 0: raise ValueError("no validation slices: the data has no rows with Train_Val_Test = 2")
    return dls


def slice_transform(dls) -> CTSlice:
    "The `CTSlice` of a learner's DataLoaders (also of an exported learner's empty ones): its windows, context and size."
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
    return learn.dls.test_dl(recs, with_labels=True, bs=bs or min(len(recs), 9))


def autoencoder_block(windows='soft', context=0, size=256, valid_patients=(), augment=True, cache=None) -> DataBlock:
    "DataBlock of image-only items (slice paths) for autoencoder pretraining; the target is made by the corruption callback."
    return DataBlock(blocks=(TransformBlock(type_tfms=CTSlice(windows, context, size, cache)),), n_inp=1,
                     splitter=FuncSplitter(_InPatients(set(valid_patients))),
                     batch_tfms=aug_transforms(max_rotate=10., max_zoom=1.1, max_lighting=0., max_warp=0.) if augment else None)


class _InPatients:
    def __init__(self, patients): self.patients = patients
    def __call__(self, path): return int(Path(path).parent.name.split('_')[0]) in self.patients


def autoencoder_dls(paths: list, valid_patients, windows='soft', context=0, size=256, bs=16, num_workers=0,
                    seed=None, cache=None, **kwargs):
    "DataLoaders over slice paths; slices of `valid_patients` form the validation set."
    block = autoencoder_block(windows, context, size, valid_patients, cache=cache)
    return block.dataloaders([str(p) for p in paths], bs=bs, num_workers=num_workers, seed=seed, **kwargs)


# --- display: CT in 'bone', ground truth green, prediction yellow --------------------------------------------

# Decoded boxes are in slice-file pixels (`SlicePixels`); they are drawn on the model-size image.

@dispatch
def show_batch(x: TensorCT, y: TensorPoint | TensorBBox, samples, ctxs=None, max_n=9, nrows=None, ncols=None, figsize=None, **kwargs):
    if ctxs is None: ctxs = get_grid(min(len(samples), max_n), nrows=nrows, ncols=ncols, figsize=figsize)
    ctxs = [s[0].show(ctx=c) for s, c, _ in zip(samples, ctxs, range(max_n))]
    return [_show_box(s[1], c, 'lime', _display_scale(s[0])) for s, c in zip(samples, ctxs)]


@dispatch
def show_results(x: TensorCT, y: TensorPoint | TensorBBox, samples, outs, ctxs=None, max_n=9, nrows=None, ncols=None,
                 figsize=None, **kwargs):
    if ctxs is None: ctxs = get_grid(min(len(samples), max_n), nrows=nrows, ncols=ncols, figsize=figsize)
    ctxs = [s[0].show(ctx=c) for s, c, _ in zip(samples, ctxs, range(max_n))]
    ctxs = [_show_box(s[1], c, 'lime', _display_scale(s[0])) for s, c in zip(samples, ctxs)]
    return [_show_box(o[0], c, 'yellow', _display_scale(s[0])) for s, o, c in zip(samples, outs, ctxs)]


def _show_box(t, ctx, color, scale=None):
    "Draw a decoded target or prediction (corner points or x1,y1,x2,y2, in slice pixels) as its enclosing box."
    from .plots import draw_box
    pts = torch.as_tensor(t).detach().reshape(-1, 2).float().cpu()
    if scale is not None: pts = pts * scale
    draw_box(ctx, (*pts.min(0).values.tolist(), *pts.max(0).values.tolist()), color)
    return ctx
