"""Unsupervised pretraining: the autoencoder learns to reconstruct CT slices from corrupted ones, labels
unused. The pretexts (`corrupt`, Models Genesis's transformations in `genesis`, `corruption_of` that
picks a pretext's, `MaskedCorruption`, the masked and channel losses), the run (`pretrain`, used by
`python -m pretrain`, the demo and the benchmarks) and the baselines a trained autoencoder must beat
(returning its corrupted input, the neighbour slices' mean).

The run writes into its `out` folder: `pretrained.pth` (encoder + decoder + construction arguments +
config), `reconstructions.png`, `history.csv` (one row per epoch), `models/best.pth`, `last.pth`
(resume state) and `pretrain_metrics.json`.
"""
from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.torch_core import set_seed
from torch import nn

from . import distributed
from .cache import drop_near_duplicates, prepare_slices, readable
from .checkpoint import save_pretrained
from .config import PRETEXTS, PretrainConfig, pretext_defaults, recorded, resolve_context
from .data import CTSlice, SliceSpec, autoencoder_dls
from .deeplesion import context_paths, list_slices, load_data, patient_of
from .files import check_out_folder, write_json
from .fit import (back_to_fp32, check_batches, check_precision, check_resume, fit_resumable, loader_kwargs, native_size, run_folder,
                  save_run_settings, seed_rank, speed_up)
from .genesis import RATES as GENESIS_RATES, genesis
from .log import log
from .models.autoencoder import create_autoencoder
from .plots import plot_reconstructions

__all__ = ['corrupt', 'corruption_of', 'key_channels', 'MaskedLoss', 'ChannelLoss', 'MaskedCorruption', 'resolve', 'pretrain']


