"""A trained detector as a file, written by every `finetune` run and read by `finetune --eval`,
`lesion_fastai.predict` and users: fastai's `export.pkl` (the whole `Learner`, for `load_learner`),
written atomically, read back with errors that name the file, and the settings a user of the model
needs from it (how slices are prepared, how its maps are decoded).
"""
from __future__ import annotations

from pathlib import Path

from fastai.learner import Learner, load_learner

from .files import atomic_path

__all__ = ['save_export', 'load_export', 'detector_settings']


def save_export(learn, path: Path | str) -> Path:
    "`learn.export` to `path` through a temp file and a rename, without metrics (the validation FROC keeps records)."
    path = Path(path)
    learn.metrics = []
    with atomic_path(path) as tmp:
        old, learn.path = learn.path, tmp.parent
        try: learn.export(tmp.name)
        finally: learn.path = old
    return path


def load_export(path: Path | str, cpu: bool = True, flag: str = '') -> Learner:
    """The learner `finetune` exported to `path` (on the CPU unless `cpu=False`); a missing file or one
    that is not such a learner is an error naming it (and the command-line `flag` it came from)."""
    path, name = Path(path), f"{flag} {path}" if flag else str(path)
    if not path.is_file(): raise FileNotFoundError(f"{name}: no such exported model")
    try: learn = load_learner(path, cpu=cpu)
    except Exception as e: raise ValueError(f"{name}: not a learner exported by finetune ({type(e).__name__}: {e})") from None
    if not isinstance(learn, Learner) or not hasattr(learn.loss_func, 'decoding'):
        raise ValueError(f"{name}: not a learner exported by finetune")
    if not hasattr(learn.model, 'decoding'): learn.model.decoding = learn.loss_func.decoding   # exported before it travelled with the model
    return learn


def detector_settings(learn):
    "(`SliceSpec`, `Decoding`) of a detector's learner: how it prepares slices, how it decodes its maps."
    from .data import slice_transform
    return slice_transform(learn.dls).spec, learn.model.decoding
