"""Choose the default of one fine-tuning (or pretext) setting on validation, never on test: every value x label
fraction x seed fine-tuned, validation figures only, paired differences from the current default.

    python -m lesion_fastai.bench select --setting adapter_ratio --values 1,0.25 --mode sandwich
    python -m lesion_fastai.bench select --setting pseudo_fp --values 0.5,0.25,1 --mode selftrain --fractions 0.1
    python -m lesion_fastai.bench select --setting rounds --values 1,2 --mode selftrain --fractions 0.1
    python -m lesion_fastai.bench select --setting lr_mult --values 100,10,1 --mode sandwich-ft --fractions 0.1
    python -m lesion_fastai.bench select --setting unfrozen_lr_div --values 2,1 --mode sandwich-ft --pretext untrained --fractions 0.1
    python -m lesion_fastai.bench select --setting genesis_paint --values 0.9,0 --mode full --pretext genesis --fractions 0.1

A mode means what it means in `efficiency` (the -ft modes unfreeze after `UNFREEZE_AFTER` epochs,
carry weighs the carried labels at `CARRY_WEIGHT`) unless the setting is that one. The selftrain
modes learn from `efficiency`'s scratch run of their label fraction and seed (trained here once if
it is not there yet, then shared), and also take `pseudo_fp` (the teacher's threshold) and `rounds`
(of self-training; value k's run is the teacher of value k + 1's) as settings. A setting of the
pretext (`PRETRAIN_SETTINGS`: Models Genesis's rates, the masked pretexts' mask) is chosen the same
way, each value fine-tuning from a pretraining of its own.
"""
from __future__ import annotations

import argparse
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import (PRETEXTS, PSEUDO_FP, FinetuneConfig, PretrainConfig, SettingError, choices, from_args, option, parse_floats, parse_ints,
                      pretext_defaults)
from ..stats import mean_ci
from .common import (CONTROL, EFFICIENCY_OUT, EPOCHS, GROUP, MODES, NO_CHECKPOINT, SEEDS, SELF_TRAINED, BenchSettings, add_bench_settings,
                     data_context, data_folder, default_of, ensure_data, finetune_config, machine, control_changes, mode_changes, precision_change, pretext_changes,
                     pretext_tag, pretraining, pseudo_csv, quick, report, teacher_config)
from .grid import Run, run_grid

__all__ = ['CRITERIA', 'TEACHER_SETTINGS', 'PRETRAIN_SETTINGS', 'SelectSettings', 'select', 'select_grid', 'setting_values', 'add_parser']


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

# settings of the pretext, PretrainConfig fields: each value pretrains an autoencoder of its own
GENESIS_SETTINGS = ('genesis_local', 'genesis_nonlinear', 'genesis_paint', 'genesis_outpaint')
PRETRAIN_SETTINGS = ('mask_ratio', 'patch', 'noise_std') + GENESIS_SETTINGS


CRITERIA = {'froc': ('valid_froc', max), 'iou': ('valid_mean_iou', max), 'calibration': ('calibration_error', min)}


