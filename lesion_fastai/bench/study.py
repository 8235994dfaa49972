"""Where the sandwich with 10% of the labels stands against scratch with all of them, and what each
single change (objective, transfer layers, learning rate, regularisation, epochs) does to it.

    python -m lesion_fastai.bench study [--quick]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..log import log
from .common import add_data_args, data_args, finetune_config, machine, prepare, report, run_finetune, test_row

__all__ = ['STUDY', 'study', 'add_parser']


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


def study(out: Path, data: Path, patients: int, native: int, epochs: int, pretrain_epochs: int, bs: int, seed: int = 0,
          variants=STUDY, precision: str = 'auto') -> dict:
    """Where the sandwich with 10% of the labels stands against scratch with all of them, and what
    each single change (objective, transfer layers, learning rate, regularisation, epochs) does to
    it. Same data, pretraining and epoch length as `efficiency` (pass the same --out to share them)."""
    rows = []
    for i, (name, mode, frac, change, *pretrain_change) in enumerate(variants):
        speed = {} if precision == 'auto' else {'precision': precision}
        ckpt = prepare(out, data, patients, native, pretrain_epochs, bs, {**(pretrain_change[0] if pretrain_change else {}), **speed})
        run = out / 'study' / f'{i:02d}_{mode}_{frac:g}_seed{seed}'
        if not (run / 'metrics.json').exists(): log.info(f"\n== {name}")
        rows.append(test_row(run_finetune(finetune_config(data, run, mode, frac, seed, epochs, bs, ckpt, {**change, **speed})), variant=name, mode=mode, fraction=frac,
                         change=change, pretrain_change=pretrain_change[0] if pretrain_change else {}))
    lines = ['| variant | labeled slices | trainable parameters | test FROC | top box hit@0.5 / IoU | valid FROC | mean box FROC / hit@0.5 | time s |',
             '|---|---|---|---|---|---|---|---|']
    lines += [f"| {r['variant']} | {r['train_slices']} | {r['trainable']:,} | {r['froc']:.3f} | {r['hit@0.5']:.3f} / {r['mean_iou']:.3f} | "
              f"{r['valid_froc']:.3f} | {r['baseline_froc']:.3f} / {r['baseline_hit@0.5']:.3f} | {r['time_s']:.0f} |" for r in rows]
    table = '\n'.join(lines)
    report(out, 'study', {'rows': rows, 'machine': machine(), 'settings': dict(data=str(data), epochs=epochs, bs=bs, seed=seed)}, table)
    return {'rows': rows}


def add_parser(sub) -> None:
    st = sub.add_parser('study', help='the sandwich at 10%% labels against scratch at 100%%, one change at a time',
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(st, "output folder (efficiency's: shares its data and pretraining)", 'a few-minute smoke run: 40 patients, 2 epochs, three variants')
    st.add_argument('--seed', type=int, default=0, help='seed of every run')
    st.add_argument('--epochs', type=int, default=30, help='fine-tuning epochs (a variant may change them)')
    st.set_defaults(run=_run)


def _run(ap, args) -> dict:
    data = data_args(args)
    return study(args.out, data, args.patients, args.native, args.epochs, args.pretrain_epochs, args.bs, args.seed,
                 [STUDY[0], STUDY[4], STUDY[6]] if args.quick else STUDY, args.precision)
