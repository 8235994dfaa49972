"""Fine-tuning: the detector trained on every lesion of the labelled slices, from scratch or from a
pretrained encoder in a freeze mode (`freeze.py`), the best epoch kept by the validation FROC, then
scored on validation and test (`evaluation.report`). Used by `python -m finetune`, the demo, the
search and the benchmarks.

The run writes into its `out` folder: `metrics.json`, `predictions.csv`, `predictions_valid.csv`,
`froc.png`, `results.png`, `history.csv` (one row per epoch), `models/best.pth`, `last.pth` (resume
state) and the exported learner `export.pkl`.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from fastai.learner import Learner
from fastai.torch_core import set_seed

from . import distributed
from .cache import prepare_slices, readable
from .callbacks import TimeBudget
from .checkpoint import decoder_args, load_decoder, load_encoder, load_pretrained
from .config import DECODER_SETTINGS, FinetuneConfig, RunConfig, recorded, resolve_context, unused_settings
from .data import SliceSpec, detection_dls, select_patients
from .deeplesion import evaluation_records, load_data
from .evaluation import report
from .export import at_operating_point, save_export, save_safe
from .files import check_out_folder, write_json
from .fit import (back_to_fp32, check_batches, check_precision, check_resume, fit_resumable, loader_kwargs, native_size, run_folder,
                  save_run_settings, seed_rank, speed_up)
from .freeze import apply_freeze, detector_splitter, freeze_callbacks, lr_for, parameter_counts
from .heatmap import Decoding
from .log import log
from .losses import DetectionLoss
from .metrics import ValidFROC, mean_box, summary_line
from .models.detector import Detector
from .report import run_report

__all__ = ['resolve', 'finetune']


def resolve(cfg: FinetuneConfig, records, ckpt: dict | None) -> FinetuneConfig:
    """`cfg` with every setting a run decides filled in (`dataclasses.replace`): windows, context, size
    and backbone from the checkpoint `ckpt` when there is one (a flag that disagrees is an error), else
    the flags or their defaults (context from the data, size half the native slice); the freeze mode
    from what the encoder starts from. Settings that cannot go together are errors here, before
    anything is written. `asdict` of the result is what the run records."""
    weights = cfg.backbone_weights
    if ckpt is not None and weights: raise ValueError("--pretrained and --backbone-weights both set the encoder's weights: give one")
    freeze = cfg.freeze or ('sandwich' if ckpt else 'full' if weights else 'scratch')
    if ckpt is None and not weights and freeze != 'scratch':
        raise ValueError(f"--freeze {freeze} needs --pretrained CHECKPOINT or --backbone-weights (without one the model trains from scratch)")
    if freeze == 'scratch' and (ckpt is not None or weights):
        raise ValueError(f"--freeze scratch ignores {'--pretrained' if ckpt else '--backbone-weights'}: drop one of them")
    pretrained_body = ckpt['model_args']['encoder_args'].get('backbone', 'resnet') if ckpt else None
    if ckpt is not None and cfg.backbone not in (None, pretrained_body):
        raise ValueError(f"--backbone {cfg.backbone} disagrees with the checkpoint {cfg.pretrained}, pretrained with backbone {pretrained_body}")
    if cfg.sandwich == 'decoder' and freeze != 'sandwich':
        raise ValueError(f"--sandwich decoder interleaves transfer layers in the frozen decoder: it needs --freeze sandwich, not {freeze}")
    if cfg.unfreeze_after and freeze not in ('sandwich', 'encoder'):
        raise ValueError(f"--unfreeze-after unfreezes what --freeze sandwich or encoder froze: with --freeze {freeze} nothing is frozen")
    if cfg.unfrozen_lr_div != 1 and not cfg.unfreeze_after:
        raise ValueError(f"--unfrozen-lr-div {cfg.unfrozen_lr_div:g} is the rate once --unfreeze-after K unfreezes: without it nothing unfreezes")
    if cfg.unfreeze_after >= cfg.epochs:
        raise ValueError(f"--unfreeze-after {cfg.unfreeze_after} leaves no epoch of --epochs {cfg.epochs} to train unfrozen")
    if cfg.transfer_stages is not None and (ckpt is None or freeze != 'full'):
        raise ValueError(f"--transfer-stages loads the first stages of --pretrained and starts the rest fresh: it needs --pretrained "
                         f"CHECKPOINT and --freeze full{'' if ckpt is None else f', not {freeze} (a frozen fresh stage would never learn)'}")
    if cfg.pretrained_init != 'weights' and ckpt is None:
        what = "the scale of --pretrained's weights" if cfg.pretrained_init == 'scale' else "--pretrained's architecture"
        raise ValueError(f"--pretrained-init {cfg.pretrained_init} takes {what}: it needs --pretrained CHECKPOINT")
    if cfg.sandwich == 'decoder' and ckpt is None:
        raise ValueError("--sandwich decoder reads the pretrained autoencoder's decoder: it needs --pretrained CHECKPOINT")
    defaults = {'windows': lambda: RunConfig.windows, 'context': lambda: resolve_context(None, records, cfg.data),
                'size': lambda: native_size(records) // 2}
    filled = {}
    for k, default in defaults.items():
        flag = getattr(cfg, k)
        if ckpt is not None:
            have = ckpt['config'][k]
            if flag is not None and flag != have:
                raise ValueError(f"--{k} {flag} disagrees with the checkpoint {cfg.pretrained}, pretrained with {k} {have}")
            filled[k] = have
        else: filled[k] = flag if flag is not None else default()
    return dataclasses.replace(cfg, **filled, freeze=freeze, backbone=pretrained_body or cfg.backbone or 'resnet')


def unlabelled_targets(cfg: FinetuneConfig, train, records) -> list:
    """The training targets that are not labels: the labels of `train` carried to their neighbour
    slices (`--carry-weight`) and a teacher's pseudo-labels (`--pseudo-labels`), each at its weight."""
    from .unlabelled import carry_labels, read_pseudo_labels
    extra = carry_labels(train, cfg.carry_weight) if cfg.carry_weight else []
    if cfg.pseudo_labels: extra += read_pseudo_labels(cfg.pseudo_labels, cfg.data, records, cfg.pseudo_weight)
    if extra: log.info(f"{len(extra)} slice(s) with targets that are not labels: "
                       f"{sum(r.weight == cfg.carry_weight for r in extra) if cfg.carry_weight else 0} carried, the rest pseudo-labels")
    return extra