@dataclass(kw_only=True)
class SelectSettings(BenchSettings):
    """Settings of `select`: the fine-tuning setting and its values, the mode and head of every run, the
    label fractions and seeds, and the criterion chosen by."""
    out: Path = option(EFFICIENCY_OUT, "output folder (efficiency's: shares its data and pretraining)", group=GROUP)
    setting: str = option(help='a FinetuneConfig field, e.g. adapter_ratio, nll_weight, map_radius, lr, wd, pseudo_weight; or, with a '
                          "selftrain mode, pseudo_fp (the teacher's threshold) or rounds (of self-training); or a setting of the "
                          f"--pretext, {', '.join(PRETRAIN_SETTINGS)}, each value pretrained once", group=GROUP)
    values: tuple = option(help='values to compare, comma separated; the first is the current default', parse=parse_floats, group=GROUP)
    mode: str = option('sandwich', 'scratch or freeze mode of every run', choices=tuple(MODES), group=GROUP)
    head: str = option(default_of(FinetuneConfig, 'head'), 'box head of every run', choices=choices(FinetuneConfig, 'head'), group=GROUP)
    pretext: str = option('masked', f"the pretraining of a pretrained mode's runs, as efficiency's --pretexts ({CONTROL}: the control, "
                          "the checkpoint with no epochs, its runs from scratch's draw)", choices=(*PRETEXTS, CONTROL), group=GROUP)
    fractions: tuple = option((.1, 1.), 'label fractions of training patients', parse=parse_floats, group=GROUP)
    seeds: tuple = option(SEEDS, 'seeds, comma separated (label subset and initialisation)', parse=parse_ints, group=GROUP)
    epochs: int = option(EPOCHS, 'fine-tuning epochs, the same for every run', at_least=1, group=GROUP)
    pseudo_fp: float = option(PSEUDO_FP, "the selftrain modes: the teacher's boxes scoring at least its score at this many false "
                              'positives per validation slice are pseudo-labels (unless --setting is pseudo_fp)', above=0, group=GROUP)
    criterion: str = option('froc', "froc: validation FROC (mean sensitivity 0.5-4 FPs per slice); iou: the top box's validation mean IoU; "
                            "calibration: the Gaussian std's distance from 68%% / 95%% coverage", choices=tuple(sorted(CRITERIA)), group=GROUP)

    def __post_init__(self):
        super().__post_init__()
        if self.setting in TEACHER_SETTINGS:
            if self.mode not in SELF_TRAINED:
                raise SettingError(f"--setting {self.setting} is a setting of the modes {', '.join(SELF_TRAINED)}, not of {self.mode}")
            if min(self.values) <= 0 or (self.setting == 'rounds' and min(self.values) < 1):
                raise SettingError(f"--values: {self.setting} must be {'at least 1' if self.setting == 'rounds' else 'positive'}")
        elif self.setting in PRETRAIN_SETTINGS: _check_pretrain_setting(self)
        elif self.setting not in FinetuneConfig.__dataclass_fields__: raise SettingError(f'--setting {self.setting!r} is not a fine-tuning setting')
        values = setting_values(self.setting, self.values)
        if values is None:
            takes = '0 or 1, off or on' if _kind(self.setting) is bool else 'whole numbers'
            raise SettingError(f'--values {",".join(f"{v:g}" for v in self.values)}: --setting {self.setting} takes {takes}')
        self.values = tuple(values)
        for v in self.values if self.setting in PRETRAIN_SETTINGS else ():    # out of the setting's range: refused before any data is made
            PretrainConfig(data=self.out, out=self.out, pretext=self.pretext, **{self.setting: v})


def _check_pretrain_setting(s: SelectSettings) -> None:
    "A setting of the pretext needs a mode that starts from a pretraining, and a pretraining of the pretext it belongs to."
    if s.mode in NO_CHECKPOINT: raise SettingError(f'--setting {s.setting} is a pretraining setting; --mode {s.mode} starts from no pretraining')
    genesis = s.setting in GENESIS_SETTINGS
    if (s.pretext == 'genesis') != genesis or s.pretext == CONTROL:
        wants = '--pretext genesis' if genesis else f"a masking --pretext ({', '.join(p for p in PRETEXTS if p != 'genesis')})"
        raise SettingError(f'--setting {s.setting} is a setting of {wants}, not of --pretext {s.pretext}')


