"""The two training runs and the evaluation, as functions of a config, shared by `python -m pretrain`,
`python -m finetune`, the demo and the benchmarks (the entry points only parse arguments).

Each run writes into its `out` folder: `history.csv` (one row per epoch), `models/best.pth` (best
epoch, atomically), `last.pth` (resume state after every epoch), figures and a JSON of results.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from fastai.learner import Learner, load_learner
from fastai.torch_core import set_seed
from torch import nn

from .boxes import one_std_boxes, to_pixels
from .callbacks import (AtomicSaveModelCallback, CentreMapLoss, MaskedCorruption, ResumableCSVLogger, ResumeState,
                        StopOnNonFinite, TimeBudget, corrupt)
from .cache import prepare_slices
from .checkpoint import load_encoder, load_pretrained, save_pretrained
from .data import autoencoder_dls, localization_dls, n_channels, select_patients, slice_transform
from .deeplesion import evaluation_records, list_slices, load_data
from .files import atomic_path, atomic_write_text, check_out_folder, output_folder
from .freeze import apply_freeze, freeze_callbacks, localizer_splitter, lr_for, parameter_counts
from .losses import BoxLoss
from .metrics import evaluate, match_lesion, mean_box, mean_iou
from .models.autoencoder import create_autoencoder
from .models.legacy import LegacyLocalizer
from .models.localizer import Localizer
from .plots import plot_reconstructions, plot_results

__all__ = ['PretrainConfig', 'FinetuneConfig', 'pretrain', 'finetune', 'evaluate_export', 'load_data', 'predict_boxes',
           'write_json']


def write_json(obj, path: Path) -> Path:
    "Atomic JSON write (temp file + rename)."
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def _check_batches(n_items: int, bs: int, what: str, hint: str) -> None:
    "Training drops the last incomplete batch: fewer items than --bs would train on nothing."
    if n_items < bs:
        raise ValueError(f"{what}: {n_items} training slice(s), fewer than --bs {bs}, so an epoch would have no batch "
                         f"and nothing would train; use --bs {max(1, n_items)} or less{hint}")


def _native_size(records) -> int:
    return int(np.median([r.width for r in records]))


def _fit_resumable(learn, out: Path, epochs: int, lr, monitor: str, resume: bool, quiet: bool = False, cbs=()) -> None:
    """`fit_one_cycle` with the best epoch kept by `monitor` (models/best.pth), history.csv, and the
    resume state last.pth after every epoch; with `resume`, continue from last.pth where it stopped."""
    best = AtomicSaveModelCallback(monitor=monitor, fname='best')
    csv = ResumableCSVLogger('history.csv')  # relative to learn.path (= out)
    state = ResumeState(out / 'last.pth', best, csv)
    start = state.restore(learn) if resume and state.file.exists() else 0
    if resume and start: print(f"resuming from {state.file} at epoch {start}")
    if start >= epochs:  # finished before: the best epoch is the result, as after an uninterrupted fit
        if (out / 'models' / 'best.pth').exists(): learn.load('best')
        return
    finite = StopOnNonFinite()
    fit = lambda: learn.fit_one_cycle(epochs, lr, start_epoch=start, cbs=[best, state, csv, finite, *cbs])
    if not quiet: fit()
    else:
        with learn.no_bar(), learn.no_logging(): fit()
    if finite.problem: raise FloatingPointError(finite.problem)


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
    mask_ratio: float = .5
    patch: int | None = None          # default: size // 16
    noise_std: float = .05
    loss: str = 'l1'
    resume: bool = False
    num_workers: int = 0
    cache: str = 'memory'             # 'memory' (per run), 'disk' (memory-mapped, shared by runs) or 'none'
    cache_dir: Path | None = None     # for 'disk': default ~/.cache/lesion_fastai


def pretrain(cfg: PretrainConfig) -> dict:
    """Train the autoencoder on every slice of the chosen patients (labels unused), reconstructing clean
    slices from masked, noisy ones. Writes `pretrained.pth` (encoder + decoder + construction
    arguments + config), `reconstructions.png`, `history.csv`, `pretrain_metrics.json`."""
    t0 = time.time()
    out = check_out_folder(cfg.out)
    if cfg.patients not in ('train', 'all'): raise ValueError(f"patients {cfg.patients!r}: expected 'train' or 'all'")
    df, records = load_data(cfg.data)
    size = cfg.size or _native_size(records) // 2
    patch = cfg.patch or max(2, size // 16)
    # 'all' adds the test patients' slices (labels unused); validation patients stay held out for the loss
    train_p = set(df.patient[df.split == 'train']) if cfg.patients == 'train' else set(df.patient[df.split != 'val'])
    val_p = set(df.patient[df.split == 'val'])
    if not val_p: raise ValueError(f"{cfg.data}: no validation patients (Train_Val_Test = 2), which pretraining needs to "
                                   f"measure its reconstruction loss and keep the best epoch")
    paths = list_slices(cfg.data, train_p | val_p)
    n_train = sum(int(Path(p).parent.name.split('_')[0]) in train_p for p in paths)
    _check_batches(n_train, cfg.bs, f"{cfg.data}", '')
    print(f"pretraining on {n_train} slices of {len(train_p)} patients ({len(paths) - n_train} validation slices), "
          f"{size} px, windows {cfg.windows}, context {cfg.context}")
    cache = prepare_slices(cfg.cache, paths, cfg.windows, cfg.context, size, cfg.cache_dir)
    with output_folder(out):
        set_seed(cfg.seed, reproducible=True)
        dls = autoencoder_dls(paths, val_p, cfg.windows, cfg.context, size, cfg.bs, cfg.num_workers, cfg.seed, cache=cache)
        model = create_autoencoder(n_channels(cfg.windows, cfg.context))
        loss = {'l1': nn.L1Loss(), 'mse': nn.MSELoss()}[cfg.loss]
        learn = Learner(dls, model, loss_func=loss, path=out, model_dir='models',
                        cbs=[MaskedCorruption(cfg.mask_ratio, patch, cfg.noise_std)])
        untrained = float(learn.validate()[0])
        _fit_resumable(learn, out, cfg.epochs, cfg.lr, 'valid_loss', cfg.resume)
        trained = float(learn.validate()[0])
        config = {**asdict(cfg), 'size': size, 'patch': patch, 'data': str(cfg.data), 'out': str(out),
                  'in_chans': n_channels(cfg.windows, cfg.context)}
        ckpt = save_pretrained(out / 'pretrained.pth', model, config, valid_loss=trained)
        _reconstruction_figure(learn, cfg, patch, out / 'reconstructions.png')
        copy = _copy_baseline(learn, cfg, patch)
        metrics = {'valid_loss_untrained': untrained, 'valid_loss': trained, 'valid_loss_copy_input': copy,
                   'train_slices': n_train, 'config': config, 'time_s': round(time.time() - t0, 1)}
        write_json(metrics, out / 'pretrain_metrics.json')
    print(f"valid loss {trained:.4f} (untrained {untrained:.4f}, copying the corrupted input {copy:.4f}); wrote {ckpt}")
    return metrics


@torch.no_grad()
def _copy_baseline(learn, cfg, patch) -> float:
    "The loss of returning the corrupted input unchanged: a model must beat it to have learned anything."
    g = torch.Generator().manual_seed(0)
    losses = [float(learn.loss_func(corrupt(x, cfg.mask_ratio, patch, cfg.noise_std, g)[0], x)) for (x,) in learn.dls.valid]
    return float(np.mean(losses))


@torch.no_grad()
def _reconstruction_figure(learn, cfg, patch, path, n=4):
    (x,) = learn.dls.valid.one_batch()
    x = x[:n]
    xc, _ = corrupt(x, cfg.mask_ratio, patch, cfg.noise_std, torch.Generator(device=x.device).manual_seed(0))
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
    map_weight: float = 1.            # weight of the centre-map loss (0: box loss alone)
    map_radius: int = 1               # boxes within this many cells of the target's centre cell are supervised
    wd: float = .01                   # weight decay (fastai's Adam default)
    adapter_ratio: float = 1.         # sandwich: hidden width of each transfer layer, as a fraction of its stage's
    adapter_stem: bool = False        # sandwich: a transfer layer after the stem too
    label_fraction: float = 1.
    same_epoch_length: bool = False   # repeat a label subset to the full training set's length per epoch
    seed: int = 0
    pretrained: Path | None = None
    freeze: str | None = None         # default: 'sandwich' with --pretrained, else 'scratch'
    update_frozen_bn: bool = False
    kappa: float = .05
    nll_weight: float = .1            # gaussian head: weight of the likelihood term that calibrates its std
    out_bn: bool = False
    augment: bool = True
    resume: bool = False
    num_workers: int = 0
    cache: str = 'memory'             # 'memory' (per run), 'disk' (memory-mapped, shared by runs) or 'none'
    cache_dir: Path | None = None     # for 'disk': default ~/.cache/lesion_fastai
    n_figure: int = 8
    quiet: bool = False
    arch: str = 'localizer'           # or 'legacy': the earlier experiment's model, for benchmarks (from scratch only)
    time_budget_s: float | None = None  # stop training after this many seconds


def _resolve(cfg: FinetuneConfig, records) -> tuple[dict, dict | None]:
    "Settings of this run: from the checkpoint when there is one (a disagreeing flag is an error)."
    ckpt = load_pretrained(cfg.pretrained) if cfg.pretrained else None
    freeze = cfg.freeze or ('sandwich' if ckpt else 'scratch')
    if ckpt is None and freeze != 'scratch':
        raise ValueError(f"--freeze {freeze} needs --pretrained CHECKPOINT (without one the model trains from scratch)")
    if ckpt is not None and freeze == 'scratch':
        raise ValueError("--freeze scratch ignores --pretrained: drop one of them")
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
    return settings, ckpt


def finetune(cfg: FinetuneConfig) -> dict:
    """Train the localizer (from scratch or from a pretrained encoder in a freeze mode) with
    `fit_one_cycle`, keep the best epoch by validation IoU, evaluate on validation and test patients
    beside the mean-box baseline, and write `metrics.json`, `results.png`, `history.csv` and the
    exported learner `export.pkl`.

    Everything that can be checked is checked before the output folder is made: the folder, the data,
    the checkpoint, the batch size, and every slice the run needs (decoded once, `cache.prepare_slices`).
    Validation and test follow DeepLesion's protocol (`deeplesion.evaluation_records`)."""
    t0 = time.time()
    out = check_out_folder(cfg.out)
    loss_func = BoxLoss(cfg.loss)
    df, records = load_data(cfg.data)
    s, ckpt = _resolve(cfg, records)
    train_all = [r for r in records if r.split == 'train']
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
    enc_args = dict(ckpt['model_args']['encoder_args']) if ckpt else {'in_chans': in_chans}
    if enc_args['in_chans'] != in_chans:
        raise ValueError(f"{cfg.pretrained}: encoder has {enc_args['in_chans']} input channels, the data gives {in_chans}")
    if cfg.arch not in ('localizer', 'legacy'): raise ValueError(f"arch {cfg.arch!r}: expected 'localizer' or 'legacy'")
    if cfg.arch == 'legacy' and ckpt is not None: raise ValueError("the legacy localizer trains from scratch only")
    # every slice this run reads: the disk cache is shared by all label fractions, the memory cache holds this run's
    needed = records if cfg.cache == 'disk' else epoch_items + valid + test
    cache = prepare_slices(cfg.cache, needed, s['windows'], s['context'], s['size'], cfg.cache_dir, cfg.quiet)
    with output_folder(out):
        set_seed(cfg.seed, reproducible=True)
        dls = localization_dls(epoch_items + valid, s['windows'], s['context'], s['size'], cfg.target, cfg.bs, cfg.augment,
                               cfg.num_workers, cfg.seed, cache=cache)
        if cfg.arch == 'legacy': model, splitter = LegacyLocalizer(in_chans, s['size']), None
        else:
            model = Localizer(enc_args, head=cfg.head, sandwich=s['freeze'] == 'sandwich', out_bn=cfg.out_bn, kappa=cfg.kappa,
                              adapter_ratio=cfg.adapter_ratio, adapter_stem=cfg.adapter_stem)
            splitter = localizer_splitter
            if ckpt is not None: load_encoder(model.encoder, ckpt, str(cfg.pretrained))
        learn = Learner(dls, model, loss_func=loss_func, metrics=[mean_iou], train_bn=False, wd=cfg.wd, path=out,
                        model_dir='models', cbs=[CentreMapLoss(cfg.map_weight, cfg.map_radius, cfg.nll_weight)],
                        **({'splitter': splitter} if splitter else {}))
        apply_freeze(learn, s['freeze'])
        counts = parameter_counts(model)
        print(f"freeze {s['freeze']}: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen parameters; "
              f"{len(train)} training slices of {len({r.patient for r in train})} patients, {len(valid)} validation, {len(test)} test")
        lr = cfg.lr
        if cfg.lr_find:
            lr = float(learn.lr_find(show_plot=False).valley)
            print(f"lr_find: {lr:.2e}")
        cbs = freeze_callbacks(s['freeze'], cfg.update_frozen_bn) + ([TimeBudget(cfg.time_budget_s)] if cfg.time_budget_s else [])
        _fit_resumable(learn, out, cfg.epochs, lr_for(s['freeze'], lr), 'mean_iou', cfg.resume, cfg.quiet, cbs)
        baseline = mean_box(train)
        results = {}
        for name, recs in (('valid', valid), ('test', test)):
            if not recs: continue
            boxes, std, images = predict_boxes(learn, recs)
            results[name] = evaluate(boxes, recs, baseline, std)
            if name == 'test': _results_figure(recs, boxes, std, images, out / 'results.png', cfg.n_figure)
        config = {**asdict(cfg), **s, 'lr': lr, 'data': str(cfg.data), 'out': str(out),
                  'pretrained': str(cfg.pretrained) if cfg.pretrained else None}
        # the export carries what evaluating it later needs: the baseline of the labels it was trained with
        learn.train_info = {'mean_box': baseline.tolist(), 'train_slices': len(train), 'label_fraction': cfg.label_fraction,
                            'seed': cfg.seed, 'data': str(cfg.data)}
        with atomic_path(out / 'export.pkl') as tmp: learn.export(tmp.name)
        metrics = {**results, 'mean_box': baseline.tolist(), 'parameters': counts, 'train_slices': len(train),
                   'slices_per_epoch': len(dls.train_ds),
                   'train_patients': len({r.patient for r in train}), 'config': config, 'time_s': round(time.time() - t0, 1)}
        write_json(metrics, out / 'metrics.json')
    if 'test' in results:
        t, b = results['test'], results['test']['mean_box_baseline']
        print(f"test: hit@0.5 {t['hit@0.5']:.3f} (mean box {b['hit@0.5']:.3f}), mean IoU {t['mean_iou']:.3f} "
              f"({b['mean_iou']:.3f}), centre error {t['centre_error_mm']:.1f} mm ({b['centre_error_mm']:.1f}); wrote {out}")
    return metrics


