"""Training infrastructure as fastai callbacks: a time budget, a stop on a non-finite loss, atomic
best-model saving, a CSV log that resumes, and per-epoch resume state that resumes exactly. (The
pretexts' callbacks live with the pretraining run, `pretraining.py`.)

Two of them override fastai internals, each pinned by a test (`tests/test_fastai_pins.py`) so that a
fastai upgrade that changes them fails loudly: `SaveModelCallback._save(name)` (every save goes
through it), `CSVLogger._write_line` and `old_logger` (set by `before_fit`, restored by `after_fit`)."""
from __future__ import annotations

import random
import time

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import CSVLogger
from fastai.callback.tracker import SaveModelCallback
from fastai.torch_core import get_model

from . import distributed
from .checkpoint import atomic_save
from .files import NO_SPACE, atomic_path, disk_full

__all__ = ['TimeBudget', 'StopOnNonFinite', 'AtomicSaveModelCallback', 'ResumableCSVLogger', 'ResumeState', 'rng_state', 'set_rng_state']


class TimeBudget(Callback):
    "Stop training once `seconds` of wall-clock time have passed (for comparisons at equal time; every rank together)."
    def __init__(self, seconds: float): self.seconds = seconds
    def before_fit(self): self.start = time.perf_counter()

    def after_batch(self):
        if self.training and distributed.agree(time.perf_counter() - self.start > self.seconds): raise CancelFitException()


class StopOnNonFinite(Callback):
    """Stop a run whose loss is NaN or infinite, before the backward pass could carry it into the
    weights. It cancels the fit and keeps the cause in `problem`, naming the epoch and batch; the
    caller raises it (`FloatingPointError`), so a run never goes on to export what it has as a
    result, as after fastai's silent `TerminateOnNaNCallback`. Runs after every loss term."""
    order = 90
    problem = None

    def before_fit(self): self.problem = None

    def after_loss(self):
        loss = self.learn.loss_grad if self.training else self.learn.loss
        if not distributed.agree(not torch.isfinite(loss).all()): return    # a rank's NaN stops them all
        phase = 'training' if self.training else 'validation'
        self.problem = (f"{phase} loss is {float(loss.detach().float().mean())} at epoch {self.epoch + 1} of {self.n_epoch}, "
                        f"{phase} batch {self.iter + 1} of {self.n_iter}: the run stopped before it reached the weights "
                        f"(last.pth holds the last finished epoch, if any); try a lower --lr")
        raise CancelFitException()


class AtomicSaveModelCallback(SaveModelCallback):
    """fastai's `SaveModelCallback` (best epoch by a monitored metric) writing through temp file + rename.
    Epochs before `start_epoch` (skipped when resuming: fastai cancels them but still calls
    `after_epoch`) are ignored. In several processes rank 0 writes, and every rank loads the best
    epoch from its file after the fit. A run of several fits (`fit.fit_resumable`'s phases) keeps its
    best across them and loads it after the last one only (`load_at_end`)."""
    start_epoch, offset, load_at_end = 0, 0, True

    def after_epoch(self):
        if self.epoch >= self.start_epoch: super().after_epoch()

    def after_fit(self, **kwargs):  # a run stopped inside its first epoch has no best model to load
        distributed.barrier()       # rank 0's last save is complete before anyone reads it
        if self.load_at_end and (self.learn.path / self.learn.model_dir / f'{self.fname}.pth').exists(): super().after_fit(**kwargs)

    def _save(self, name):
        file = self.learn.path / self.learn.model_dir / f'{name}.pth'
        self.last_saved_path = file
        if not distributed.is_main(): return
        model = get_model(self.learn.model).state_dict()    # without DistributedDataParallel's wrapper
        opt = self.learn.opt if self.with_opt else None
        atomic_save({'model': model, 'opt': opt.state_dict()} if opt is not None else model, file)


