"""How much does pretraining buy, as a curve: fine-tuned validation FROC at one label fraction against
the pretraining's epochs and against the unlabelled slices it sees per labelled one, the same seeds
throughout. Zero epochs is the detector from scratch; the control, the mode from an untrained
checkpoint with scratch's weights (as in `efficiency`), is what every pretrained cell is also read against.

    python -m lesion_fastai.bench budget --pretrain-epochs 0,3,10,30 --neighbours 2,10 --mode full
    python -m lesion_fastai.bench budget --pretrain-epochs 0,3,30 --neighbours 2 --mode full --pretext genesis

The unlabelled-to-labelled ratio changes without changing the labels: the data is generated once
with the most neighbour slices, and a pretraining with fewer sees a view of it holding only the
slices within that many of a key slice (the same key slices, labels and fine-tuning data).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import PRECISIONS, PRETEXTS, RunConfig, check_fields, from_args, option, parse_ints
from ..plots import plt, save_fig
from ..stats import mean_ci
from .common import (CONTROL, EPOCHS, GROUP, MODES, NATIVE, NO_CHECKPOINT, PATIENTS, SEEDS, SELF_TRAINED, UNFREEZE_AFTER,
                     add_bench_settings, control_changes, data_context, default_of, ensure_data, finetune_config, machine, mode_changes, pm,
                     precision_change, pretext_changes, pretext_tag, pretrain_config, report, run_name)
from .grid import Run, run_grid

__all__ = ['BudgetSettings', 'budget', 'budget_grid', 'neighbour_view', 'add_parser']


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


@dataclass(kw_only=True)
class BudgetSettings:
    """Settings of `budget`: the data, the pretrainings' unlabelled slices a side and epochs, and the
    fine-tune of every cell."""
    out: Path = option(Path('runs/bench/budget'), 'output folder', group=GROUP)
    data: Path | None = option(None, 'data folder, generated with the most --neighbours (default: under --out)', group=GROUP)
    patients: int = option(PATIENTS, 'synthetic patients to generate', at_least=1, group=GROUP)
    native: int = option(NATIVE, 'native slice size of the generated data (trained at half)', at_least=1, group=GROUP)
    neighbours: tuple = option((2, 10), 'unlabelled slices a side the pretrainings see', parse=parse_ints, group=GROUP)
    pretrain_epochs: tuple = option((0, 3, 10, 30), 'pretraining epochs (0: scratch)', parse=parse_ints, group=GROUP)
    pretext: str = option('masked', "every pretraining's pretext (python -m pretrain --pretext); its settings the pretext's defaults",
                          choices=tuple(PRETEXTS), group=GROUP)
    fraction: float = option(.1, 'label fraction of every fine-tune', above=0, at_most=1, group=GROUP)
    seeds: tuple = option(SEEDS, 'seeds of every cell', parse=parse_ints, group=GROUP)
    mode: str = option('full', 'the pretrained mode fine-tuned', choices=tuple(m for m in MODES if m not in NO_CHECKPOINT + SELF_TRAINED),
                       group=GROUP)
    unfreeze_after: int = option(UNFREEZE_AFTER, 'the -ft modes: frozen epochs before every layer trains', at_least=0, group=GROUP)
    no_control: bool = option(False, "skip the control: --mode from an untrained checkpoint with scratch's weights, for every seed, "
                              'which each cell is read against as well as against scratch', group=GROUP)
    epochs: int = option(EPOCHS, 'fine-tuning epochs', at_least=1, group=GROUP)
    bs: int = option(default_of(RunConfig, 'bs'), 'batch size', at_least=1, group=GROUP)
    precision: str = option(default_of(RunConfig, 'precision'), 'of every run', choices=PRECISIONS, group=GROUP)

    def __post_init__(self):
        self.out = Path(self.out)
        if self.data is not None: self.data = Path(self.data)
        check_fields(self)


def budget(s: BudgetSettings) -> dict:
    """Every (pretraining epochs, neighbours) cell: the epochs against the most neighbours, the
    neighbours at the second-largest epoch count (10 of 0, 3, 10, 30); one pretraining per cell (`out`
    /pretrain_<neighbours>n_<epochs>e), then the mode fine-tuned at the label fraction for every seed
    (0 epochs: scratch, the same seeds), and the mode's control. Reports validation FROC (and test) per
    cell with 95% intervals and the paired differences from scratch and from the control, and plots the curve."""
    most = max(s.neighbours)
    data = s.data or s.out / f'data_{s.patients}p_{s.native}px_{most}n'
    ensure_data(data, s.patients, s.native, most)
    cells = _cells(s)
    views = {n: data if n == most else neighbour_view(data, s.out / f'view_{n}n', n) for n, e in cells if e}
    runs = budget_grid(s, data, data_context(data), cells, views)
    rows = [{**r.row, 'valid_froc': m['valid']['froc']['mean_0.5_4'], 'test_froc': m['test']['froc']['mean_0.5_4'],
             'train_slices': m['train_slices']} for r, m in zip(runs, run_grid(runs))]
    return _report(s, data, cells, rows)


def _cells(s: BudgetSettings) -> list[tuple[int, int]]:
    "(neighbours, pretraining epochs): each epoch count with the most neighbours, then fewer neighbours at the middle epochs."
    most, epoch_axis = max(s.neighbours), sorted(s.pretrain_epochs)
    middle = [e for e in epoch_axis if e][len([e for e in epoch_axis if e]) // 2] if any(epoch_axis) else 0
    return [(most, e) for e in epoch_axis] + [(n, middle) for n in sorted(s.neighbours) if n != most and middle]


def budget_grid(s: BudgetSettings, data: Path, context: int, cells, views: dict) -> list[Run]:
    """Every seed's run of every cell, each cell's pretraining on the view of the data with its neighbours (0 epochs: scratch),
    then (unless `s.no_control`) the mode's control: the untrained checkpoint (`out/pretrain_0e`) with scratch's weights for the seed."""
    speed = precision_change(s)
    runs = []
    tag = pretext_tag(s.pretext)   # none for masked: the masked curve's folders keep their names
    for n, e in cells:
        pre = (pretrain_config(views[n], s.out / f'pretrain_{n}n_{e}e{tag}', e, s.bs, {'context': context, **speed, **pretext_changes(s.pretext)})
               if e else None)
        mode = s.mode if e else 'scratch'
        for seed in s.seeds:
            run = s.out / 'runs' / (f'{mode}_{n}n_{e}e{tag}_{s.fraction:g}_seed{seed}' if e else run_name('scratch', s.fraction, seed, None))
            cfg = finetune_config(data, run, mode, s.fraction, seed, s.epochs, s.bs, pre and Path(pre.out) / 'pretrained.pth',
                                  {'context': context, **speed, **mode_changes(mode, s.unfreeze_after, 0.)})
            runs.append(Run(cfg, title=f"{mode}, {s.pretext} pretraining {e} epoch(s) with {n} neighbours a side, seed {seed}",
                            row=dict(neighbours=n, pretrain_epochs=e, seed=seed, control=False), pretrain=pre))
    if not s.no_control:
        pre = pretrain_config(data, s.out / 'pretrain_0e', 0, s.bs, {'context': context, **speed})
        for seed in s.seeds:
            cfg = finetune_config(data, s.out / 'runs' / (run_name(s.mode, s.fraction, seed, None) + pretext_tag(CONTROL)), s.mode, s.fraction, seed,
                                  s.epochs, s.bs, Path(pre.out) / 'pretrained.pth', {'context': context, **speed, **control_changes(CONTROL, s.mode),
                                                                                     **mode_changes(s.mode, s.unfreeze_after, 0.)})
            runs.append(Run(cfg, title=f'{s.mode} from the untrained checkpoint (the control), seed {seed}',
                            row=dict(neighbours=max(s.neighbours), pretrain_epochs=0, seed=seed, control=True), pretrain=pre))
    return runs


def _report(s: BudgetSettings, data: Path, cells, rows: list) -> dict:
    """Per cell: validation and test FROC over the seeds, the paired validation differences from scratch (every cell but
    scratch) and from the control (the pretrained cells); the table and the plot."""
    def by_seed(control: bool) -> dict: return {r['seed']: r['valid_froc'] for r in rows if r['pretrain_epochs'] == 0 and r['control'] == control}
    def paired(sel, base: dict) -> tuple: return mean_ci([r['valid_froc'] - base[r['seed']] for r in sel if r['seed'] in base])
    scratch, untrained, nan = by_seed(False), by_seed(True), (float('nan'), float('nan'))
    summary = []
    for n, e, control in [(n, e, False) for n, e in cells] + ([(max(s.neighbours), 0, True)] if untrained else []):
        sel = [r for r in rows if r['neighbours'] == n and r['pretrain_epochs'] == e and r['control'] == control]
        v, t = mean_ci([r['valid_froc'] for r in sel]), mean_ci([r['test_froc'] for r in sel])
        d, dc = paired(sel, scratch) if e or control else nan, paired(sel, untrained) if e else nan
        summary.append({'neighbours': n, 'pretrain_epochs': e, 'control': control, 'valid': v[0], 'valid_ci': v[1], 'test': t[0],
                        'test_ci': t[1], 'valid_diff': d[0], 'valid_diff_ci': d[1], 'valid_control_diff': dc[0], 'valid_control_diff_ci': dc[1],
                        'seeds': len(sel)})
    lines = [f'| unlabelled slices a side | {s.pretext} pretraining epochs | {s.mode} at {s.fraction:g} of the labels: validation FROC | '
             'paired difference from scratch (validation) | paired difference from the control (validation) | test FROC | seeds |',
             '|---|---|---|---|---|---|---|']
    lines += [f"| {x['neighbours']} | {_start(x)} | {pm(x['valid'], x['valid_ci'])} | {_diff(x, 'valid_diff')} | "
              f"{_diff(x, 'valid_control_diff')} | {pm(x['test'], x['test_ci'])} | {x['seeds']} |" for x in summary]
    result = {'rows': rows, 'summary': summary, 'machine': machine(),
              'settings': dict(data=str(data), neighbours=list(s.neighbours), pretrain_epochs=list(s.pretrain_epochs), fraction=s.fraction,
                               seeds=list(s.seeds), mode=s.mode, pretext=s.pretext, epochs=s.epochs, bs=s.bs, precision=s.precision,
                               unfreeze_after=s.unfreeze_after, no_control=s.no_control)}
    plot = _plot(summary, max(s.neighbours), s.mode, s.pretext, s.fraction, s.out / 'pretraining_budget.png')
    report(s.out, 'budget', result, '\n'.join(lines), figures=[plot])
    return result


def _start(x) -> str:
    "A cell's pretraining epochs in the table, scratch's and the control's named."
    return '0 (the control: an untrained checkpoint)' if x['control'] else f"{x['pretrain_epochs']}{' (scratch)' * (not x['pretrain_epochs'])}"


def _diff(x, key: str) -> str:
    "A paired difference in the table, blank where it is not one (scratch against itself, a cell without the control)."
    return '' if np.isnan(x[key]) else pm(x[key], x[key + '_ci'])


def _plot(summary, most: int, mode: str, pretext: str, fraction: float, path):
    def err(s) -> float: return 0 if np.isnan(s['valid_ci']) else s['valid_ci']   # a single seed has no interval
    fig, ax = plt.subplots(figsize=(6, 4), layout='constrained')
    curve = sorted((s['pretrain_epochs'], s['valid'], err(s)) for s in summary if s['neighbours'] == most and not s['control'])
    ax.errorbar([c[0] for c in curve], [c[1] for c in curve], yerr=[c[2] for c in curve], marker='o', capsize=3,
                label=f'{most} unlabelled slices a side')
    nudge = .02 * max(c[0] for c in curve)   # the points that share an epoch count with the curve's, drawn beside it, not on it
    for s in summary:
        if s['control']:
            ax.errorbar([-nudge], [s['valid']], yerr=[err(s)], marker='x', capsize=3, ls='none', color='grey',
                        label='the control (an untrained checkpoint; 0 epochs, drawn left)')
        elif s['neighbours'] != most:
            ax.errorbar([s['pretrain_epochs'] + nudge], [s['valid']], yerr=[err(s)], marker='s', capsize=3, ls='none',
                        label=f"{s['neighbours']} unlabelled slices a side (drawn right)")
    ax.set_xlabel(f'{pretext} pretraining epochs (0: scratch)'); ax.set_ylabel(f'validation FROC, {mode} at {fraction:g} of the labels')
    ax.grid(alpha=.3); fig.legend(fontsize=8, loc='outside lower center')   # below the axes, where no error bar runs
    return save_fig(fig, path)


def add_parser(sub) -> None:
    p = sub.add_parser('budget', help='how much pretraining buys: validation FROC against its epochs and its unlabelled slices',
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_settings(p, BudgetSettings)
    p.set_defaults(run=lambda ap, args: budget(from_args(BudgetSettings, ap, args)))
