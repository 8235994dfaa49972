"""The two training runs, as functions of a config, shared by `python -m pretrain`, `python -m finetune`,
the demo and the benchmarks (the entry points only parse arguments); `evaluation.py` scores the result.

Each run writes into its `out` folder: `history.csv` (one row per epoch), `models/best.pth` (best
epoch, atomically), `last.pth` (resume state after every epoch), figures and a JSON of results.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from fastai.learner import Learner, load_learner
from fastai.torch_core import set_seed
from torch import nn

from . import distributed
from .callbacks import (AtomicSaveModelCallback, ChannelLoss, MaskedCorruption, MaskedLoss, ResumableCSVLogger, ResumeState,
                        StopOnNonFinite, TimeBudget, corrupt, key_channels)
from .cache import drop_near_duplicates, prepare_slices
from .checkpoint import decoder_args, load_decoder, load_encoder, load_pretrained, save_pretrained
from .data import CTSlice, autoencoder_dls, localization_dls, n_channels, select_patients
from .deeplesion import context_paths, evaluation_records, list_slices, load_data, patient_of
from .evaluation import evaluate_export, report
from .files import atomic_path, check_out_folder, output_folder, write_json
from .freeze import apply_freeze, freeze_callbacks, localizer_splitter, lr_for, parameter_counts
from .losses import DetectionLoss
from .metrics import KEEP, NMS_IOU, ValidFROC, mean_box, summary_line
from .models.autoencoder import CODE_CHANNELS, create_autoencoder
from .models.localizer import SANDWICHES, Localizer
from .plots import plot_reconstructions

__all__ = ['PretrainConfig', 'FinetuneConfig', 'pretrain', 'finetune', 'evaluate_export', 'load_data', 'write_json']


def _check_batches(n_items: int, bs: int, what: str, hint: str) -> None:
    "Training drops the last incomplete batch: fewer items than --bs would train on nothing."
    if n_items < bs:
        raise ValueError(f"{what}: {n_items} training slice(s), fewer than --bs {bs}, so an epoch would have no batch "
                         f"and nothing would train; use --bs {max(1, n_items)} or less{hint}")


def _native_size(records) -> int:
    return int(np.median([r.width for r in records]))


def _fit_resumable(learn, out: Path, epochs: int, lr, monitor: str, resume: bool, quiet: bool = False, cbs=()) -> None:
    """`fit_one_cycle` with the best epoch kept by `monitor` (models/best.pth), history.csv, and the
    resume state last.pth after every epoch; with `resume`, continue from last.pth where it stopped.
    Launched in several processes (torchrun), the fit is data parallel and only rank 0 writes."""
    best = AtomicSaveModelCallback(monitor=monitor, fname='best')
    csv = ResumableCSVLogger('history.csv') if distributed.is_main() else None  # relative to learn.path (= out)
    state = ResumeState(out / 'last.pth', best, csv)
    start = state.restore(learn) if resume and state.file.exists() else 0
    if resume and start: print(f"resuming from {state.file} at epoch {start}")
    if start >= epochs:  # finished before: the best epoch is the result, as after an uninterrupted fit
        if (out / 'models' / 'best.pth').exists(): learn.load('best')
        return
    finite = StopOnNonFinite()
    fit = lambda: learn.fit_one_cycle(epochs, lr, start_epoch=start, cbs=[best, state, *([csv] if csv else []), finite, *cbs])
    with distributed.data_parallel(learn):
        if not quiet: fit()
        else:
            with learn.no_bar(), learn.no_logging(): fit()
    if finite.problem: raise FloatingPointError(finite.problem)


PRECISIONS = ('auto', 'fp32', 'bf16')


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS: raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == 'bf16' and not torch.cuda.is_available():
        raise ValueError("--precision bf16 needs a CUDA GPU (fastai's mixed precision is CUDA autocast); on the CPU use auto or fp32")


def resolved_precision(precision: str) -> str:
    "What a run with this --precision trains in here: 'auto' is bf16 on a CUDA GPU, fp32 on the CPU."
    return 'fp32' if precision == 'fp32' or not torch.cuda.is_available() else 'bf16'


def _speed_up(learn, precision: str) -> str:
    """On a CUDA GPU (precision 'auto' or 'bf16'): bfloat16 autocast (fastai's `MixedPrecision`, no loss
    scaling needed) with the model in channels_last. Returns the precision the fit runs in."""
    if resolved_precision(precision) == 'fp32' or learn.dls.device is None or learn.dls.device.type != 'cuda': return 'fp32'
    learn.to_channelslast(amp_mode='bf16')
    return 'bf16'


def _output_folder(out: Path):
    "Rank 0 (or the only process) makes the output folder and cleans it up after a failure; other ranks write nothing."
    return output_folder(out) if distributed.is_main() else nullcontext(out)


def _seed_rank(seed: int) -> None:
    """In several processes, after the model is built (the same on every rank): each rank its own
    augmentation and masking draws (rank 0 keeps the single-process ones; shuffling comes from rank 0)."""
    if distributed.rank(): set_seed(seed + 7919 * distributed.rank(), reproducible=True)


def _loader_kwargs() -> dict:
    "Pinned host memory makes the copies to a GPU asynchronous."
    return {'pin_memory': torch.cuda.is_available()}


# --- pretraining ---------------------------------------------------------------------------------------------

@dataclass
class PretrainConfig:
    data: Path
    out: Path
    epochs: int = 10
    lr: float = 3e-3
    bs: int = 16
    size: int | None = None           # default: half the native slice size
    windows: str = 'soft'
    context: int = 0
    seed: int = 0
    patients: str = 'train'           # 'train' or 'all'
    mask_ratio: float | None = None   # default: the pretext's (PRETEXTS)
    patch: int | None = None          # default: the pretext's fraction of the size
    noise_std: float | None = None    # default: the pretext's
    loss: str = 'l1'
    pretext: str = 'masked'           # PRETEXTS
    code_channels: tuple = CODE_CHANNELS  # the autoencoder's codes at strides 32, 16, 8 (and 4, with a fourth number)
    backbone: str = 'resnet'          # 'resnet' (the project's body) or a timm model name
    backbone_weights: Path | None = None  # a timm model's local state dict (ImageNet weights, say)
    resume: bool = False
    num_workers: int = 0
    cache: str = 'memory'             # 'memory' (per run), 'disk' (memory-mapped, shared by runs) or 'none'
    cache_dir: Path | None = None     # for 'disk': default ~/.cache/lesion_fastai
    precision: str = 'auto'           # PRECISIONS
    dedup: float = 0.                 # drop training slices this close to their kept neighbour (mean |difference|); 0: keep all


# pretext: (mask ratio, patch as a fraction of the size, noise std), what each reconstructs:
# masked: every channel masked and noisy, all of it reconstructed; context: the key slice's patches masked, its
# neighbour slices whole, the key slice reconstructed; mae: a high ratio of small patches masked, no noise, the loss
# on the masked pixels only (masked autoencoders: He et al. 2022; convolutional ones: SparK, ConvNeXt V2).
PRETEXTS = {'masked': (.5, 1 / 16, .05), 'context': (.5, 1 / 16, .05), 'mae': (.75, 1 / 32, 0.)}


def pretrain(cfg: PretrainConfig) -> dict:
    """Train the autoencoder on every slice of the chosen patients (labels unused), reconstructing clean
    slices from masked, noisy ones (`pretext` 'masked'), the key slice's masked patches from the
    slice's visible rest and its whole neighbour slices ('context': lesions change between
    neighbouring slices, most anatomy barely does), or three quarters of small patches masked with
    the loss on them only ('mae'). Writes `pretrained.pth` (encoder + decoder + construction
    arguments + config), `reconstructions.png`, `history.csv`, `pretrain_metrics.json`."""
    t0 = time.time()
    out = check_out_folder(cfg.out)
    distributed.setup()
    if cfg.patients not in ('train', 'all'): raise ValueError(f"patients {cfg.patients!r}: expected 'train' or 'all'")
    if cfg.pretext not in PRETEXTS: raise ValueError(f"pretext {cfg.pretext!r}: expected one of {', '.join(PRETEXTS)}")
    _check_precision(cfg.precision)
    ratio, patch_fraction, noise = PRETEXTS[cfg.pretext]
    mask_ratio = ratio if cfg.mask_ratio is None else cfg.mask_ratio
    noise_std = noise if cfg.noise_std is None else cfg.noise_std
    if cfg.pretext == 'context' and cfg.context < 1:
        raise ValueError("--pretext context reconstructs a slice from its neighbours: it needs --context 1 or more "
                         "(neighbour slices on each side as input channels)")
    df, records = load_data(cfg.data)
    size = cfg.size or _native_size(records) // 2
    patch = cfg.patch or max(2, round(size * patch_fraction))
    # 'all' adds the test patients' slices (labels unused); validation patients stay held out for the loss
    train_p = set(df.patient[df.split == 'train']) if cfg.patients == 'train' else set(df.patient[df.split != 'val'])
    val_p = set(df.patient[df.split == 'val'])
    if not val_p: raise ValueError(f"{cfg.data}: no validation patients (Train_Val_Test = 2), which pretraining needs to "
                                   f"measure its reconstruction loss and keep the best epoch")
    paths = list_slices(cfg.data, train_p | val_p)
    if cfg.pretext == 'context':
        # A slice at the end of what was shipped has a neighbour that falls back to itself: the target in the input.
        whole = [p for p in paths if context_paths(p, cfg.context).count(Path(p)) == 1]
        print(f"context pretext: {len(whole)} of {len(paths)} slices have all {2 * cfg.context} neighbours of their own "
              f"(the rest, at the ends of what was shipped, would show the model its target)")
        paths = whole
    n_train = sum(patient_of(Path(p).parent.name) in train_p for p in paths)
    _check_batches(n_train, cfg.bs, f"{cfg.data}", '')
    print(f"pretraining on {n_train} slices of {len(train_p)} patients ({len(paths) - n_train} validation slices), "
          f"{size} px, windows {cfg.windows}, context {cfg.context}")
    cache = prepare_slices(cfg.cache, paths, cfg.windows, cfg.context, size, cfg.cache_dir, workers=max(1, cfg.num_workers))
    if cfg.dedup > 0:                  # redundant neighbour slices slow pretraining and can hurt it; validation stays whole
        in_val = lambda p: patient_of(Path(p).parent.name) in val_p
        paths, dropped = drop_near_duplicates(paths, cache, CTSlice(cfg.windows, cfg.context, size), cfg.dedup, keep=in_val)
        n_train -= dropped
        print(f"--dedup {cfg.dedup:g}: dropped {dropped} training slice(s) closer than that to the slice kept before them "
              f"(mean absolute difference of the windowed pixels); {n_train} remain")
        _check_batches(n_train, cfg.bs, f"{cfg.data} after --dedup {cfg.dedup:g}", ' or a smaller --dedup')
    with _output_folder(out):
        set_seed(cfg.seed, reproducible=True)
        dls = autoencoder_dls(paths, val_p, cfg.windows, cfg.context, size, cfg.bs, cfg.num_workers, cfg.seed, cache=cache,
                              **_loader_kwargs())
        n_in = n_channels(cfg.windows, cfg.context)
        model = create_autoencoder(n_in, code_channels=tuple(cfg.code_channels), backbone=cfg.backbone, backbone_weights=cfg.backbone_weights)
        masked_loss = cfg.pretext == 'mae'
        loss = MaskedLoss(cfg.loss) if masked_loss else {'l1': nn.L1Loss(), 'mse': nn.MSELoss()}[cfg.loss]
        keys = key_channels(n_in, cfg.context) if cfg.pretext == 'context' else None
        if keys: loss = ChannelLoss(loss, keys)
        corruption = dict(mask_ratio=mask_ratio, patch=patch, noise_std=noise_std)
        learn = Learner(dls, model, loss_func=loss, path=out, model_dir='models',
                        cbs=[MaskedCorruption(**corruption, channels=keys, masked_loss=masked_loss)])
        if distributed.is_main():
            with distributed.alone(): untrained = float(learn.validate()[0])
        _seed_rank(cfg.seed)
        precision = _speed_up(learn, cfg.precision)
        _fit_resumable(learn, out, cfg.epochs, cfg.lr, 'valid_loss', cfg.resume)
        if not distributed.is_main(): return {}
        learn.to_contiguous(to_fp32=True)             # the checkpoint and every figure and loss below: float32
        with distributed.alone(): trained = float(learn.validate()[0])
        config = {**asdict(cfg), **corruption, 'size': size, 'data': str(cfg.data), 'out': str(out), 'in_chans': n_in, 'precision': precision,
                  'train_slices': n_train,
                  'code_channels': list(cfg.code_channels)}
        ckpt = save_pretrained(out / 'pretrained.pth', model, config, valid_loss=trained)
        _reconstruction_figure(learn, corruption, out / 'reconstructions.png', keys)
        copy = _copy_baseline(learn, corruption, keys, masked_loss)
        metrics = {'valid_loss_untrained': untrained, 'valid_loss': trained, 'valid_loss_copy_input': copy,
                   'train_slices': n_train, 'config': config, 'time_s': round(time.time() - t0, 1)}
        if keys: metrics['valid_loss_neighbour_mean'] = _neighbour_baseline(learn, keys)
        write_json(metrics, out / 'pretrain_metrics.json')
    print(f"valid loss {trained:.4f} (untrained {untrained:.4f}, copying the corrupted input {copy:.4f}); wrote {ckpt}")
    return metrics


@torch.no_grad()
def _copy_baseline(learn, corruption: dict, channels=None, masked_loss=False) -> float:
    "The loss of returning the corrupted input unchanged: a model must beat it to have learned anything."
    g, losses = None, []
    for (x,) in learn.dls.valid:
        g = g or torch.Generator(device=x.device).manual_seed(0)
        xc, mask = corrupt(x, **corruption, generator=g, channels=channels)
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
def _reconstruction_figure(learn, corruption: dict, path, channels=None, n=4):
    (x,) = learn.dls.valid.one_batch()
    x = x[:n]
    xc, _ = corrupt(x, **corruption, generator=torch.Generator(device=x.device).manual_seed(0), channels=channels)
    learn.model.eval()
    y = learn.model(xc)
    return plot_reconstructions(x[:, 0].cpu().numpy(), xc[:, 0].cpu().numpy(), y[:, 0].cpu().numpy(), path)


# --- fine-tuning ---------------------------------------------------------------------------------------------

@dataclass
class FinetuneConfig:
    data: Path
    out: Path
    head: str = 'direct'
    target: str = 'points'
    size: int | None = None           # default: half the native size, or the checkpoint's
    windows: str | None = None        # default: 'soft', or the checkpoint's
    context: int | None = None        # default: 0, or the checkpoint's
    epochs: int = 20
    lr: float = 3e-3
    lr_find: bool = False
    bs: int = 16
    loss: str = 'ciou+diou+giou'
    map_weight: float = 1.            # weight of the centre heatmap's focal loss
    map_radius: int = 1               # box sizes within this many cells of each lesion's centre cell are trained too
    stride: int = 4                   # heatmap stride (4 or 8)
    keep: int = KEEP                  # boxes kept per slice (heatmap peaks, best first)
    nms_iou: float | None = NMS_IOU   # non-maximum suppression of the kept boxes at this IoU (None: peaks only)
    wd: float = .01                   # weight decay (fastai's Adam default)
    adapter_ratio: float = 1.         # sandwich: hidden width of each transfer layer, as a fraction of its stage's
    adapter_stem: bool = False        # sandwich: a transfer layer after the stem too
    sandwich: str = 'encoder'         # sandwich: transfer layers between the frozen 'encoder' stages or 'decoder' blocks (3FabRec)
    label_fraction: float = 1.
    same_epoch_length: bool = False   # repeat a label subset to the full training set's length per epoch
    seed: int = 0
    pretrained: Path | None = None
    freeze: str | None = None         # default: 'sandwich' with --pretrained, else 'scratch'
    backbone: str | None = None       # 'resnet' or a timm model name (default: resnet, or the checkpoint's)
    backbone_weights: Path | None = None  # a timm model's local state dict: ImageNet transfer, --freeze none by default
    update_frozen_bn: bool = False
    kappa: float = .05
    nll_weight: float = .1            # gaussian head: weight of the likelihood term that calibrates its std
    out_bn: bool = False
    augment: bool = True
    resume: bool = False
    num_workers: int = 0
    cache: str = 'memory'             # 'memory' (per run), 'disk' (memory-mapped, shared by runs) or 'none'
    cache_dir: Path | None = None     # for 'disk': default ~/.cache/lesion_fastai
    precision: str = 'auto'           # PRECISIONS
    n_figure: int = 8
    quiet: bool = False
    time_budget_s: float | None = None  # stop training after this many seconds


def _resolve(cfg: FinetuneConfig, records) -> tuple[dict, dict | None]:
    "Settings of this run: from the checkpoint when there is one (a disagreeing flag is an error)."
    ckpt = load_pretrained(cfg.pretrained) if cfg.pretrained else None
    weights = cfg.backbone_weights
    if ckpt is not None and weights: raise ValueError("--pretrained and --backbone-weights both set the encoder's weights: give one")
    freeze = cfg.freeze or ('sandwich' if ckpt else 'none' if weights else 'scratch')
    if ckpt is None and not weights and freeze != 'scratch':
        raise ValueError(f"--freeze {freeze} needs --pretrained CHECKPOINT or --backbone-weights (without one the model trains from scratch)")
    if freeze == 'scratch' and (ckpt is not None or weights):
        raise ValueError(f"--freeze scratch ignores {'--pretrained' if ckpt else '--backbone-weights'}: drop one of them")
    pretrained_body = ckpt['model_args']['encoder_args'].get('backbone', 'resnet') if ckpt else None
    if ckpt is not None and cfg.backbone not in (None, pretrained_body):
        raise ValueError(f"--backbone {cfg.backbone} disagrees with the checkpoint {cfg.pretrained}, pretrained with backbone {pretrained_body}")
    if cfg.sandwich not in SANDWICHES: raise ValueError(f"--sandwich {cfg.sandwich!r}: expected one of {', '.join(SANDWICHES)}")
    if cfg.sandwich == 'decoder' and freeze != 'sandwich':
        raise ValueError(f"--sandwich decoder interleaves transfer layers in the frozen decoder: it needs --freeze sandwich, not {freeze}")
    if cfg.sandwich == 'decoder' and ckpt is None:
        raise ValueError("--sandwich decoder reads the pretrained autoencoder's decoder: it needs --pretrained CHECKPOINT")
    defaults = {'windows': 'soft', 'context': 0, 'size': _native_size(records) // 2}
    settings = {}
    for k in ('windows', 'context', 'size'):
        flag = getattr(cfg, k)
        if ckpt is not None:
            have = ckpt['config'][k]
            if flag is not None and flag != have:
                raise ValueError(f"--{k} {flag} disagrees with the checkpoint {cfg.pretrained}, pretrained with {k} {have}")
            settings[k] = have
        else: settings[k] = flag if flag is not None else defaults[k]
    settings['freeze'] = freeze
    settings['backbone'] = pretrained_body or cfg.backbone or 'resnet'
    return settings, ckpt


def finetune(cfg: FinetuneConfig, cbs=()) -> dict:
    """Train the detector (from scratch or from a pretrained encoder in a freeze mode) with
    `fit_one_cycle` on every lesion of the training slices, keep the best epoch by validation FROC
    (mean sensitivity over 0.5-4 FPs per slice), evaluate on validation and test beside the mean-box
    baseline (`evaluation.report`), and write `metrics.json`, `predictions.csv`, `froc.png`,
    `results.png`, `history.csv` and the exported learner `export.pkl`.

    Everything that can be checked is checked before the output folder is made: the folder, the data,
    the checkpoint, the batch size, and every slice the run needs (decoded once, `cache.prepare_slices`).
    Training, validation and test follow DeepLesion's protocol (`deeplesion.evaluation_records`):
    Possibly_noisy lesions are no targets, and slices left without a lesion are left out. `cbs`: more
    fastai callbacks for the fit (a hyperparameter search's pruning callback, say)."""
    t0 = time.time()
    out = check_out_folder(cfg.out)
    _check_precision(cfg.precision)
    distributed.setup()
    loss_func = DetectionLoss(cfg.loss, cfg.map_weight, cfg.map_radius, cfg.nll_weight, cfg.target, cfg.keep, cfg.nms_iou)
    df, records = load_data(cfg.data)
    s, ckpt = _resolve(cfg, records)
    train_all = evaluation_records(records, 'train')
    train = select_patients(train_all, cfg.label_fraction, cfg.seed)
    valid, test = evaluation_records(records, 'val'), evaluation_records(records, 'test')
    if not train or not valid:
        raise ValueError(f"{cfg.data}: needs train (Train_Val_Test 1) and validation (2) slices, with lesions not all Possibly_noisy")
    epoch_items = train
    if cfg.same_epoch_length and len(train) < len(train_all):  # same steps per epoch for every label fraction
        epoch_items = (train * -(-len(train_all) // len(train)))[:len(train_all)]
    _check_batches(len(epoch_items), cfg.bs, f"--label-fraction {cfg.label_fraction:g} leaves {len({r.patient for r in train})} patient(s)",
                   ' or a larger --label-fraction')
    in_chans = n_channels(s['windows'], s['context'])
    enc_args = dict(ckpt['model_args']['encoder_args']) if ckpt else {'in_chans': in_chans, 'backbone': s['backbone']}
    if enc_args['in_chans'] != in_chans:
        raise ValueError(f"{cfg.pretrained}: encoder has {enc_args['in_chans']} input channels, the data gives {in_chans}")
    # every slice this run reads: the disk cache is shared by all label fractions, the memory cache holds this run's
    needed = records if cfg.cache == 'disk' else epoch_items + valid + test
    cache = prepare_slices(cfg.cache, needed, s['windows'], s['context'], s['size'], cfg.cache_dir, cfg.quiet, max(1, cfg.num_workers))
    with _output_folder(out):
        set_seed(cfg.seed, reproducible=True)
        dls = localization_dls(epoch_items + valid, s['windows'], s['context'], s['size'], cfg.target, cfg.bs, cfg.augment,
                               cfg.num_workers, cfg.seed, cache=cache, **_loader_kwargs())
        model = Localizer(enc_args, head=cfg.head, sandwich=s['freeze'] == 'sandwich' and cfg.sandwich, out_bn=cfg.out_bn, kappa=cfg.kappa,
                          adapter_ratio=cfg.adapter_ratio, adapter_stem=cfg.adapter_stem, stride=cfg.stride,
                          decoder_args=decoder_args(ckpt) if ckpt else None, backbone_weights=cfg.backbone_weights)
        if ckpt is not None: load_encoder(model.encoder, ckpt, str(cfg.pretrained))
        if model.decoder is not None: load_decoder(model.decoder, ckpt, str(cfg.pretrained))
        learn = Learner(dls, model, loss_func=loss_func, metrics=[ValidFROC(cfg.keep, cfg.nms_iou)], train_bn=False, wd=cfg.wd, path=out,
                        model_dir='models', splitter=localizer_splitter)
        apply_freeze(learn, s['freeze'])
        counts = parameter_counts(model)
        print(f"freeze {s['freeze']}: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen parameters; "
              f"{len(train)} training slices of {len({r.patient for r in train})} patients, {len(valid)} validation, {len(test)} test")
        lr = cfg.lr
        if cfg.lr_find:    # in one process (it saves and reloads the model in the output folder); the other ranks take its rate
            if distributed.is_main():
                with distributed.alone(): lr = float(learn.lr_find(show_plot=False).valley)
            lr = distributed.gather(lr)[0]
            print(f"lr_find: {lr:.2e}")
        cbs = freeze_callbacks(s['freeze'], cfg.update_frozen_bn) + ([TimeBudget(cfg.time_budget_s)] if cfg.time_budget_s else []) + list(cbs)
        _seed_rank(cfg.seed)
        precision = _speed_up(learn, cfg.precision)
        _fit_resumable(learn, out, cfg.epochs, lr_for(s['freeze'], lr), 'froc', cfg.resume, cfg.quiet, cbs)
        if not distributed.is_main(): return {}     # rank 0 evaluates the model in one process, as a single-process run would
        learn.to_contiguous(to_fp32=True)             # evaluation and the export in float32, as a CPU evaluation of it
        baseline = mean_box(train)
        results = report(learn, {'valid': valid, 'test': test}, baseline, out, n_figure=cfg.n_figure)
        config = {**asdict(cfg), **s, 'lr': lr, 'precision': precision, 'data': str(cfg.data), 'out': str(out),
                  'pretrained': str(cfg.pretrained) if cfg.pretrained else None}
        # the export carries what evaluating it later needs: the baseline of the labels it was trained with
        learn.train_info = {'mean_box': baseline.tolist(), 'train_slices': len(train), 'label_fraction': cfg.label_fraction,
                            'seed': cfg.seed, 'data': str(cfg.data)}
        learn.metrics = []                            # the validation FROC keeps records; an export carries none
        with atomic_path(out / 'export.pkl') as tmp: learn.export(tmp.name)
        metrics = {**results, 'mean_box': baseline.tolist(), 'parameters': counts, 'train_slices': len(train),
                   'slices_per_epoch': len(dls.train_ds),
                   'train_patients': len({r.patient for r in train}), 'config': config, 'time_s': round(time.time() - t0, 1)}
        write_json(metrics, out / 'metrics.json')
    if 'test' in results: print(f"test: {summary_line(results['test'])}; wrote {out}")
    return metrics
