"""Choose the default of one fine-tuning setting on validation, never on test: every value x label
fraction x seed fine-tuned, validation figures only, paired differences from the current default.

    python -m lesion_fastai.bench select --setting adapter_ratio --values 1,0.25 --mode sandwich
    python -m lesion_fastai.bench select --setting pseudo_fp --values 0.5,0.25,1 --mode selftrain --fractions 0.1
    python -m lesion_fastai.bench select --setting rounds --values 1,2 --mode selftrain --fractions 0.1
    python -m lesion_fastai.bench select --setting lr_mult --values 100,10,1 --mode sandwich-ft --fractions 0.1

A mode means what it means in `efficiency` (the -ft modes unfreeze after `UNFREEZE_AFTER` epochs,
carry weighs the carried labels at `CARRY_WEIGHT`) unless the setting is that one. The selftrain
modes learn from `efficiency`'s scratch run of their label fraction and seed (trained here once if
it is not there yet, then shared), and also take `pseudo_fp` (the teacher's threshold) and `rounds`
(of self-training; value k's run is the teacher of value k + 1's) as settings.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..config import PSEUDO_FP, FinetuneConfig, choices, parse_floats, parse_ints
from ..log import log
from ..stats import mean_ci
from .common import (MODES, NO_CHECKPOINT, SELF_TRAINED, add_data_args, data_args, data_context, ensure_data, finetune_config, machine, mode_changes, prepare,
                     pseudo_csv, report, run_finetune, self_trained, teacher_config)

__all__ = ['CRITERIA', 'TEACHER_SETTINGS', 'select', 'add_parser']


def _validation_row(m: dict, **extra) -> dict:
    "What `select` may look at: validation figures only."
    v = m['valid']
    cal = v['top1'].get('calibration')
    return {**extra, 'valid_froc': v['froc']['mean_0.5_4'], 'valid_mean_iou': v['top1']['mean_iou'], 'valid_hit@0.5': v['top1']['hit@0.5'],
            'train_slices': m['train_slices'],
            'valid_within_1std': cal['within_1std'] if cal else None, 'valid_within_2std': cal['within_2std'] if cal else None,
            'calibration_error': (abs(cal['within_1std'] - .683) + abs(cal['within_2std'] - .954)) / 2 if cal else None}


# settings of the selftrain modes that are not FinetuneConfig fields: how the pseudo-labels are made (their types)
TEACHER_SETTINGS = {'pseudo_fp': float, 'rounds': int}


CRITERIA = {'froc': ('valid_froc', max), 'iou': ('valid_mean_iou', max), 'calibration': ('calibration_error', min)}


def select(out: Path, data: Path, patients: int, native: int, setting: str, values, mode: str, fractions, seeds,
           epochs: int, pretrain_epochs: int, bs: int, changes: dict | None = None, criterion: str = 'froc',
           precision: str = 'auto', pseudo_fp: float = PSEUDO_FP) -> dict:
    """Choose the default of one fine-tuning `setting` on validation, never on test: every value x label
    fraction x seed is fine-tuned (same data, pretraining and steps as `efficiency`; a seed fixes the
    label subset and the initialisation, shared by all values), and only validation figures are
    reported: per value the mean and 95% interval of `criterion` ('froc': validation FROC, mean
    sensitivity over 0.5-4 FPs per slice; 'iou': the top box's validation mean IoU, both higher is
    better; 'calibration': the Gaussian std's distance from 68% / 95% coverage, lower is better),
    and its paired difference from the first value (the current default) over the same seeds. The
    selftrain modes' students learn from the pseudo-labels their teacher (`efficiency`'s scratch run,
    `teacher_config`) gives at `pseudo_fp` validation false positives per slice, or at each value
    when `setting` is 'pseudo_fp', in one round or, when `setting` is 'rounds', in each value's; the
    teacher's threshold looks at validation only."""
    key, best_of = CRITERIA[criterion]
    taught = mode in SELF_TRAINED                # a student of efficiency's scratch run
    if setting in TEACHER_SETTINGS and not taught: raise ValueError(f"{setting} is a setting of the selftrain modes, not of {mode}")
    speed = {} if precision == 'auto' else {'precision': precision}
    if mode in NO_CHECKPOINT:                    # scratch, carry, selftrain: no autoencoder to pretrain
        ckpt = None
        ensure_data(data, patients, native)
    else: ckpt = prepare(out, data, patients, native, pretrain_epochs, bs, speed)
    context = data_context(data) if taught else None    # the teacher's, as in efficiency
    rows = []
    for frac in fractions:
        for seed in seeds:
            teacher = teacher_config(out, data, frac, seed, epochs, bs, context, speed) if taught else None
            if teacher is not None:
                if not (Path(teacher.out) / 'metrics.json').exists(): log.info(f"\n== the teacher: scratch, label fraction {frac:g}, seed {seed}")
                run_finetune(teacher)
            for v in values:
                run = out / 'select' / setting / f'{mode}_{v:g}_{frac:g}_seed{seed}'
                if not (run / 'metrics.json').exists(): log.info(f"\n== {setting} {v:g}, {mode}, label fraction {frac:g}, seed {seed}")
                cfg = {**mode_changes(mode), **(changes or {}), **speed, **({} if setting in TEACHER_SETTINGS else {setting: v})}
                fp = v if setting == 'pseudo_fp' else pseudo_fp
                if taught: cfg.update(pseudo_labels=pseudo_csv(out, frac, seed, context, fp), **({'context': context} if mode in NO_CHECKPOINT else {}))
                cfg = finetune_config(data, run, mode, frac, seed, epochs, bs, ckpt, cfg)
                if taught:                 # value k of rounds: value k - 1's run is the last teacher
                    round_out = lambda k: out / 'select' / setting / f'{mode}_{k:g}_{frac:g}_seed{seed}'
                    cfg = self_trained(teacher, cfg, fp, v if setting == 'rounds' else 1, round_out)
                m = run_finetune(cfg)
                rows.append(_validation_row(m, value=v, fraction=frac, seed=seed))
    summary = []
    for frac in fractions:
        ref = {r['seed']: r[key] for r in rows if r['fraction'] == frac and r['value'] == values[0]}
        for v in values:
            sel = [r for r in rows if r['fraction'] == frac and r['value'] == v]
            mean, ci = mean_ci([r[key] for r in sel])
            diff, diff_ci = mean_ci([r[key] - ref[r['seed']] for r in sel])
            summary.append({'value': v, 'fraction': frac, 'seeds': len(sel), 'mean': mean, 'ci': ci, 'diff': diff, 'diff_ci': diff_ci,
                            'valid_froc': float(np.mean([r['valid_froc'] for r in sel])),
                            'train_slices': sel[0]['train_slices']})
    overall = {v: float(np.mean([s['mean'] for s in summary if s['value'] == v])) for v in values}
    best = best_of(values, key=lambda v: overall[v])
    verdict = f"{setting} = {best:g} is best on validation {criterion}, averaged over the label fractions"
    if best != values[0]:
        clear = [f"{s['fraction']:g}" for s in summary if s['value'] == best and abs(s['diff']) > s['diff_ci']]
        verdict += (f"; its paired difference from {values[0]:g} is outside the 95% interval at label fraction {', '.join(clear)}"
                    if clear else f"; no difference from {values[0]:g} is resolved (every paired interval holds 0)")
    lines = [f"| {setting} | labels | labeled slices | seeds | validation {criterion} (mean +- 95% CI) | difference from {values[0]:g} (paired) | validation FROC |",
             '|---|---|---|---|---|---|---|']
    lines += [f"| {s['value']:g} | {s['fraction']:g} | {s['train_slices']} | {s['seeds']} | {s['mean']:.3f} +- {s['ci']:.3f} | "
              f"{s['diff']:+.3f} +- {s['diff_ci']:.3f} | {s['valid_froc']:.3f} |" for s in summary]
    table = '\n'.join(lines)
    result = {'rows': rows, 'summary': summary, 'verdict': verdict, 'best': best, 'machine': machine(),
              'settings': dict(setting=setting, values=list(values), mode=mode, fractions=list(fractions), seeds=list(seeds),
                               epochs=epochs, criterion=criterion, changes=changes or {},
                               **({'pseudo_fp': pseudo_fp} if taught and setting != 'pseudo_fp' else {}))}
    report(out, f'select_{setting}', result, table, [verdict])
    return result