def select(s: SelectSettings) -> dict:
    """Choose the default of one fine-tuning setting on validation, never on test: every value x label
    fraction x seed is fine-tuned (same data, pretraining and steps as `efficiency`, or, for a setting of
    the pretext, a pretraining of each value other than the pretext's default; a seed fixes the
    label subset and the initialisation, shared by all values), and only validation figures are
    reported: per value the mean and 95% interval of the criterion ('froc': validation FROC, mean
    sensitivity over 0.5-4 FPs per slice; 'iou': the top box's validation mean IoU, both higher is
    better; 'calibration': the Gaussian std's distance from 68% / 95% coverage, lower is better),
    and its paired difference from the first value (the current default) over the same seeds. The
    selftrain modes' students learn from the pseudo-labels their teacher (`efficiency`'s scratch run,
    `teacher_config`) gives at --pseudo-fp validation false positives per slice, or at each value
    when the setting is 'pseudo_fp', in one round or, when it is 'rounds', in each value's; the
    teacher's threshold looks at validation only."""
    s = quick(s)
    data = data_folder(s)
    ensure_data(data, s.patients, s.native)
    context = data_context(data) if s.mode in SELF_TRAINED or s.mode not in NO_CHECKPOINT else None
    runs = select_grid(s, data, context)
    rows = [_validation_row(m, **r.row) for r, m in zip(runs, run_grid(runs)) if r.row is not None]
    return _report(s, rows)


def _changes(s) -> dict:
    "The settings of every run besides the mode's: --head, where it is not the default."
    return {'head': s.head} if s.head != default_of(FinetuneConfig, 'head') else {}


def select_grid(s: SelectSettings, data: Path, context: int | None) -> list[Run]:
    """Every value x label fraction x seed run of `s` on `data` (whose context, where a pretraining or a
    teacher needs it, is `context`), a selftrain student after its teacher, efficiency's scratch run of
    its fraction and seed."""
    taught = s.mode in SELF_TRAINED
    changes = {**pretext_changes(s.pretext), **precision_change(s), 'context': context}
    own = lambda v: s.setting in PRETRAIN_SETTINGS and v != pretext_defaults(s.pretext).get(s.setting)   # the default's: efficiency's pretraining
    pre = lambda v: None if s.mode in NO_CHECKPOINT else pretraining(s.out, data, s.pretrain_epochs, s.bs,
                                                                           {**changes, **({s.setting: v} if own(v) else {})})
    runs = []
    for frac in s.fractions:
        for seed in s.seeds:
            teacher = teacher_config(s.out, data, frac, seed, s.epochs, s.bs, context, precision_change(s)) if taught else None
            if teacher is not None: runs.append(Run(teacher, title=f'the teacher: scratch, label fraction {frac:g}, seed {seed}'))
            runs += [_value_run(s, data, context, pre(v), teacher, frac, seed, v) for v in s.values]
    return runs


def _value_run(s: SelectSettings, data: Path, context: int | None, pre, teacher, frac: float, seed: int, v) -> Run:
    "The run of one value at a label fraction and seed; a student of `teacher` in the selftrain modes (value k of rounds: k rounds)."
    pretext = pretext_tag(None if s.mode in NO_CHECKPOINT else s.pretext)
    folder = lambda k: s.out / 'select' / s.setting / f'{s.mode}_{k:g}_{frac:g}_seed{seed}{pretext}'
    fine_tuned = s.setting not in TEACHER_SETTINGS and s.setting not in PRETRAIN_SETTINGS
    cfg = {**control_changes(s.pretext, s.mode), **mode_changes(s.mode), **_changes(s), **precision_change(s), **({s.setting: v} if fine_tuned else {})}
    fp = v if s.setting == 'pseudo_fp' else s.pseudo_fp
    if teacher is not None:
        cfg.update(pseudo_labels=pseudo_csv(s.out, frac, seed, context, fp), **({'context': context} if s.mode in NO_CHECKPOINT else {}))
    cfg = finetune_config(data, folder(v), s.mode, frac, seed, s.epochs, s.bs, pre and Path(pre.out) / 'pretrained.pth', cfg)
    rounds = v if s.setting == 'rounds' else 1
    return Run(cfg, title=f"{s.setting} {v:g}, {s.mode}, label fraction {frac:g}, seed {seed}", row=dict(value=v, fraction=frac, seed=seed),
               pretrain=pre, teacher=teacher, fp=fp if teacher is not None else None,
               earlier=tuple(folder(k) for k in range(1, rounds)) if teacher is not None else ())