class ResumableCSVLogger(CSVLogger):
    """fastai's `CSVLogger`; when resuming it first cuts the log back to the epochs the resume state
    holds (a run killed after writing an epoch's row but before saving that epoch's state would
    otherwise get the row twice), then appends without a second header and without rows for the
    skipped epochs. The second fit of a run (`offset` epochs after its first) appends too, numbering
    its epochs after the first fit's."""
    start_epoch, offset = 0, 0

    def before_fit(self):
        path = self.path / self.fname
        if not ((self.start_epoch or self.offset) and path.exists()): return super().before_fit()
        lines = path.read_text().splitlines(keepends=True)
        with atomic_path(path) as tmp: tmp.write_text(''.join(lines[:1 + self.offset + self.start_epoch]))   # header + finished epochs
        self.file = path.open('a')
        self.old_logger, self.learn.logger = self.logger, self._write_line

    def _write_line(self, log):
        try:
            if self.epoch >= self.start_epoch: super()._write_line([log[0] + self.offset, *log[1:]])
            else: self.old_logger(log)
        except OSError as e:                # a row cut short is cut off on --resume: last.pth was not saved after it
            if e.errno not in NO_SPACE: raise
            raise disk_full(self.path / self.fname) from None


def rng_state(dls=()) -> dict:
    "Every random state a fit draws from: Python, NumPy, torch (CPU and CUDA) and each DataLoader's own."
    return {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'loaders': [dl.rng.getstate() for dl in dls]}


def set_rng_state(state: dict, dls=()) -> None:
    "Put back what `rng_state` saved."
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available(): torch.cuda.set_rng_state_all(state['cuda'])
    for dl, s in zip(dls, state['loaders']): dl.rng.setstate(s)


class ResumeState(Callback):
    """After every epoch, atomically save model, optimizer, epoch, the best score so far, every random
    state (shuffling, augmentation, sampling) and the smoothed training loss to `file`. `restore` puts
    model, optimizer and scores back; the random states and the smoothed loss are put back as the
    first resumed epoch begins, so `fit_one_cycle(..., start_epoch=epoch + 1)` continues exactly as the
    uninterrupted run would have: the same history and the same weights. In several processes rank 0
    writes the file with every rank's random states, and each rank resumes from its own. Epochs are
    counted over the whole run (`offset`: the epochs of its earlier fits)."""
    order = AtomicSaveModelCallback.order + 1

    def __init__(self, file, tracker: SaveModelCallback | None = None, csv: ResumableCSVLogger | None = None):
        self.file, self.tracker, self.csv = file, tracker, csv
        self.pending = None

    start_epoch, offset = 0, 0

    def before_epoch(self):
        if self.pending is None or self.epoch != self.start_epoch: return
        rng = self.pending['rng']
        if isinstance(rng, list): rng = rng[distributed.rank()]      # a distributed run's: one per rank
        set_rng_state(rng, self._loaders())
        smooth = self.learn.recorder.smooth_loss
        smooth.count, smooth.val = self.pending['smooth_loss']
        self.pending = None

    def after_epoch(self):
        if self.epoch < self.start_epoch: return  # skipped while resuming
        smooth = self.learn.recorder.smooth_loss
        rngs = distributed.gather(rng_state(self._loaders()))
        if not distributed.is_main(): return
        atomic_save({'model': get_model(self.learn.model).state_dict(), 'opt': self.learn.opt.state_dict(), 'epoch': self.offset + self.epoch,
                     'n_epoch': self.n_epoch, 'best': None if self.tracker is None else self.tracker.best,
                     'rng': rngs[0] if len(rngs) == 1 else rngs, 'smooth_loss': (smooth.count, smooth.val)}, self.file)

    def _loaders(self): return [distributed.unwrap_loader(dl) for dl in self.learn.dls.loaders]

    def finished(self) -> int:
        "How many epochs the saved state holds (the next epoch to run), without loading it into a learner."
        return torch.load(self.file, map_location='cpu', weights_only=False)['epoch'] + 1

    def restore(self, learn) -> int:
        "Load the saved state into `learn`; returns the next epoch to run."
        state = torch.load(self.file, map_location='cpu', weights_only=False)
        learn.model.load_state_dict(state['model'])
        if learn.opt is None: learn.create_opt()
        learn.opt.load_state_dict(state['opt'])
        self.start_epoch = state['epoch'] + 1
        if 'rng' in state:
            written = len(state['rng']) if isinstance(state['rng'], list) else 1
            if written != distributed.world_size():       # each process's random states (and share of an epoch) would differ
                raise ValueError(f"{self.file} was written by a run of {written} process(es) and this one has "
                                 f"{distributed.world_size()}: resume it with {written} (torchrun --nproc_per_node {written})")
            self.pending = state
        if self.csv is not None: self.csv.start_epoch = self.start_epoch
        if self.tracker is not None:
            self.tracker.start_epoch = self.start_epoch
            if state['best'] is not None: self.tracker.best, self.tracker.reset_on_fit = state['best'], False
        return self.start_epoch
