"""Where the sandwich with 10% of the labels stands against scratch with all of them, and what each
single change (objective, transfer layers, learning rate, regularisation, epochs) does to it.

    python -m lesion_fastai.bench study [--quick]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ..config import from_args, option
from .common import (EFFICIENCY_OUT, EPOCHS, GROUP, NO_CHECKPOINT, BenchSettings, add_bench_settings, data_context, data_folder, ensure_data,
                     finetune_config, machine, precision_change, pretraining, quick, report, test_row)
from .grid import Run, run_grid

__all__ = ['STUDY', 'StudySettings', 'study', 'study_grid', 'add_parser']


# (name, mode, label fraction, FinetuneConfig changes[, PretrainConfig changes]): one change at a time
STUDY = [
    ('scratch, all labels (the target)', 'scratch', 1., {}),
    ('scratch, all labels, 60 epochs', 'scratch', 1., {'epochs': 60}),
    ('scratch, 10%', 'scratch', .1, {}),
    ('sandwich, all labels, full-width transfer layers', 'sandwich', 1., {'adapter_ratio': 1.}),
    ('sandwich, 10%, full-width transfer layers', 'sandwich', .1, {'adapter_ratio': 1.}),
    ('  same, boxes at the centre cell only (no neighbour sizes)', 'sandwich', .1, {'adapter_ratio': 1., 'map_radius': 0}),
    ('sandwich, 10%, narrow transfer layers (1/4)', 'sandwich', .1, {'adapter_ratio': .25}),
    ('  full width, + transfer layer after the stem', 'sandwich', .1, {'adapter_ratio': 1., 'adapter_stem': True}),
    ('  full width, lr 1e-3 (not 3e-3)', 'sandwich', .1, {'adapter_ratio': 1., 'lr': 1e-3}),
    ('  full width, weight decay 0.1 (not 0.01)', 'sandwich', .1, {'adapter_ratio': 1., 'wd': .1}),
    ('  full width, 10 epochs', 'sandwich', .1, {'adapter_ratio': 1., 'epochs': 10}),
    ('full (every layer fine-tuned), 10%', 'full', .1, {}),
    ('  full width, pretext masks 4 px patches (not 8)', 'sandwich', .1, {'adapter_ratio': 1.}, {'patch': 4}),
    ('sandwich, all labels, full width, 60 epochs', 'sandwich', 1., {'adapter_ratio': 1., 'epochs': 60}),
    ('sandwich, 10%, full width, 60 epochs', 'sandwich', .1, {'adapter_ratio': 1., 'epochs': 60}),
]


@dataclass(kw_only=True)
class StudySettings(BenchSettings):
    "Settings of `study`: efficiency's data and pretraining, one seed and the epochs of every variant."
    out: Path = option(EFFICIENCY_OUT, "output folder (efficiency's: shares its data and pretraining)", group=GROUP)
    quick: bool = option(False, 'a few-minute smoke run: 40 patients, 2 epochs, three variants', group=GROUP)
    seed: int = option(0, 'seed of every run', group=GROUP)
    epochs: int = option(EPOCHS, 'fine-tuning epochs (a variant may change them)', at_least=1, group=GROUP)


def study(s: StudySettings, variants=None) -> dict:
    """Where the sandwich with 10% of the labels stands against scratch with all of them, and what
    each single change (objective, transfer layers, learning rate, regularisation, epochs) does to
    it: the `variants` (default `STUDY`, three of them with --quick). Same data, pretraining and epoch
    length as `efficiency` (pass the same --out to share them)."""
    if variants is None: variants = [STUDY[0], STUDY[4], STUDY[6]] if s.quick else STUDY
    s = quick(s)
    data = data_folder(s)
    ensure_data(data, s.patients, s.native)
    runs = study_grid(s, data, data_context(data), variants)
    rows = [test_row(m, **r.row) for r, m in zip(runs, run_grid(runs))]
    lines = ['| variant | labeled slices | trainable parameters | test FROC | top box hit@0.5 / IoU | valid FROC | mean box FROC / hit@0.5 | time s |',
             '|---|---|---|---|---|---|---|---|']
    lines += [f"| {r['variant']} | {r['train_slices']} | {r['trainable']:,} | {r['froc']:.3f} | {r['hit@0.5']:.3f} / {r['mean_iou']:.3f} | "
              f"{r['valid_froc']:.3f} | {r['baseline_froc']:.3f} / {r['baseline_hit@0.5']:.3f} | {r['time_s']:.0f} |" for r in rows]
    result = {'rows': rows, 'machine': machine(), 'settings': dict(data=str(data), epochs=s.epochs, bs=s.bs, seed=s.seed)}
    report(s.out, 'study', result, '\n'.join(lines))
    return {'rows': rows}


def study_grid(s: StudySettings, data: Path, context: int, variants) -> list[Run]:
    "One run per variant, in its order, each from the pretraining with the variant's pretraining changes (and the data's context)."
    speed = precision_change(s)
    runs = []
    for i, (name, mode, frac, change, *pretrain_change) in enumerate(variants):
        changes = pretrain_change[0] if pretrain_change else {}
        pre = None if mode in NO_CHECKPOINT else pretraining(s.out, data, s.pretrain_epochs, s.bs, {'context': context, **changes, **speed})
        cfg = finetune_config(data, s.out / 'study' / f'{i:02d}_{mode}_{frac:g}_seed{s.seed}', mode, frac, s.seed, s.epochs, s.bs,
                              pre and Path(pre.out) / 'pretrained.pth', {**change, **speed})
        runs.append(Run(cfg, title=name, row=dict(variant=name, mode=mode, fraction=frac, change=change, pretrain_change=changes), pretrain=pre))
    return runs


def add_parser(sub) -> None:
    p = sub.add_parser('study', help='the sandwich at 10%% labels against scratch at 100%%, one change at a time',
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_settings(p, StudySettings)
    p.set_defaults(run=lambda ap, args: study(from_args(StudySettings, ap, args)))