@torch.no_grad()
def predict_boxes(learn, records, bs: int | None = None):
    """Predicted boxes [N, 4] (x1,y1,x2,y2 in [0, 1]) for `records`, the Gaussian head's std in the same
    units (else None), and the first batch's key-slice images [n, H, W] for figures."""
    dl = learn.dls.test_dl(records, with_labels=False, bs=bs or learn.dls.bs)
    model = learn.model.eval()
    boxes, stds, images = [], [], None
    for b in dl:
        x = b[0]
        boxes.append(((model(x) + 1) / 2).float().cpu())
        std = getattr(model.head, 'last_std', None)
        if std is not None: stds.append(std.float().cpu())
        if images is None: images = x[:, 0].float().cpu().numpy()
    return torch.cat(boxes).numpy(), (torch.cat(stds).numpy() if stds else None), images


def _results_figure(records, boxes, std, images, path, n):
    """Test slices with ground truth and the predicted box; for the Gaussian head the one-std box range
    (centre +- std, sides x exp(+-std)) as dashed boxes."""
    n = min(n, len(images))
    H, W = images.shape[-2:]
    scale = np.array([W, H, W, H])
    ious = [match_lesion(to_pixels(b, r.width, r.height), r)[1] for b, r in zip(boxes[:n], records[:n])]
    margins = None if std is None else [one_std_boxes(b, sd) * scale for b, sd in zip(boxes[:n], std[:n])]
    return plot_results(images[:n], records[:n], boxes[:n] * scale, path, pred_margins=margins, ious=ious)


