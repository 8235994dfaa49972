"""Does pretraining need fewer labels? One pretraining per pretext, then every (label fraction, seed,
mode, pretext) fine-tune with the same budget, test FROC and the top box beside the mean box, each
pretrained mode's paired difference from scratch with its 95% interval, and a verdict per fraction
for the mode chosen on validation (never on test).

    python -m lesion_fastai.bench efficiency --fractions 0.1 --seeds 0,1,2 --modes scratch,sandwich
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
from pathlib import Path

import numpy as np

from ..config import DEFAULT_CONTEXT, PRETEXTS, PSEUDO_FP, FinetuneConfig, PretrainConfig, parse_floats, parse_ints
from ..log import log
from ..plots import plt, save_fig
from ..report import markdown_table, summary_report
from ..stats import mean_ci
from .common import (CARRY_WEIGHT, GRID_MODES, MODE_ALIASES, MODES, NO_CHECKPOINT, SELF_TRAINED, UNFREEZE_AFTER, add_data_args,
                     data_args, data_context, ensure_data, finetune_config, in_process, machine, mode_changes, pm, pretrain_folder, pretrain_once,
                     pseudo_csv, report, run_finetune, run_name, self_trained, tag, test_row)

__all__ = ['efficiency', 'summarise', 'verdict_lines', 'efficiency_table', 'efficiency_plot', 'add_parser']


def efficiency(out: Path, data: Path, *, patients: int = 250, native: int = 256, fractions=(.02, .1, 1.), modes=GRID_MODES,
               seeds=(0, 1, 2), epochs: int = 30, pretrain_epochs: int = 10, bs: int = 16, pretexts=('masked',), context: int | None = None,
               neighbours: int = 10, jobs: int = 1, report_only: bool = False, precision: str = 'auto',
               code_channels: tuple | None = None, backbone: str = 'resnet', backbone_weights: Path | None = None,
               unfreeze_after: int = UNFREEZE_AFTER, carry_weight: float = CARRY_WEIGHT, pseudo_fp: float = PSEUDO_FP, pseudo_weight: float = FinetuneConfig.pseudo_weight,
               rounds: int = 1) -> dict:
    """One pretraining per pretext, then every (label fraction, seed, mode, pretext) fine-tune with the
    same epoch budget (small label sets are repeated to the full training set's length per epoch, so
    every run takes the same number of steps); a seed fixes the label subset and the initialisation,
    shared by every mode. Reports test FROC (mean sensitivity over 0.5-4 FPs per slice) and the top
    box's hit@0.5 as mean and 95% interval over the seeds beside the mean-box baseline, validation
    FROC likewise, and each pretrained mode's paired difference from scratch. The pretrained mode
    that the verdict names is chosen on validation. With `jobs` > 1 the runs go to that many processes
    (a GPU machine with many cores); with `report_only` nothing trains and finished runs are reported.
    `precision` goes to every pretraining and fine-tune (auto: bf16 on a GPU); `code_channels` to every
    pretraining (its folder and runs named after them, e.g. `_code64-8-4-4`). `backbone` (a timm model)
    is the body of every pretraining and run (named after it); the `imagenet` mode fine-tunes it from
    `backbone_weights` with every layer training, the transfer-learning baseline, and is skipped with a
    note without them. The modes that use the unlabelled slices otherwise: the `-ft` modes unfreeze
    after `unfreeze_after` frozen epochs (fastai's fine_tune), `carry` carries the labels to the
    neighbour slices at `carry_weight`, `selftrain` and `selftrain-ae` train on the labels and the
    pseudo-labels (at `pseudo_weight`) the scratch run of their fraction and seed gives at `pseudo_fp`
    validation false positives per slice (`OUT/pseudo/`), from scratch or from the autoencoder; with
    `rounds` > 1 each round's student (`..._rounds<k>`, round 1 the plain name) teaches the next."""
    from concurrent.futures import ProcessPoolExecutor
    modes = [MODE_ALIASES.get(m, m) for m in modes]
    if not report_only: ensure_data(data, patients, native, neighbours, workers=max(1, jobs))
    if context is None:                        # every run sees the same input: the data's default, resolved once
        context = data_context(data) if (Path(data) / 'DL_info.csv').exists() else 0
    # each pretext's PretrainConfig changes (the default 'masked' keeps the plain out/pretrain folder)
    if 'imagenet' in modes and not backbone_weights:
        log.info("mode imagenet skipped: it needs --backbone NAME --backbone-weights PATH (a timm model's ImageNet weights)")
        modes = [m for m in modes if m != 'imagenet']
    if any(m in SELF_TRAINED for m in modes) and 'scratch' not in modes:
        raise ValueError("the selftrain modes learn from the scratch run of their label fraction and seed: add scratch to --modes")
    code = {'code_channels': tuple(code_channels)} if code_channels else {}
    body = {'backbone': backbone} if backbone != 'resnet' else {}
    pre = {p: {**({'pretext': p} if p != 'masked' else {}), 'context': context, **code, **body} for p in pretexts}
    ckpts = {p: pretrain_folder(out, c) / 'pretrained.pth' for p, c in pre.items()}
    speed = {} if precision == 'auto' else {'precision': precision}
    pre = {p: {**c, **speed} for p, c in pre.items()}
    todo = []                                  # in priority order: fraction, seed, then mode and pretext
    for frac in fractions:
        for seed in seeds:
            for mode in modes:
                for p in (['-'] if mode in NO_CHECKPOINT else pretexts):
                    name = run_name(mode, frac, seed, context) + ('' if p in ('-', 'masked') else f'_{p}')
                    name += (tag(code) if p != '-' else '') + (f'_{backbone}' if body else '')
                    name += f'_rounds{rounds}' if mode in SELF_TRAINED and rounds > 1 else ''
                    changes = {**({'context': context} if mode in NO_CHECKPOINT else {}), **speed, **body,
                               **({'backbone_weights': Path(backbone_weights)} if mode == 'imagenet' else {}),
                               **mode_changes(mode, unfreeze_after, carry_weight),
                               **({'pseudo_labels': pseudo_csv(out, frac, seed, context, pseudo_fp),
                                   'pseudo_weight': pseudo_weight} if mode in SELF_TRAINED else {})}
                    cfg = finetune_config(data, out / 'runs' / name, mode, frac, seed, epochs, bs, ckpts.get(p), changes)
                    todo.append((p, mode, frac, seed, cfg))
    order = {k: i for i, k in enumerate(dict.fromkeys((t[2], t[3]) for t in todo))}
    todo.sort(key=lambda t: (order[t[2], t[3]], t[1] in SELF_TRAINED))     # a student after its teacher
    teachers = {(frac, seed): cfg for _, mode, frac, seed, cfg in todo if mode == 'scratch'}

    def pseudo(cfg):                           # a student's pseudo-labels: from its scratch teacher (round 1's made once for both students)
        base = Path(cfg.out).name.removesuffix(f'_rounds{rounds}')
        return self_trained(teachers[cfg.label_fraction, cfg.seed], cfg, pseudo_fp, rounds,
                            lambda k: out / 'runs' / (base + ('' if k == 1 else f'_rounds{k}')))

    if report_only:
        todo = [t for t in todo if (Path(t[4].out) / 'metrics.json').exists()]
        results = [run_finetune(t[4], any_precision=True) for t in todo]
    elif jobs > 1:
        threads = max(1, mp.cpu_count() // jobs)
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context('spawn')) as pool:
            pretraining = {p: pool.submit(in_process, threads, pretrain_once, data, ckpts[p].parent, pretrain_epochs, bs, pre[p])
                           for p in pretexts if any(m not in NO_CHECKPOINT for m in modes)}
            first = {i: pool.submit(in_process, threads, run_finetune, t[4]) for i, t in enumerate(todo)
                     if t[1] in NO_CHECKPOINT and t[1] not in SELF_TRAINED}
            for f in pretraining.values(): f.result()
            rest = {i: pool.submit(in_process, threads, run_finetune, t[4]) for i, t in enumerate(todo)
                    if t[1] not in NO_CHECKPOINT and t[1] not in SELF_TRAINED}
            for f in first.values(): f.result()           # the teachers of the self-trained students
            students = {i: pool.submit(in_process, threads, run_finetune, pseudo(t[4])) for i, t in enumerate(todo) if t[1] in SELF_TRAINED}
            results = [{**first, **rest, **students}[i].result() for i in range(len(todo))]
    else:
        for p in pretexts:
            if any(m not in NO_CHECKPOINT for m in modes): pretrain_once(data, ckpts[p].parent, pretrain_epochs, bs, pre[p])
        results = []
        for p, mode, frac, seed, cfg in todo:
            if not (Path(cfg.out) / 'metrics.json').exists(): log.info(f"\n== {mode}{'' if p == '-' else f' ({p} pretext)'}, label fraction {frac:g}, seed {seed}")
            results.append(run_finetune(pseudo(cfg) if mode in SELF_TRAINED else cfg))
    rows = [test_row(m, mode=mode if p == '-' else f'{mode} [{p}{tag(code)}]', fraction=frac, seed=seed)
            for (p, mode, frac, seed, _), m in zip(todo, results)]
    if not rows:
        log.info(f"no finished runs in {out / 'runs'} for these settings: nothing to report")
        return {'rows': [], 'summary': [], 'verdict': []}
    summary = summarise(rows)
    verdict = verdict_lines(summary)
    result = {'rows': rows, 'summary': summary, 'verdict': verdict, 'machine': machine(),
              'settings': dict(data=str(data), patients=patients, native=native, fractions=list(fractions), modes=list(modes),
                               pretexts=list(pretexts), context=context, neighbours=neighbours, seeds=list(seeds), epochs=epochs,
                               pretrain_epochs=pretrain_epochs, bs=bs, backbone=backbone,
                               backbone_weights=str(backbone_weights) if backbone_weights else None, unfreeze_after=unfreeze_after,
                               carry_weight=carry_weight, pseudo_fp=pseudo_fp, pseudo_weight=pseudo_weight, rounds=rounds)}
    plot = efficiency_plot(summary, out / 'data_efficiency.png')
    table = efficiency_table(summary)
    report(out, 'efficiency', result, table, verdict, [plot, out / 'report.html'])
    header, table_rows = markdown_table(table)
    summary_report(out / 'report.html', 'lesion_fastai: data efficiency', f"Test FROC over seeds {', '.join(map(str, seeds))} per label "
                   f"fraction and mode, each mode's paired difference from scratch (95% intervals), the modes chosen on validation. "
                   f"{machine()}.", tables=[('Every cell', header, table_rows)], notes=verdict,
                   figures=[('Test FROC and the top box against the labels', plot, 'error bars: 95% interval over seeds')])
    return result


MIN_SEEDS = 3   # two seeds give an interval from one degree of freedom: two equal differences would look certain


def verdict_lines(summary) -> list[str]:
    """Per label fraction: the pretraining mode with the best validation FROC and each other way of
    using the unlabelled slices (carried labels, self-training), with its paired test difference
    from scratch, resolved only with at least `MIN_SEEDS` pairs and a 95% interval that excludes 0."""
    lines = []
    for frac in sorted(dict.fromkeys(s['fraction'] for s in summary)):
        cells = [s for s in summary if s['fraction'] == frac and s['mode'] != 'scratch' and 'diff' in s]
        pretrained = [s for s in cells if s['mode'].split(' [')[0] not in METHODS]
        chosen = ([('best pretrained mode on validation is ', max(pretrained, key=lambda s: s['valid_froc']))] if pretrained else [])
        chosen += [(f'{METHODS[s["mode"].split(" [")[0]]}: ', s) for s in cells if s['mode'].split(' [')[0] in METHODS]
        for what, best in chosen:
            d, ci = best['diff'], best['diff_ci']
            if best['pairs'] < MIN_SEEDS: word = f"{best['pairs']} paired seed(s), fewer than the {MIN_SEEDS} an interval needs here: not resolved"
            else: word = 'no difference resolved' if abs(d) <= ci else 'better than scratch' if d > 0 else 'worse than scratch'
            lines.append(f"labels {frac:g}: {what}{best['mode']} (validation FROC {pm(best['valid_froc'], best['valid_ci'])}); "
                         f"test FROC {pm(best['froc'], best['froc_ci'])}, paired difference from scratch {pm(d, ci)}: {word}")
    return lines


# the ways of using the unlabelled slices other than pretraining, each reported against scratch on its own
METHODS = {'carry': 'labels carried to neighbour slices', 'selftrain': 'self-training from scratch',
           'selftrain-ae': 'self-training from the autoencoder'}


def summarise(rows):
    """Mean over seeds of each (mode, fraction) cell, with 95% intervals of the FROC score, the top-box hit
    rate and the validation FROC, and (pretrained modes) the paired test FROC difference from scratch
    over the seeds both have."""
    out = []
    for mode in dict.fromkeys(r['mode'] for r in rows):
        for frac in dict.fromkeys(r['fraction'] for r in rows):
            sel = [r for r in rows if r['mode'] == mode and r['fraction'] == frac]
            if not sel: continue
            agg = {k: float(np.mean([r[k] for r in sel])) for k in ('froc', 'sens@4', 'hit@0.5', 'mean_iou', 'centre_error_mm', 'valid_froc',
                                                                     'baseline_froc', 'baseline_hit@0.5', 'baseline_mean_iou', 'time_s')}
            n = sorted({r['train_slices'] for r in sel})            # a seed draws its own label subset
            precisions = {p: sum(r.get('precision', 'fp32') == p for r in sel) for p in sorted({r.get('precision', 'fp32') for r in sel})}
            agg.update(mode=mode, fraction=frac, seeds=len(sel), precision=', '.join(f'{n} {p}' for p, n in precisions.items()), train_slices=n[0] if len(n) == 1 else f'{n[0]}-{n[-1]}', n_test=sel[0]['n_test'],
                       froc_ci=mean_ci([r['froc'] for r in sel])[1], hit_ci=mean_ci([r['hit@0.5'] for r in sel])[1],
                       valid_ci=mean_ci([r['valid_froc'] for r in sel])[1])
            scratch = {r['seed']: r['froc'] for r in rows if r['mode'] == 'scratch' and r['fraction'] == frac}
            paired = [r['froc'] - scratch[r['seed']] for r in sel if r['seed'] in scratch]
            if mode != 'scratch' and paired: agg['diff'], agg['diff_ci'], agg['pairs'] = *mean_ci(paired), len(paired)
            out.append(agg)
    return out


def _mode_order(mode: str):
    base = mode.split(' [')[0]
    return (list(MODES).index(base) if base in MODES else 9, mode)


def efficiency_table(summary) -> str:
    lines = ['| labels (fraction of training patients) | labeled slices | mode [pretext] | test FROC, mean 0.5-4 FPs | paired difference from scratch | '
             'sensitivity at 4 FPs | top box hit@0.5 | validation FROC | mean box FROC / hit@0.5 | seeds (trained in) |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for s in sorted(summary, key=lambda s: (s['fraction'], _mode_order(s['mode']))):
        diff = pm(s['diff'], s['diff_ci']) if 'diff' in s else ''
        lines.append(f"| {s['fraction']:g} | {s['train_slices']} | {s['mode']} | {pm(s['froc'], s['froc_ci'])} | {diff} | {s['sens@4']:.3f} | "
                     f"{pm(s['hit@0.5'], s['hit_ci'])} | {pm(s['valid_froc'], s['valid_ci'])} | {s['baseline_froc']:.3f} / {s['baseline_hit@0.5']:.3f} | {s.get('precision', s['seeds'])} |")
    return '\n'.join(lines)


def efficiency_plot(summary, path):
    fig, axs = plt.subplots(1, 2, figsize=(12, 4), layout='constrained')
    for ax, key, ci, base, label in ((axs[0], 'froc', 'froc_ci', 'baseline_froc', 'test FROC, mean sensitivity 0.5-4 FPs'),
                                     (axs[1], 'hit@0.5', 'hit_ci', 'baseline_hit@0.5', 'test top box hit@0.5')):
        modes = sorted(dict.fromkeys(s['mode'] for s in summary), key=_mode_order)
        for i, mode in enumerate(modes):
            pts = sorted((s['fraction'], s[key], 0 if np.isnan(s[ci]) else s[ci]) for s in summary if s['mode'] == mode)
            f, m, e = zip(*pts)
            shift = 1.06 ** (i - (len(modes) - 1) / 2)             # side by side, so the error bars stay readable
            ax.errorbar([x * shift for x in f], m, yerr=e, marker='o', capsize=3, label=mode)
        b = sorted((s['fraction'], s[base]) for s in summary if s['mode'] == summary[0]['mode'])
        ax.plot(*zip(*b), ls='--', color='gray', label='mean box')
        ax.set_xscale('log'); ax.set_xlabel('fraction of labeled training patients'); ax.set_ylabel(label)
        ax.set_ylim(0, min(1, 1.15 * max(s[key] + (0 if np.isnan(s[ci]) else s[ci]) for s in summary) + .02))  # intervals of 2 seeds run far
        ax.grid(alpha=.3)
    axs[1].legend(loc='upper left', bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.suptitle('data efficiency on synthetic DeepLesion-layout data (error bars: 95% interval over seeds)')
    return save_fig(fig, path)


def add_parser(sub) -> None:
    e = sub.add_parser('efficiency', help='data efficiency: label fractions x freeze modes', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(e, 'output folder', 'a few-minute smoke run: 40 patients, 2 fractions, 2 epochs, one seed')
    e.add_argument('--fractions', type=parse_floats, default='0.02,0.1,1', help='label fractions of training patients (runs go in this order)')
    e.add_argument('--modes', default=','.join(GRID_MODES), help=f"scratch and pretrained modes to compare, of {', '.join(MODES)} "
                   "(sandwich: transfer layers between the frozen encoder's stages; decoder-sandwich: 3FabRec's, between the frozen "
                   "decoder's blocks; encoder: only the head trains; full: every layer trains from the pretrained encoder, old name none; "
                   "the -ft modes unfreeze after --unfreeze-after epochs; carry: scratch with labels carried to the neighbour slices; "
                   "selftrain, selftrain-ae: the scratch run's pseudo-labels, the student from scratch or from the autoencoder)")
    e.add_argument('--pretexts', default='masked', help=f"pretraining pretexts ({', '.join(PRETEXTS)}), one pretraining each")
    e.add_argument('--context', type=int, default=None, help=f'neighbour slices on each side as input channels, for every run (context pretext: 1 or more; '
                   f'default {DEFAULT_CONTEXT} where the data ships neighbour slices, else 0)')
    e.add_argument('--neighbours', type=int, default=10, help='unlabelled slices the generator writes on each side of a key slice '
                   '(10: 20 unlabelled slices per labelled one)')
    e.add_argument('--seeds', type=parse_ints, default='0,1,2', help='seeds, comma separated (label subset and initialisation)')
    e.add_argument('--epochs', type=int, default=30, help='fine-tuning epochs, the same for every run')
    e.add_argument('--jobs', type=int, default=1, help='runs in parallel processes (a GPU machine with many cores)')
    e.add_argument('--report-only', action='store_true', help='train nothing: report the runs that finished')
    e.add_argument('--backbone', default='resnet', help='the body of every pretraining and run: resnet or a timm model name')
    e.add_argument('--backbone-weights', type=Path, default=None, help="a local state dict of the timm --backbone (ImageNet weights): "
                   "the imagenet mode fine-tunes from it, every layer training (skipped with a note without it)")
    e.add_argument('--code-channels', type=parse_ints, default=None, help="the autoencoder's codes of every pretraining, as python -m "
                   "pretrain --code-channels (e.g. 64,8,4,4 adds a stride-4 code; default: pretrain's)")
    e.add_argument('--unfreeze-after', type=int, default=UNFREEZE_AFTER, help='the -ft modes: frozen epochs before every layer trains (fastai fine_tune)')
    e.add_argument('--carry-weight', type=float, default=CARRY_WEIGHT, help='the carry mode: weight of the labels carried to neighbour slices')
    e.add_argument('--pseudo-fp', type=float, default=PSEUDO_FP, help="the selftrain modes: the teacher's boxes scoring at least its score at "
                   'this many false positives per validation slice are pseudo-labels')
    e.add_argument('--pseudo-weight', type=float, default=FinetuneConfig.pseudo_weight, help='the selftrain modes: weight of the pseudo-labels')
    e.add_argument('--rounds', type=int, default=1, help="the selftrain modes: rounds of self-training, each round's student the next "
                   "round's teacher (the earlier rounds' students are runs of their own)")
    e.set_defaults(run=_run)


def _run(ap, args) -> dict:
    if args.quick: args.seeds, args.neighbours = (0,), 2
    data = data_args(args, args.neighbours)
    modes = [MODE_ALIASES.get(m, m) for m in args.modes.split(',') if m]
    bad = [m for m in modes if m not in MODES]
    if bad: ap.error(f"--modes: unknown {bad}, expected some of {', '.join(MODES)}")
    pretexts = [p for p in args.pretexts.split(',') if p]
    bad = [p for p in pretexts if p not in PRETEXTS]
    if bad or not pretexts: ap.error(f"--pretexts: unknown {bad}, expected some of {', '.join(PRETEXTS)}")
    if 'context' in pretexts and args.context is not None and args.context < 1: ap.error('--pretexts context needs --context 1 or more')
    if args.jobs < 1: ap.error(f'--jobs must be at least 1, got {args.jobs}')
    if args.rounds < 1: ap.error(f'--rounds must be at least 1, got {args.rounds}')
    if args.pseudo_fp <= 0: ap.error(f'--pseudo-fp must be positive, got {args.pseudo_fp:g}')
    if args.code_channels is not None:
        try: PretrainConfig(data='.', out='.', code_channels=args.code_channels)
        except ValueError as e: ap.error(str(e))
    fractions = (.1, 1.) if args.quick else args.fractions
    return efficiency(args.out, data, patients=args.patients, native=args.native, fractions=fractions, modes=modes, seeds=args.seeds,
                      epochs=args.epochs, pretrain_epochs=args.pretrain_epochs, bs=args.bs, pretexts=pretexts, context=args.context,
                      neighbours=args.neighbours, jobs=args.jobs, report_only=args.report_only, precision=args.precision,
                      code_channels=args.code_channels, backbone=args.backbone, backbone_weights=args.backbone_weights,
                      unfreeze_after=args.unfreeze_after, carry_weight=args.carry_weight, pseudo_fp=args.pseudo_fp,
                      pseudo_weight=args.pseudo_weight, rounds=args.rounds)