def _report(s: SelectSettings, rows: list) -> dict:
    "Per label fraction and value: the criterion's mean and paired difference from the first value; the verdict and the table."
    key, best_of = CRITERIA[s.criterion]
    values = list(s.values)
    summary = []
    for frac in s.fractions:
        ref = {r['seed']: r[key] for r in rows if r['fraction'] == frac and r['value'] == values[0]}
        for v in values:
            sel = [r for r in rows if r['fraction'] == frac and r['value'] == v]
            mean, ci = mean_ci([r[key] for r in sel])
            diff, diff_ci = mean_ci([r[key] - ref[r['seed']] for r in sel])
            summary.append({'value': v, 'fraction': frac, 'seeds': len(sel), 'mean': mean, 'ci': ci, 'diff': diff, 'diff_ci': diff_ci,
                            'valid_froc': float(np.mean([r['valid_froc'] for r in sel])),
                            'train_slices': sel[0]['train_slices']})
    overall = {v: float(np.mean([x['mean'] for x in summary if x['value'] == v])) for v in values}
    best = best_of(values, key=lambda v: overall[v])
    verdict = _verdict(s, summary, best)
    lines = [f"| {s.setting} | labels | labeled slices | seeds | validation {s.criterion} (mean +- 95% CI) | difference from {values[0]:g} (paired) | validation FROC |",
             '|---|---|---|---|---|---|---|']
    lines += [f"| {x['value']:g} | {x['fraction']:g} | {x['train_slices']} | {x['seeds']} | {x['mean']:.3f} +- {x['ci']:.3f} | "
              f"{x['diff']:+.3f} +- {x['diff_ci']:.3f} | {x['valid_froc']:.3f} |" for x in summary]
    taught = s.mode in SELF_TRAINED
    result = {'rows': rows, 'summary': summary, 'verdict': verdict, 'best': best, 'machine': machine(),
              'settings': dict(setting=s.setting, values=values, mode=s.mode, pretext=s.pretext, fractions=list(s.fractions), seeds=list(s.seeds),
                               epochs=s.epochs, criterion=s.criterion, changes=_changes(s),
                               **({'pseudo_fp': s.pseudo_fp} if taught and s.setting != 'pseudo_fp' else {}))}
    report(s.out, f'select_{s.setting}', result, '\n'.join(lines), [verdict])
    return result


def _verdict(s: SelectSettings, summary: list, best) -> str:
    "The best value, and where its paired difference from the first value is resolved."
    first = s.values[0]
    verdict = f"{s.setting} = {best:g} is best on validation {s.criterion}, averaged over the label fractions"
    if best != first:
        clear = [f"{x['fraction']:g}" for x in summary if x['value'] == best and abs(x['diff']) > x['diff_ci']]
        verdict += (f"; its paired difference from {first:g} is outside the 95% interval at label fraction {', '.join(clear)}"
                    if clear else f"; no difference from {first:g} is resolved (every paired interval holds 0)")
    return verdict


def _kind(setting: str) -> type:
    "The type of a setting's values: a teacher setting's, the FinetuneConfig field's, or the PretrainConfig field's (int of `int | None`)."
    if setting in TEACHER_SETTINGS: return TEACHER_SETTINGS[setting]
    if setting not in PRETRAIN_SETTINGS: return typing.get_type_hints(FinetuneConfig)[setting]
    hint = typing.get_type_hints(PretrainConfig)[setting]
    return next((t for t in typing.get_args(hint) if t is not type(None)), hint)


def setting_values(setting: str, values) -> list | None:
    """`values` (parsed as floats) as the type of the config field `setting`: ints for an int field (None if one is
    not whole), False / True for a switch (0 / 1; None for any other number)."""
    kind = _kind(setting)
    if kind is bool: return [bool(v) for v in values] if all(v in (0, 1) for v in values) else None
    if kind is not int: return list(values)
    return [int(v) for v in values] if all(float(v).is_integer() for v in values) else None


def add_parser(sub) -> None:
    p = sub.add_parser('select', help='choose the default of one fine-tuning or pretext setting on validation (never on test)',
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_settings(p, SelectSettings, required=('setting', 'values'))
    p.set_defaults(run=lambda ap, args: select(from_args(SelectSettings, ap, args)))