def evaluate_export(model_path: Path | str, data: Path | str, out: Path | str | None = None) -> dict:
    """Evaluate an exported learner (`export.pkl`) on the test patients of `data` (DeepLesion's protocol),
    beside the mean-box baseline it was trained with (stored in the export); writes `eval_metrics.json`
    and `eval_results.png`. Checks the output folder and every test slice before evaluating."""
    model_path = Path(model_path)
    if not model_path.is_file(): raise FileNotFoundError(f"--eval {model_path}: no such exported model")
    out = check_out_folder(Path(out) if out else model_path.parent)
    _, records = load_data(data)
    test = evaluation_records(records, 'test')
    if not test: raise ValueError(f"{data}: no test slices (Train_Val_Test = 3) with a lesion not Possibly_noisy")
    try: learn = load_learner(model_path, cpu=not torch.cuda.is_available())
    except Exception as e: raise ValueError(f"--eval {model_path}: not a learner exported by finetune ({type(e).__name__}: {e})") from None
    if not isinstance(learn, Learner): raise ValueError(f"--eval {model_path}: not a learner exported by finetune")
    ct = slice_transform(learn.dls)                   # the preprocessing the model was trained with
    prepare_slices('none', test, ct.windows, ct.context, ct.size)
    info = getattr(learn, 'train_info', None)
    baseline, source = (np.asarray(info['mean_box']), 'stored with the model') if info else \
        (mean_box([r for r in records if r.split == 'train']), 'training split of --data (the export stores none)')
    boxes, std, images = predict_boxes(learn, test)
    metrics = {'test': evaluate(boxes, test, baseline, std), 'model': str(model_path), 'mean_box_source': source}
    with output_folder(out):
        _results_figure(test, boxes, std, images, out / 'eval_results.png', 8)
        write_json(metrics, out / 'eval_metrics.json')
    return metrics