def epoch_of(train, extra, length: int | None, seed: int) -> list:
    """One epoch's training items: the labelled slices `train` and the `extra` ones; with `length` (the
    benchmarks' same steps per epoch for every label fraction) exactly that many: labelled slices
    (repeated) fill at least half of it and the extra ones the rest, each at most once (a seeded
    sample where they are more). Repeating labels and extras alike would leave few labelled steps: 30
    key slices beside 114 carried neighbours were 21% of an epoch."""
    pool = train + extra
    if length is None or len(pool) == length or (not extra and len(pool) > length): return pool
    if not extra: return (pool * -(-length // len(pool)))[:length]
    rng = np.random.default_rng(seed)
    n_train = max(length - len(extra), length // 2)
    labelled = (train * -(-n_train // len(train)))[:n_train]
    return labelled + [extra[i] for i in sorted(rng.choice(len(extra), length - n_train, replace=False))]


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
    check_precision(cfg.precision)
    distributed.setup()
    decoding = Decoding(cfg.keep, cfg.nms_iou)
    loss_func = DetectionLoss(cfg.loss, cfg.map_weight, cfg.map_radius, cfg.nll_weight, cfg.target, decoding)
    df, records = load_data(cfg.data, missing_ok=cfg.skip_unreadable)
    ckpt = load_pretrained(cfg.pretrained) if cfg.pretrained else None
    cfg = resolve(cfg, records, ckpt)
    check_resume(cfg, out)
    spec = SliceSpec.of(cfg)
    train_all = evaluation_records(records, 'train')
    train = select_patients(train_all, cfg.label_fraction, cfg.seed)
    valid, test = evaluation_records(records, 'val'), evaluation_records(records, 'test')
    if not train or not valid or not test:
        raise ValueError(f"{Path(cfg.data) / 'DL_info.csv'}: needs train (Train_Val_Test 1), validation (2) and test (3) slices with "
                         f"lesions not all Possibly_noisy; it has {len(train)}, {len(valid)} and {len(test)}")
    extra = unlabelled_targets(cfg, train, records)
    epoch_items = epoch_of(train, extra, len(train_all) if cfg.same_epoch_length else None, cfg.seed)
    check_batches(len(epoch_items), cfg.bs, f"--label-fraction {cfg.label_fraction:g} leaves {len({r.patient for r in train})} patient(s)",
                   ' or a larger --label-fraction')
    in_chans = spec.n_channels
    enc_args = dict(ckpt['model_args']['encoder_args']) if ckpt else {'in_chans': in_chans, 'backbone': cfg.backbone}
    if enc_args['in_chans'] != in_chans:
        raise ValueError(f"{cfg.pretrained}: encoder has {enc_args['in_chans']} input channels, the data gives {in_chans}")
    # every slice this run reads: the disk cache is shared by all label fractions, the memory cache holds this run's
    needed = records + extra if cfg.cache == 'disk' else epoch_items + valid + test
    cache = prepare_slices(cfg.cache, needed, spec, cfg.cache_dir, max(1, cfg.num_workers), cfg.skip_unreadable)
    if getattr(cache, 'absent', None):  # --skip-unreadable left key slices out (named by prepare_slices) with their lesions
        train_all, train, valid, test = (readable(items, cache) for items in (train_all, train, valid, test))
        extra = readable(unlabelled_targets(cfg, train, records), cache)      # none carried from a slice left out
        epoch_items = epoch_of(train, extra, len(train_all) if cfg.same_epoch_length else None, cfg.seed)
        if not train or not valid or not test:
            raise ValueError(f"--skip-unreadable leaves {len(train)} training, {len(valid)} validation and {len(test)} test slices "
                             f"that can be read; each split needs at least one")
        check_batches(len(epoch_items), cfg.bs, '--skip-unreadable', '')
    with run_folder(out):
        if distributed.is_main(): save_run_settings(cfg, out)
        set_seed(cfg.seed, reproducible=True)
        dls = detection_dls(epoch_items + valid, spec, cfg.target, cfg.bs, cfg.augment, cfg.num_workers, cfg.seed, cache=cache,
                            **loader_kwargs())
        unused = unused_settings(cfg)    # the decoder sandwich's settings build nothing outside it
        model = Detector(enc_args, head=cfg.head, sandwich=cfg.freeze == 'sandwich' and cfg.sandwich, out_bn=cfg.out_bn, kappa=cfg.kappa,
                         adapter_ratio=cfg.adapter_ratio, adapter_stem=cfg.adapter_stem, adapter_gate=cfg.adapter_gate,
                         stride=cfg.stride, **{k: getattr(cfg, k) and k not in unused for k in DECODER_SETTINGS},
                         decoder_args=decoder_args(ckpt) if ckpt else None, backbone_weights=cfg.backbone_weights, decoding=decoding)
        if ckpt is not None: load_encoder(model.encoder, ckpt, str(cfg.pretrained), cfg.transfer_stages, cfg.pretrained_init, cfg.seed)
        if model.decoder is not None: load_decoder(model.decoder, ckpt, str(cfg.pretrained), cfg.pretrained_init, cfg.seed)
        learn = Learner(dls, model, loss_func=loss_func, metrics=[ValidFROC()], train_bn=cfg.train_frozen_bn, wd=cfg.wd, path=out,
                        model_dir='models', splitter=detector_splitter)
        apply_freeze(learn, cfg.freeze)
        counts = parameter_counts(model)
        log.info(f"freeze {cfg.freeze}: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen parameters; "
                 f"{len(train)} training slices of {len({r.patient for r in train})} patients, {len(valid)} validation, {len(test)} test")
        lr = cfg.lr
        if cfg.lr_find:    # in one process (it saves and reloads the model in the output folder); the other ranks take its rate
            if distributed.is_main():
                with distributed.alone(): lr = float(learn.lr_find(show_plot=False).valley)
            lr = distributed.gather(lr)[0]
            log.info(f"lr_find: {lr:.2e}")
        cbs = freeze_callbacks(cfg.freeze, cfg.update_frozen_bn) + ([TimeBudget(cfg.time_budget_s)] if cfg.time_budget_s else []) + list(cbs)
        seed_rank(cfg.seed)
        precision = speed_up(learn, cfg.precision)
        fit_resumable(learn, out, cfg.epochs, lr_for(cfg.freeze, lr, cfg.lr_mult), 'froc', cfg.resume, cbs, cfg.unfreeze_after, cfg.lr_mult,
                      learn.unfreeze, cfg.unfrozen_lr_div)
        if not distributed.is_main(): return {}     # rank 0 evaluates the model in one process, as a single-process run would
        back_to_fp32(learn)             # evaluation and the export in float32, as a CPU evaluation of it
        baseline = mean_box(train)
        results = report(learn.model, spec, decoding, {'valid': valid, 'test': test}, baseline, out, n_figure=cfg.n_figure, bs=cfg.bs, cache=cache)
        at_operating_point(learn, results['valid']['operating_point'])
        config = {**recorded(cfg), 'lr': lr, 'precision': precision, 'out': str(out)}
        # the export carries what evaluating it later needs: the baseline of the labels it was trained with
        learn.train_info = {'mean_box': baseline.tolist(), 'train_slices': len(train), 'label_fraction': cfg.label_fraction,
                            'seed': cfg.seed, 'data': str(cfg.data), 'config': config}
        save_export(learn, out / 'export.pkl')
        save_safe(learn, out)            # model.safetensors + model.json: the form to share, loaded without unpickling
        metrics = {**results, 'mean_box': baseline.tolist(), 'parameters': counts, 'train_slices': len(train),
                   'slices_per_epoch': len(dls.train_ds),
                   'train_patients': len({r.patient for r in train}), 'config': config, 'time_s': round(time.time() - t0, 1)}
        write_json(metrics, out / 'metrics.json')
        run_report(out, metrics)
    if 'test' in results: log.info(f"test: {summary_line(results['test'])}; wrote {out} (open {out / 'report.html'})")
    return metrics
