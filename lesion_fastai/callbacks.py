"""Callbacks: input corruption for the autoencoder, atomic best-model saving, and per-epoch resume state."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import time

from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import CSVLogger
from fastai.callback.tracker import SaveModelCallback

from .checkpoint import atomic_save
from .losses import to_unit

__all__ = ['TimeBudget', 'CentreMapLoss', 'MaskedCorruption', 'corrupt', 'AtomicSaveModelCallback', 'ResumableCSVLogger', 'ResumeState']


def corrupt(x: torch.Tensor, mask_ratio: float = .5, patch: int = 8, noise_std: float = .05, generator=None):
    """Mask a random `mask_ratio` of `patch` x `patch` squares (set to 0) and add Gaussian noise.
    Returns (corrupted [B, C, H, W], mask [B, 1, H, W] with 1 where masked)."""
    B, _, H, W = x.shape
    gh, gw = -(-H // patch), -(-W // patch)
    m = (torch.rand(B, 1, gh, gw, generator=generator, device=x.device) < mask_ratio).to(x.dtype)
    m = F.interpolate(m, scale_factor=patch, mode='nearest')[..., :H, :W]
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * noise_std
    return (x * (1 - m) + noise).clamp(0, 1), m


class MaskedCorruption(Callback):
    """Autoencoder objective as a callback: the batch's clean slices become the target and the model
    sees them with masked patches and noise, so it must inpaint from context rather than copy."""
    order = 5  # after the batch is on its device, before the model runs

    def __init__(self, mask_ratio: float = .5, patch: int = 8, noise_std: float = .05):
        self.mask_ratio, self.patch, self.noise_std = mask_ratio, patch, noise_std

    def before_batch(self):
        x = self.xb[0]
        self.learn.yb = (x.clone(),)
        self.learn.xb = (corrupt(x, self.mask_ratio, self.patch, self.noise_std)[0],)


class TimeBudget(Callback):
    "Stop training once `seconds` of wall-clock time have passed (for comparisons at equal time)."
    def __init__(self, seconds: float): self.seconds = seconds
    def before_fit(self): self.start = time.perf_counter()

    def after_batch(self):
        if self.training and time.perf_counter() - self.start > self.seconds: raise CancelFitException()


class CentreMapLoss(Callback):
    """Dense supervision for the localizer's map head (CenterNet's recipe): cross-entropy of the
    position scores against the cell holding the target box's centre, plus the run's box loss on the
    box predicted at that cell, added with `weight` to the loss. One box gives one regression target
    per image; this turns *where* into a classification over every position, which is what lets a
    few hundred labeled slices teach the model a lesion from a bowel loop.

    With `radius` > 0 the box *sizes* predicted at the neighbouring cells (within `radius` cells) are
    trained too: each neighbour's width and height, placed on the target's centre, against the target
    box. When the best score lands one cell off the centre at inference, that cell's size is then a
    trained one (with `radius=0` it was not, and such boxes could cover most of the image). Only sizes:
    asking neighbours for the whole box (their centre offsets too) made training much worse."""
    def __init__(self, weight: float = 1., radius: int = 1):
        self.weight, self.radius = weight, radius

    def after_loss(self):
        head = self.learn.model.head
        scores, boxes = getattr(head, 'last_scores', None), getattr(head, 'last_boxes', None)
        if not self.weight or scores is None or not len(self.yb): return
        t = to_unit(self.yb[0])                                                 # [B, 4] x1,y1,x2,y2 in [0, 1]
        B, h, w = scores.shape
        ix = ((t[:, 0] + t[:, 2]) / 2 * w).long().clamp(0, w - 1)
        iy = ((t[:, 1] + t[:, 3]) / 2 * h).long().clamp(0, h - 1)
        cell = iy * w + ix
        extra = F.cross_entropy(scores.reshape(B, -1).float(), cell)
        if boxes is not None:
            rows = torch.arange(B, device=t.device)
            extra = extra + self.learn.loss_func(boxes[rows, cell] * 2 - 1, t * 2 - 1)
            if self.radius > 0: extra = extra + self._size_loss(boxes, t, ix, iy, h, w)
        self.learn.loss_grad = self.learn.loss_grad + self.weight * extra
        self.learn.loss = self.learn.loss_grad.detach().clone()

    def _size_loss(self, boxes, t, ix, iy, h, w):
        "The run's box loss on the neighbours' sizes, each placed on the target's centre."
        r = torch.arange(-self.radius, self.radius + 1, device=t.device)
        ny, nx = iy[:, None, None] + r[None, :, None], ix[:, None, None] + r[None, None, :]
        keep = ((ny >= 0) & (ny < h) & (nx >= 0) & (nx < w) & ~((ny == iy[:, None, None]) & (nx == ix[:, None, None]))).flatten(1)
        cells = (ny.clamp(0, h - 1) * w + nx.clamp(0, w - 1)).flatten(1)                   # [B, k*k]
        b = boxes[torch.arange(len(t), device=t.device)[:, None], cells][keep]             # [n, 4] inside the map
        tt = t[:, None].expand(-1, cells.shape[1], -1)[keep]
        half, c = (b[:, 2:] - b[:, :2]) / 2, (tt[:, :2] + tt[:, 2:]) / 2
        return self.learn.loss_func(torch.cat([c - half, c + half], 1) * 2 - 1, tt * 2 - 1)


class AtomicSaveModelCallback(SaveModelCallback):
    """fastai's `SaveModelCallback` (best epoch by a monitored metric) writing through temp file + rename.
    Epochs before `start_epoch` (skipped when resuming: fastai cancels them but still calls
    `after_epoch`) are ignored."""
    start_epoch = 0

    def after_epoch(self):
        if self.epoch >= self.start_epoch: super().after_epoch()

    def after_fit(self, **kwargs):  # a run stopped inside its first epoch has no best model to load
        if (self.learn.path / self.learn.model_dir / f'{self.fname}.pth').exists(): super().after_fit(**kwargs)

    def _save(self, name):
        file = self.learn.path / self.learn.model_dir / f'{name}.pth'
        opt = self.learn.opt if self.with_opt else None
        state = {'model': self.learn.model.state_dict(), 'opt': opt.state_dict()} if opt is not None else self.learn.model.state_dict()
        self.last_saved_path = atomic_save(state, file)


class ResumableCSVLogger(CSVLogger):
    """fastai's `CSVLogger`; when resuming it appends to the existing log without a second header and
    without rows for the skipped epochs."""
    start_epoch = 0

    def before_fit(self):
        path = self.path / self.fname
        if not (self.start_epoch and path.exists()): return super().before_fit()
        self.file = path.open('a')
        self.old_logger, self.learn.logger = self.logger, self._write_line

    def _write_line(self, log):
        if self.epoch >= self.start_epoch: super()._write_line(log)
        else: self.old_logger(log)


class ResumeState(Callback):
    """After every epoch, atomically save model, optimizer, epoch and the best score so far to `file`;
    `restore` puts them back so `fit_one_cycle(..., start_epoch=epoch + 1)` continues the same schedule."""
    order = AtomicSaveModelCallback.order + 1

    def __init__(self, file, tracker: SaveModelCallback | None = None, csv: ResumableCSVLogger | None = None):
        self.file, self.tracker, self.csv = file, tracker, csv

    start_epoch = 0

    def after_epoch(self):
        if self.epoch < self.start_epoch: return  # skipped while resuming
        atomic_save({'model': self.learn.model.state_dict(), 'opt': self.learn.opt.state_dict(), 'epoch': self.epoch,
                     'n_epoch': self.n_epoch, 'best': None if self.tracker is None else self.tracker.best}, self.file)

    def restore(self, learn) -> int:
        "Load the saved state into `learn`; returns the next epoch to run."
        state = torch.load(self.file, map_location='cpu', weights_only=False)
        learn.model.load_state_dict(state['model'])
        if learn.opt is None: learn.create_opt()
        learn.opt.load_state_dict(state['opt'])
        self.start_epoch = state['epoch'] + 1
        if self.csv is not None: self.csv.start_epoch = self.start_epoch
        if self.tracker is not None:
            self.tracker.start_epoch = self.start_epoch
            if state['best'] is not None: self.tracker.best, self.tracker.reset_on_fit = state['best'], False
        return self.start_epoch