def corrupt(x: torch.Tensor, mask_ratio: float = .5, patch: int = 8, noise_std: float = .05, generator=None,
            channels: list[int] | None = None):
    """Mask a random `mask_ratio` of `patch` x `patch` squares (set to 0) of the `channels` (default all)
    and add Gaussian noise to every channel. Returns (corrupted [B, C, H, W], mask [B, 1, H, W] with 1
    where masked)."""
    B, C, H, W = x.shape
    gh, gw = -(-H // patch), -(-W // patch)
    m = (torch.rand(B, 1, gh, gw, generator=generator, device=x.device) < mask_ratio).to(x.dtype)
    m = F.interpolate(m, scale_factor=patch, mode='nearest')[..., :H, :W]
    on = torch.zeros(1, C, 1, 1, dtype=x.dtype, device=x.device)
    on[:, channels if channels is not None else slice(None)] = 1
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * noise_std
    return (x * (1 - m * on) + noise).clamp(0, 1), m


def corruption_of(cfg: PretrainConfig, channels: list[int] | None = None):
    """The resolved `cfg`'s pretext as one function (x, generator=None) -> (corrupted, mask [B, 1, H, W]),
    so that training, the copy baseline and the figure corrupt alike: `genesis` at the --genesis-* rates
    given (Models Genesis's where not) for the genesis pretext, else `corrupt` with its mask ratio,
    patch and noise, masking `channels` (default all)."""
    if cfg.pretext == 'genesis':
        rates = {k: v for k in GENESIS_RATES if (v := getattr(cfg, f'genesis_{k}')) is not None}
        return partial(genesis, **rates) if rates else genesis
    return partial(corrupt, mask_ratio=cfg.mask_ratio, patch=cfg.patch, noise_std=cfg.noise_std, channels=channels)


def key_channels(n_channels: int, context: int) -> list[int]:
    "The key slice's channel of each window in a slice block's input (window-major: key, k-1, k+1, ...)."
    return list(range(0, n_channels, 2 * context + 1))


class MaskedLoss:
    """`loss` over the masked pixels only (MAE's objective): called with the output, the clean target and
    the mask [B, 1, H, W] (1 where masked) that `MaskedCorruption(masked_loss=True)` puts in the targets;
    the visible pixels, which the input already shows, teach nothing."""
    def __init__(self, kind: str = 'l1'): self.kind = kind
    def __call__(self, out, y, mask):
        err = (out - y).abs() if self.kind == 'l1' else (out - y) ** 2
        return (err * mask).sum() / (mask.sum() * out.shape[1]).clamp(min=1)
    def __repr__(self): return f"MaskedLoss({self.kind!r})"


class ChannelLoss:
    "`loss` on the given channels of output and target only (the context pretext scores the key slice)."
    def __init__(self, loss, channels: list[int]): self.loss, self.channels = loss, list(channels)
    def __call__(self, out, y): return self.loss(out[:, self.channels], y[:, self.channels])
    def __repr__(self): return f"ChannelLoss({self.loss}, channels={self.channels})"


class MaskedCorruption(Callback):
    """Autoencoder objective as a callback: the batch's clean slices become the target and the model
    sees them with masked patches (of `channels`, default all) and noise, so it must inpaint from
    context rather than copy. With only the key slice's channels masked, the context pretext: the
    masked regions must come from the neighbour slices. With `masked_loss` the mask joins the
    targets, so that `MaskedLoss` scores the masked pixels only (the mae pretext). `fn`, a function of
    `corruption_of`, replaces the mask ratio, patch, noise and channels (the genesis pretext's)."""
    order = 5  # after the batch is on its device, before the model runs

    def __init__(self, mask_ratio: float = .5, patch: int = 8, noise_std: float = .05, channels: list[int] | None = None,
                 masked_loss: bool = False, fn=None):
        self.mask_ratio, self.patch, self.noise_std, self.channels = mask_ratio, patch, noise_std, channels
        self.masked_loss = masked_loss          # the mask joins the targets, for `MaskedLoss`
        self.fn = fn or partial(corrupt, mask_ratio=mask_ratio, patch=patch, noise_std=noise_std, channels=channels)

    def before_batch(self):
        x = self.xb[0]
        xc, mask = self.fn(x)
        self.learn.yb = (x.clone(), mask) if self.masked_loss else (x.clone(),)
        self.learn.xb = (xc,)



def resolve(cfg: PretrainConfig, records) -> PretrainConfig:
    """`cfg` with every setting the run decides filled in (`dataclasses.replace`): the context from the
    data, the size half the native slice, and the pretext's mask ratio, patch and noise where not
    given; genesis masks nothing, so those stay as given, and its rates are Models Genesis's where not
    given. `asdict` of the result is what the checkpoint records."""
    patch_fraction, default = PRETEXTS[cfg.pretext][1], pretext_defaults(cfg.pretext)
    unless_given = lambda k: default[k] if getattr(cfg, k) is None else getattr(cfg, k)
    context = resolve_context(cfg.context, records, cfg.data)
    if cfg.pretext == 'context' and context < 1:
        raise ValueError("--pretext context reconstructs a slice from its neighbours: it needs --context 1 or more "
                         "(neighbour slices on each side as input channels)")
    size = cfg.size or native_size(records) // 2
    given = [f"--genesis-{k}" for k in GENESIS_RATES if getattr(cfg, f'genesis_{k}') is not None]
    if given and cfg.pretext != 'genesis': log.info(f"--pretext {cfg.pretext} is not Models Genesis: {', '.join(given)} unused")
    if patch_fraction is None:
        given = [f"--{k.replace('_', '-')}" for k in ('mask_ratio', 'patch', 'noise_std') if getattr(cfg, k) is not None]
        if given: log.info(f"--pretext {cfg.pretext} masks nothing and adds no Gaussian noise: {', '.join(given)} unused")
    else: default['patch'] = max(2, round(size * patch_fraction))
    return dataclasses.replace(cfg, context=context, size=size, **{k: unless_given(k) for k in default})


def pretrain(cfg: PretrainConfig) -> dict:
    """Train the autoencoder on every slice of the chosen patients (labels unused), reconstructing clean
    slices from masked, noisy ones (`pretext` 'masked'), the key slice's masked patches from the
    slice's visible rest and its whole neighbour slices ('context': lesions change between
    neighbouring slices, most anatomy barely does), three quarters of small patches masked with
    the loss on them only ('mae'), or whole slices from Models Genesis's shuffled, intensity-mapped,
    in- or out-painted ones, scored on every pixel ('genesis'). Writes `pretrained.pth` (encoder +
    decoder + construction arguments + config), `reconstructions.png`, `history.csv`,
    `pretrain_metrics.json`."""
    t0 = time.time()
    out = check_out_folder(cfg.out)
    distributed.setup()
    check_precision(cfg.precision)
    df, records = load_data(cfg.data, missing_ok=cfg.skip_unreadable)
    cfg = resolve(cfg, records)
    check_resume(cfg, out)
    spec, context, size = SliceSpec.of(cfg), cfg.context, cfg.size
    # 'all' adds the test patients' slices (labels unused); validation patients stay held out for the loss
    train_p = set(df.patient[df.split == 'train']) if cfg.patients == 'train' else set(df.patient[df.split != 'val'])
    val_p = set(df.patient[df.split == 'val'])
    if cfg.patients == 'all':
        log.warning(f"--patients all: the autoencoder pretrains on the test patients' slices too (labels unused), so a detector "
                    f"fine-tuned from it is scored on slices its pretraining saw: its test FROC is not held out from pretraining")
    if not val_p: raise ValueError(f"{cfg.data}: no validation patients (Train_Val_Test = 2), which pretraining needs to "
                                   f"measure its reconstruction loss and keep the best epoch")
    paths = list_slices(cfg.data, train_p | val_p)
    if cfg.pretext == 'context':
        # A slice at the end of what was shipped has a neighbour that falls back to itself: the target in the input.
        whole = [p for p in paths if context_paths(p, context).count(Path(p)) == 1]
        log.info(f"context pretext: {len(whole)} of {len(paths)} slices have all {2 * context} neighbours of their own "
                 f"(the rest, at the ends of what was shipped, would show the model its target)")
        paths = whole
    training = lambda ps: sum(patient_of(Path(p).parent.name) in train_p for p in ps)
    n_train = training(paths)
    check_batches(n_train, cfg.bs, f"{cfg.data}", '')
    log.info(f"pretraining on {n_train} slices of {len(train_p)} patients ({len(paths) - n_train} validation slices), "
             f"{size} px, windows {cfg.windows}, context {context}")
    cache = prepare_slices(cfg.cache, paths, spec, cfg.cache_dir, workers=max(1, cfg.num_workers), skip_unreadable=cfg.skip_unreadable)
    if cfg.skip_unreadable:            # the slices left out as unreadable, named by prepare_slices
        paths = readable(paths, cache)
        n_train = training(paths)
        check_batches(n_train, cfg.bs, f"{cfg.data} with --skip-unreadable", '')
    if cfg.dedup > 0:                  # redundant neighbour slices slow pretraining and can hurt it; validation stays whole
        in_val = lambda p: patient_of(Path(p).parent.name) in val_p
        paths, dropped = drop_near_duplicates(paths, CTSlice(spec, cache), cfg.dedup, keep=in_val)
        n_train -= dropped
        log.info(f"--dedup {cfg.dedup:g}: dropped {dropped} training slice(s) closer than that to the slice kept before them "
                 f"(mean absolute difference of the windowed pixels); {n_train} remain")
        check_batches(n_train, cfg.bs, f"{cfg.data} after --dedup {cfg.dedup:g}", ' or a smaller --dedup')
    with run_folder(out):
        if distributed.is_main(): save_run_settings(cfg, out)
        set_seed(cfg.seed, reproducible=True)
        dls = autoencoder_dls(paths, val_p, spec, cfg.bs, cfg.num_workers, cfg.seed, cache=cache, **loader_kwargs())
        n_in = spec.n_channels
        model = create_autoencoder(n_in, code_channels=tuple(cfg.code_channels), backbone=cfg.backbone, backbone_weights=cfg.backbone_weights)
        masked_loss = cfg.pretext == 'mae'
        loss = MaskedLoss(cfg.loss) if masked_loss else {'l1': nn.L1Loss(), 'mse': nn.MSELoss()}[cfg.loss]
        keys = key_channels(n_in, context) if cfg.pretext == 'context' else None
        if keys: loss = ChannelLoss(loss, keys)
        corruption = corruption_of(cfg, keys)
        learn = Learner(dls, model, loss_func=loss, path=out, model_dir='models',
                        cbs=[MaskedCorruption(masked_loss=masked_loss, fn=corruption)])
        if distributed.is_main():
            with distributed.alone(): untrained = float(learn.validate()[0])
        seed_rank(cfg.seed)
        precision = speed_up(learn, cfg.precision)
        if cfg.epochs: fit_resumable(learn, out, cfg.epochs, cfg.lr, 'valid_loss', cfg.resume)
        else: log.info("--epochs 0: the untrained autoencoder's checkpoint, the control of a pretrained start")
        if not distributed.is_main(): return {}
        back_to_fp32(learn)             # the checkpoint and every figure and loss below: float32
        with distributed.alone(): trained = float(learn.validate()[0])
        config = {**recorded(cfg), 'out': str(out), 'in_chans': n_in, 'precision': precision, 'train_slices': n_train}
        ckpt = save_pretrained(out / 'pretrained.pth', model, config, valid_loss=trained)
        _reconstruction_figure(learn, corruption, out / 'reconstructions.png')
        copy = _copy_baseline(learn, corruption, masked_loss)
        metrics = {'valid_loss_untrained': untrained, 'valid_loss': trained, 'valid_loss_copy_input': copy,
                   'train_slices': n_train, 'config': config, 'time_s': round(time.time() - t0, 1)}
        if keys: metrics['valid_loss_neighbour_mean'] = _neighbour_baseline(learn, keys)
        write_json(metrics, out / 'pretrain_metrics.json')
    log.info(f"valid loss {trained:.4f} (untrained {untrained:.4f}, copying the corrupted input {copy:.4f}); wrote {ckpt}")
    return metrics


@torch.no_grad()
def _copy_baseline(learn, corruption, masked_loss=False) -> float:
    "The loss of returning the corrupted input unchanged: a model must beat it to have learned anything."
    g, losses = None, []
    for (x,) in learn.dls.valid:
        g = g or torch.Generator(device=x.device).manual_seed(0)
        xc, mask = corruption(x, generator=g)
        losses.append(float(learn.loss_func(xc, x, mask) if masked_loss else learn.loss_func(xc, x)))
    return float(np.mean(losses))


@torch.no_grad()
def _neighbour_baseline(learn, keys) -> float:
    """The context pretext's loss of predicting each key slice as the mean of its two nearest neighbours
    (channels key + 1 and key + 2: k-1 and k+1), with no model: what the neighbours alone give."""
    losses = []
    for (x,) in learn.dls.valid:
        guess = x.clone()
        for k in keys: guess[:, k] = (x[:, k + 1] + x[:, k + 2]) / 2
        losses.append(float(learn.loss_func(guess, x)))
    return float(np.mean(losses))


@torch.no_grad()
def _reconstruction_figure(learn, corruption, path, n=4):
    (x,) = learn.dls.valid.one_batch()
    x = x[:n]
    xc, _ = corruption(x, generator=torch.Generator(device=x.device).manual_seed(0))
    learn.model.eval()
    y = learn.model(xc)
    return plot_reconstructions(x[:, 0].cpu().numpy(), xc[:, 0].cpu().numpy(), y[:, 0].cpu().numpy(), path)
