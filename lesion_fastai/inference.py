"""One inference path: a trained detector over slices, as evaluation (`evaluation.report`),
`lesion_fastai.predict` and pseudo-labelling (`unlabelled.pseudo_label`) all run it. `detect` decides
once what each used to decide for itself: eval mode, no gradients, the device, float32 input, the
batching (a `DataLoader`, with workers where asked), and how an item becomes model input: records and
PNG paths through `CTSlice` (a record's own DICOM window, a path's the soft-tissue one), anything else
through the caller's `read`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .metrics import Detections

__all__ = ['detect', 'read_slices']


class _Inputs(torch.utils.data.Dataset):
    "`read(item)` of each item: a model input [C, size, size], or a tuple whose first element is one and whose rest go back to the caller."
    def __init__(self, items, read): self.items, self.read = list(items), read
    def __len__(self): return len(self.items)
    def __getitem__(self, i): return self.read(self.items[i])


def read_slices(spec, cache=None) -> Callable:
    """How `detect` reads `SliceRecord`s and PNG paths: `CTSlice` with these settings (and the run's
    slice cache, so that evaluation reads exactly what training's validation read)."""
    from .data import CTSlice
    ct = CTSlice(spec, cache)
    return lambda item: ct.encodes(item).as_subclass(torch.Tensor)


def _unbatch(extras) -> list[tuple]:
    "A collated batch's extra fields back as one tuple per item."
    cols = [e.tolist() if torch.is_tensor(e) else list(e) for e in extras]
    return list(zip(*cols))


@torch.no_grad()
def detect(model, spec, decoding, items, bs: int = 16, device=None, workers: int = 0, cache=None, read: Callable | None = None,
           bar: str | None = None) -> tuple[Detections, list[tuple]]:
    """The detector `model` (its input prepared as `spec` says, its maps decoded by `decoding`) on every
    item of `items`, in order, `bs` at a time on `device` (default: where the model is). Items are
    `SliceRecord`s or PNG paths, or whatever `read` turns into a model input (or into a tuple of one
    and extra fields, as `predict` reads DICOM and NIfTI slices with their sizes and errors). Returns
    the `Detections` of all items and, per item, the extra fields `read` gave (empty tuples without).
    `bar`: a progress bar with this comment."""
    from .log import progress
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    dl = torch.utils.data.DataLoader(_Inputs(items, read or read_slices(spec, cache)), batch_size=bs, num_workers=workers,
                                     pin_memory=device.type == 'cuda')
    parts, extras = [], []
    for b in (progress(dl, bar) if bar else dl):
        x, rest = (b[0], b[1:]) if isinstance(b, (list, tuple)) else (b, ())
        boxes, scores, sd = decoding(model(x.to(device).float()))
        parts.append([None if t is None else t.float().cpu().numpy() for t in (boxes, scores, sd)])
        extras += _unbatch(rest) if rest else [()] * len(x)
    if not parts: return Detections(np.zeros((0, decoding.k, 4)), np.zeros((0, decoding.k))), []
    cat = lambda i: None if parts[0][i] is None else np.concatenate([p[i] for p in parts])
    return Detections(cat(0), cat(1), cat(2)), extras
