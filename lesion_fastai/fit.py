"""The fit machinery both runs share: `fit_one_cycle` that keeps the best epoch and resumes exactly,
the precision it trains in, per-rank seeding, the output folder of a run, and the checks made
before anything trains. `pretraining.py` and `finetuning.py` hold the two runs themselves.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from fastai.torch_core import set_seed

from . import distributed
from .callbacks import AtomicSaveModelCallback, ResumableCSVLogger, ResumeState, StopOnNonFinite
from .config import PRECISIONS
from .files import output_folder
from .log import log, speaking

__all__ = ['fit_resumable', 'check_batches', 'native_size', 'check_precision', 'resolved_precision', 'speed_up', 'run_folder',
           'seed_rank', 'loader_kwargs']


def check_batches(n_items: int, bs: int, what: str, hint: str) -> None:
    "Training drops the last incomplete batch: fewer items than --bs would train on nothing."
    if n_items < bs:
        raise ValueError(f"{what}: {n_items} training slice(s), fewer than --bs {bs}, so an epoch would have no batch "
                         f"and nothing would train; use --bs {max(1, n_items)} or less{hint}")


def native_size(records) -> int:
    "The slices' usual width in pixels (the median): a run's default input is half of it."
    return int(np.median([r.width for r in records]))


def fit_resumable(learn, out: Path, epochs: int, lr, monitor: str, resume: bool, cbs=()) -> None:
    """`fit_one_cycle` with the best epoch kept by `monitor` (models/best.pth), history.csv, and the
    resume state last.pth after every epoch; with `resume`, continue from last.pth where it stopped.
    Launched in several processes (torchrun), the fit is data parallel and only rank 0 writes."""
    best = AtomicSaveModelCallback(monitor=monitor, fname='best')
    csv = ResumableCSVLogger('history.csv') if distributed.is_main() else None  # relative to learn.path (= out)
    state = ResumeState(out / 'last.pth', best, csv)
    start = state.restore(learn) if resume and state.file.exists() else 0
    if resume and start: log.info(f"resuming from {state.file} at epoch {start}")
    if start >= epochs:  # finished before: the best epoch is the result, as after an uninterrupted fit
        if (out / 'models' / 'best.pth').exists(): learn.load('best')
        return
    finite = StopOnNonFinite()
    fit = lambda: learn.fit_one_cycle(epochs, lr, start_epoch=start, cbs=[best, state, *([csv] if csv else []), finite, *cbs])
    with distributed.data_parallel(learn):
        if speaking(): fit()
        else:
            with learn.no_bar(), learn.no_logging(): fit()
    if finite.problem: raise FloatingPointError(finite.problem)


def check_precision(precision: str) -> None:
    "A precision this machine can train in: bf16 needs a CUDA GPU."
    if precision not in PRECISIONS: raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == 'bf16' and not torch.cuda.is_available():
        raise ValueError("--precision bf16 needs a CUDA GPU (fastai's mixed precision is CUDA autocast); on the CPU use auto or fp32")


def resolved_precision(precision: str) -> str:
    "What a run with this --precision trains in here: 'auto' is bf16 on a CUDA GPU, fp32 on the CPU."
    return 'fp32' if precision == 'fp32' or not torch.cuda.is_available() else 'bf16'


def speed_up(learn, precision: str) -> str:
    """On a CUDA GPU (precision 'auto' or 'bf16'): bfloat16 autocast (fastai's `MixedPrecision`, no loss
    scaling needed) with the model in channels_last. Returns the precision the fit runs in."""
    if resolved_precision(precision) == 'fp32' or learn.dls.device is None or learn.dls.device.type != 'cuda': return 'fp32'
    learn.to_channelslast(amp_mode='bf16')
    return 'bf16'


def run_folder(out: Path):
    "Rank 0 (or the only process) makes the output folder and cleans it up after a failure; other ranks write nothing."
    return output_folder(out) if distributed.is_main() else nullcontext(out)


def seed_rank(seed: int) -> None:
    """In several processes, after the model is built (the same on every rank): each rank its own
    augmentation and masking draws (rank 0 keeps the single-process ones; shuffling comes from rank 0)."""
    if distributed.rank(): set_seed(seed + 7919 * distributed.rank(), reproducible=True)


def loader_kwargs() -> dict:
    "Pinned host memory makes the copies to a GPU asynchronous."
    return {'pin_memory': torch.cuda.is_available()}