def add_parser(sub) -> None:
    se = sub.add_parser('select', help='choose the default of one fine-tuning setting on validation (never on test)',
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(se, "output folder (efficiency's: shares its data and pretraining)", 'a few-minute smoke run: 40 patients, 2 epochs')
    se.add_argument('--setting', required=True, help='a FinetuneConfig field, e.g. adapter_ratio, nll_weight, map_radius, lr, wd, '
                    "pseudo_weight; or, with a selftrain mode, pseudo_fp (the teacher's threshold) or rounds (of self-training)")
    se.add_argument('--values', type=parse_floats, required=True, help='values to compare, comma separated; the first is the current default')
    se.add_argument('--mode', choices=list(MODES), default='sandwich', help='scratch or freeze mode of every run')
    se.add_argument('--head', choices=choices(FinetuneConfig, 'head'), default='direct', help='box head of every run')
    se.add_argument('--fractions', type=parse_floats, default='0.1,1', help='label fractions of training patients')
    se.add_argument('--seeds', type=parse_ints, default='0,1,2', help='seeds, comma separated (label subset and initialisation)')
    se.add_argument('--epochs', type=int, default=30, help='fine-tuning epochs, the same for every run')
    se.add_argument('--pseudo-fp', type=float, default=PSEUDO_FP, help="the selftrain modes: the teacher's boxes scoring at least its "
                    'score at this many false positives per validation slice are pseudo-labels (unless --setting is pseudo_fp)')
    se.add_argument('--criterion', choices=sorted(CRITERIA), default='froc',
                    help="froc: validation FROC (mean sensitivity 0.5-4 FPs per slice); iou: the top box's validation mean IoU; "
                         "calibration: the Gaussian std's distance from 68%% / 95%% coverage")
    se.set_defaults(run=_run)


def setting_values(setting: str, values) -> list | None:
    "`values` (parsed as floats) as the type of the FinetuneConfig field `setting`: ints for an int field (None if one is not whole)."
    import typing
    if (TEACHER_SETTINGS.get(setting) or typing.get_type_hints(FinetuneConfig)[setting]) is not int: return list(values)
    return [int(v) for v in values] if all(float(v).is_integer() for v in values) else None


def _run(ap, args) -> dict:
    data = data_args(args)
    if args.setting in TEACHER_SETTINGS:
        if args.mode not in SELF_TRAINED: ap.error(f"--setting {args.setting} is a setting of the modes {', '.join(SELF_TRAINED)}, not of {args.mode}")
        if min(args.values) <= 0 or (args.setting == 'rounds' and min(args.values) < 1): ap.error(f'--values: {args.setting} must be '
                                                                                                   + ('at least 1' if args.setting == 'rounds' else 'positive'))
    elif args.setting not in FinetuneConfig.__dataclass_fields__: ap.error(f'--setting {args.setting!r} is not a fine-tuning setting')
    if args.pseudo_fp <= 0: ap.error(f'--pseudo-fp must be positive, got {args.pseudo_fp:g}')
    values = setting_values(args.setting, args.values)
    if values is None: ap.error(f'--values {",".join(f"{v:g}" for v in args.values)}: --setting {args.setting} takes whole numbers')
    return select(args.out, data, args.patients, args.native, args.setting, values, args.mode, list(args.fractions),
                  list(args.seeds), args.epochs, args.pretrain_epochs, args.bs, {'head': args.head} if args.head != 'direct' else None,
                  args.criterion, args.precision, args.pseudo_fp)
