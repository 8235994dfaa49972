"""How much does pretraining buy, as a curve: fine-tuned validation FROC at one label fraction against
the pretraining's epochs and against the unlabelled slices it sees per labelled one, the same seeds
throughout. Zero epochs is the detector from scratch.

    python -m lesion_fastai.bench budget --pretrain-epochs 0,3,10,30 --neighbours 2,10 --mode full

The unlabelled-to-labelled ratio changes without changing the labels: the data is generated once
with the most neighbour slices, and a pretraining with fewer sees a view of it holding only the
slices within that many of a key slice (the same key slices, labels and fine-tuning data).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from ..config import PRECISIONS, parse_ints
from ..log import log
from ..plots import plt, save_fig
from ..stats import mean_ci
from .common import MODES, UNFREEZE_AFTER, data_context, ensure_data, finetune_config, machine, pm, pretrain_once, report, run_finetune

__all__ = ['budget', 'neighbour_view', 'add_parser']


def neighbour_view(data: Path, folder: Path, neighbours: int) -> Path:
    """`folder` as a view of the data set `data` (made once): its DL_info.csv, and of its slices only
    those within `neighbours` of a key slice, hard-linked (or copied where links cannot be made)."""
    import shutil
    from ..deeplesion import read_dl_info
    if (folder / 'DL_info.csv').exists(): return folder
    df = read_dl_info(data / 'DL_info.csv')
    keep = {(row.series_dir, row.key_slice + o) for row in df.itertuples() for o in range(-neighbours, neighbours + 1)}
    tmp = folder.with_name(folder.name + '.partial')
    shutil.rmtree(tmp, ignore_errors=True)
    for series in sorted((data / 'Images_png').iterdir()):
        for png in sorted(series.glob('*.png')):
            if (series.name, int(png.stem)) not in keep: continue
            target = tmp / 'Images_png' / series.name / png.name
            target.parent.mkdir(parents=True, exist_ok=True)
            try: os.link(png, target)
            except OSError: shutil.copy2(png, target)
    shutil.copy2(data / 'DL_info.csv', tmp / 'DL_info.csv')
    os.replace(tmp, folder)
    return folder


def budget(out: Path, data: Path, *, patients: int = 250, native: int = 256, neighbours=(2, 10), pretrain_epochs=(0, 3, 10, 30),
           fraction: float = .1, seeds=(0, 1, 2), mode: str = 'full', epochs: int = 30, bs: int = 16, precision: str = 'auto',
           unfreeze_after: int = UNFREEZE_AFTER) -> dict:
    """Every (pretraining epochs, neighbours) cell: the epochs against the most neighbours, the
    neighbours at the second-largest epoch count (10 of 0, 3, 10, 30); one pretraining per cell (`out`
    /pretrain_<neighbours>n_<epochs>e), then `mode` fine-tuned at `fraction` for every seed (0 epochs:
    scratch, the same seeds). Reports validation FROC (and test) per cell with 95% intervals and the
    paired difference from scratch, and plots the curve."""
    from .common import mode_changes
    most = max(neighbours)
    ensure_data(data, patients, native, most)
    context = data_context(data)
    speed = {} if precision == 'auto' else {'precision': precision}
    epoch_axis = sorted(pretrain_epochs)
    middle = [e for e in epoch_axis if e][len([e for e in epoch_axis if e]) // 2] if any(epoch_axis) else 0
    cells = [(most, e) for e in epoch_axis] + [(n, middle) for n in sorted(neighbours) if n != most and middle]
    rows = []
    for n, e in cells:
        ckpt = None
        if e:
            view = data if n == most else neighbour_view(data, out / f'view_{n}n', n)
            ckpt = pretrain_once(view, out / f'pretrain_{n}n_{e}e', e, bs, {'context': context, **speed})
        for seed in seeds:
            m_ = 'scratch' if not e else mode
            run = out / 'runs' / (f'scratch_{fraction:g}_seed{seed}' if not e else f'{mode}_{n}n_{e}e_{fraction:g}_seed{seed}')
            if not (run / 'metrics.json').exists(): log.info(f"\n== {m_}, pretraining {e} epoch(s) with {n} neighbours a side, seed {seed}")
            changes = {'context': context, **speed, **mode_changes(m_, unfreeze_after, 0.)}
            m = run_finetune(finetune_config(data, run, m_, fraction, seed, epochs, bs, ckpt, changes))
            rows.append({'neighbours': n, 'pretrain_epochs': e, 'seed': seed, 'valid_froc': m['valid']['froc']['mean_0.5_4'],
                         'test_froc': m['test']['froc']['mean_0.5_4'], 'train_slices': m['train_slices']})
    scratch = {r['seed']: r['valid_froc'] for r in rows if r['pretrain_epochs'] == 0}
    summary = []
    for n, e in cells:
        sel = [r for r in rows if r['neighbours'] == n and r['pretrain_epochs'] == e]
        v, t = mean_ci([r['valid_froc'] for r in sel]), mean_ci([r['test_froc'] for r in sel])
        d = mean_ci([r['valid_froc'] - scratch[r['seed']] for r in sel if r['seed'] in scratch]) if e else (float('nan'), float('nan'))
        summary.append({'neighbours': n, 'pretrain_epochs': e, 'valid': v[0], 'valid_ci': v[1], 'test': t[0], 'test_ci': t[1],
                        'valid_diff': d[0], 'valid_diff_ci': d[1], 'seeds': len(sel)})
    lines = [f'| unlabelled slices a side | pretraining epochs | {mode} at {fraction:g} of the labels: validation FROC | paired difference '
             'from scratch (validation) | test FROC | seeds |', '|---|---|---|---|---|---|']
    lines += [f"| {s['neighbours']} | {s['pretrain_epochs']} (scratch) | {pm(s['valid'], s['valid_ci'])} |  | {pm(s['test'], s['test_ci'])} | {s['seeds']} |"
              if not s['pretrain_epochs'] else
              f"| {s['neighbours']} | {s['pretrain_epochs']} | {pm(s['valid'], s['valid_ci'])} | {pm(s['valid_diff'], s['valid_diff_ci'])} | "
              f"{pm(s['test'], s['test_ci'])} | {s['seeds']} |" for s in summary]
    result = {'rows': rows, 'summary': summary, 'machine': machine(),
              'settings': dict(data=str(data), neighbours=list(neighbours), pretrain_epochs=list(pretrain_epochs), fraction=fraction,
                               seeds=list(seeds), mode=mode, epochs=epochs, bs=bs, precision=precision, unfreeze_after=unfreeze_after)}
    plot = _plot(summary, most, mode, fraction, out / 'pretraining_budget.png')
    report(out, 'budget', result, '\n'.join(lines), figures=[plot])
    return result


def _plot(summary, most: int, mode: str, fraction: float, path):
    fig, ax = plt.subplots(figsize=(6, 4), layout='constrained')
    curve = sorted((s['pretrain_epochs'], s['valid'], 0 if np.isnan(s['valid_ci']) else s['valid_ci']) for s in summary if s['neighbours'] == most)
    ax.errorbar([c[0] for c in curve], [c[1] for c in curve], yerr=[c[2] for c in curve], marker='o', capsize=3,
                label=f'{most} unlabelled slices a side')
    for s in summary:
        if s['neighbours'] != most:
            ax.errorbar([s['pretrain_epochs']], [s['valid']], yerr=[0 if np.isnan(s['valid_ci']) else s['valid_ci']], marker='s',
                        capsize=3, ls='none', label=f"{s['neighbours']} unlabelled slices a side")
    ax.set_xlabel('pretraining epochs (0: scratch)'); ax.set_ylabel(f'validation FROC, {mode} at {fraction:g} of the labels')
    ax.grid(alpha=.3); ax.legend(fontsize=8, loc='lower right')
    return save_fig(fig, path)


def add_parser(sub) -> None:
    b = sub.add_parser('budget', help='how much pretraining buys: validation FROC against its epochs and its unlabelled slices',
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument('--out', type=Path, default=Path('runs/bench/budget'), help='output folder')
    b.add_argument('--data', type=Path, default=None, help='data folder, generated with the most --neighbours (default: under --out)')
    b.add_argument('--patients', type=int, default=250, help='synthetic patients to generate')
    b.add_argument('--native', type=int, default=256, help='native slice size of the generated data (trained at half)')
    b.add_argument('--neighbours', type=parse_ints, default='2,10', help='unlabelled slices a side the pretrainings see')
    b.add_argument('--pretrain-epochs', type=parse_ints, default='0,3,10,30', help='pretraining epochs (0: scratch)')
    b.add_argument('--fraction', type=float, default=.1, help='label fraction of every fine-tune')
    b.add_argument('--seeds', type=parse_ints, default='0,1,2', help='seeds of every cell')
    b.add_argument('--mode', choices=[m for m in MODES if m not in ('scratch', 'imagenet', 'carry', 'selftrain', 'selftrain-ae')],
                   default='full', help='the pretrained mode fine-tuned')
    b.add_argument('--unfreeze-after', type=int, default=UNFREEZE_AFTER, help='the -ft modes: frozen epochs before every layer trains')
    b.add_argument('--epochs', type=int, default=30, help='fine-tuning epochs')
    b.add_argument('--bs', type=int, default=16, help='batch size')
    b.add_argument('--precision', choices=PRECISIONS, default='auto', help='of every run')
    b.set_defaults(run=lambda ap, args: budget(
        args.out, args.data or args.out / f'data_{args.patients}p_{args.native}px_{max(args.neighbours)}n', patients=args.patients,
        native=args.native, neighbours=args.neighbours, pretrain_epochs=args.pretrain_epochs, fraction=args.fraction, seeds=args.seeds,
        mode=args.mode, epochs=args.epochs, bs=args.bs, precision=args.precision, unfreeze_after=args.unfreeze_after))
