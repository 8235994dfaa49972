"""Does pretraining need fewer labels? One pretraining per pretext, then every (label fraction, seed,
mode, pretext) fine-tune with the same budget, test FROC and the top box beside the mean box, each
pretrained mode's paired difference from scratch with its 95% interval, and a verdict per fraction
for the mode chosen on validation (never on test).

    python -m lesion_fastai.bench efficiency --fractions 0.1 --seeds 0,1,2 --modes scratch,sandwich
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..config import (DEFAULT_CONTEXT, PRETEXTS, PSEUDO_FP, FinetuneConfig, PretrainConfig, SettingError, from_args, option, parse_floats,
                      parse_ints)
from ..log import log
from ..plots import plt, save_fig
from ..report import markdown_table, summary_report
from ..stats import mean_ci
from .common import (CARRY_WEIGHT, CONTROL, EPOCHS, GRID_MODES, GROUP, MODE_ALIASES, MODES, NO_CHECKPOINT, SEEDS, SELF_TRAINED, UNFREEZE_AFTER,
                     BenchSettings, add_bench_settings, data_context, data_folder, default_of, ensure_data, finetune_config, machine,
                     control_changes, mode_changes, pm, precision_change, pretext_changes, pretext_tag, pretraining, pseudo_csv, quick, report,
                     run_name, tag, test_row, unknown)
from .grid import Run, read_grid, run_grid

__all__ = ['EfficiencySettings', 'efficiency', 'efficiency_grid', 'summarise', 'verdict_lines', 'efficiency_table', 'efficiency_plot',
           'add_parser']


def _names(text: str) -> tuple[str, ...]:
    "'scratch,full' -> ('scratch', 'full')."
    return tuple(n for n in str(text).split(',') if n)


@dataclass(kw_only=True)
class EfficiencySettings(BenchSettings):
    """Settings of `efficiency`: which label fractions, seeds, modes and pretexts, and what the modes
    that use the unlabelled slices otherwise (the -ft modes, carry, self-training) are given."""
    quick: bool = option(False, 'a few-minute smoke run: 40 patients, 2 fractions, 2 epochs, one seed', group=GROUP)
    fractions: tuple = option((.02, .1, 1.), 'label fractions of training patients (runs go in this order)', parse=parse_floats, group=GROUP)
    modes: tuple = option(GRID_MODES, f"scratch and pretrained modes to compare, of {', '.join(MODES)} (sandwich: transfer layers between "
                          "the frozen encoder's stages; decoder-sandwich: 3FabRec's, between the frozen decoder's blocks, with the decoder skips' "
                          "path around the codes; encoder: only the "
                          "head trains; full: every layer trains from the pretrained encoder, old name none; the -ft modes unfreeze after "
                          "--unfreeze-after epochs; carry: scratch with labels carried to the neighbour slices; selftrain, selftrain-ae: the "
                          "scratch run's pseudo-labels, the student from scratch or from the autoencoder; full-scale: full from fresh weights "
                          "with each pretrained tensor's mean and std; full-k0 to full-k3: full with the stem and the first K stages "
                          "loaded, the later ones fresh)", parse=_names,
                          check=lambda v: unknown(v, tuple(MODES)), group=GROUP)
    pretexts: tuple = option(('masked',), f"pretraining pretexts ({', '.join(PRETEXTS)}), one pretraining each; {CONTROL}: the "
                             "autoencoder's checkpoint with no epochs (python -m pretrain --epochs 0), its runs from the weights scratch draws with "
                             "their seed (--pretrained-init scratch): the control every pretrained mode is read against", parse=_names, check=lambda v: unknown(v, (*PRETEXTS, CONTROL), empty_ok=False), group=GROUP)
    context: int | None = option(None, 'neighbour slices on each side as input channels, for every run (context pretext: 1 or more; '
                                 f'default {DEFAULT_CONTEXT} where the data ships neighbour slices, else 0)', at_least=0, group=GROUP)
    neighbours: int = option(10, 'unlabelled slices the generator writes on each side of a key slice (10: 20 unlabelled slices per '
                             'labelled one)', at_least=0, group=GROUP)
    seeds: tuple = option(SEEDS, 'seeds, comma separated (label subset and initialisation)', parse=parse_ints, group=GROUP)
    epochs: int = option(EPOCHS, 'fine-tuning epochs, the same for every run', at_least=1, group=GROUP)
    jobs: int = option(1, 'runs in parallel processes (a GPU machine with many cores)', at_least=1, group=GROUP)
    report_only: bool = option(False, 'train nothing: report the runs that finished', group=GROUP)
    backbone: str = option(default_of(PretrainConfig, 'backbone'), 'the body of every pretraining and run: resnet or a timm model name',
                           group=GROUP)
    backbone_weights: Path | None = option(None, "a local state dict of the timm --backbone (ImageNet weights): the imagenet mode "
                                           "fine-tunes from it, every layer training (skipped with a note without it)", group=GROUP)
    code_channels: tuple | None = option(None, "the autoencoder's codes of every pretraining, as python -m pretrain --code-channels (e.g. "
                                         "64,8,4,4 adds a stride-4 code; default: pretrain's)", parse=parse_ints,
                                         check=PretrainConfig.__dataclass_fields__['code_channels'].metadata['check'], group=GROUP)
    unfreeze_after: int = option(UNFREEZE_AFTER, 'the -ft modes: frozen epochs before every layer trains (fastai fine_tune)', at_least=0,
                                 group=GROUP)
    carry_weight: float = option(CARRY_WEIGHT, 'the carry mode: weight of the labels carried to neighbour slices', at_least=0, at_most=1,
                                 group=GROUP)
    pseudo_fp: float = option(PSEUDO_FP, "the selftrain modes: the teacher's boxes scoring at least its score at this many false "
                              'positives per validation slice are pseudo-labels', above=0, group=GROUP)
    pseudo_weight: float = option(default_of(FinetuneConfig, 'pseudo_weight'), 'the selftrain modes: weight of the pseudo-labels', above=0,
                                  at_most=1, group=GROUP)
    rounds: int = option(1, "the selftrain modes: rounds of self-training, each round's student the next round's teacher (the earlier "
                         "rounds' students are runs of their own)", at_least=1, group=GROUP)

    def __post_init__(self):
        self.modes = tuple(MODE_ALIASES.get(m, m) for m in self.modes)
        self.pretexts = tuple(self.pretexts)
        if self.backbone_weights is not None: self.backbone_weights = Path(self.backbone_weights)
        super().__post_init__()
        if 'context' in self.pretexts and self.context is not None and self.context < 1:
            raise SettingError('--pretexts context needs --context 1 or more')
        if any(m in SELF_TRAINED for m in self.modes) and 'scratch' not in self.modes:
            raise SettingError("the selftrain modes learn from the scratch run of their label fraction and seed: add scratch to --modes")


def efficiency(s: EfficiencySettings) -> dict:
    """One pretraining per pretext, then every (label fraction, seed, mode, pretext) fine-tune with the
    same epoch budget (small label sets are repeated to the full training set's length per epoch, so
    every run takes the same number of steps); a seed fixes the label subset and the initialisation,
    shared by every mode. Reports test FROC (mean sensitivity over 0.5-4 FPs per slice) and the top
    box's hit@0.5 as mean and 95% interval over the seeds beside the mean-box baseline, validation
    FROC likewise, and each pretrained mode's paired difference from scratch. The pretrained mode
    that the verdict names is chosen on validation. With --report-only nothing trains and the
    finished runs are reported. `EfficiencySettings` says what each mode is given; the `imagenet`
    mode, the transfer-learning baseline, is skipped with a note without --backbone-weights."""
    s = quick(s, seeds=(0,), neighbours=2, fractions=(.1, 1.))
    data = data_folder(s, s.neighbours)
    if not s.report_only: ensure_data(data, s.patients, s.native, s.neighbours, workers=max(1, s.jobs))
    if s.context is None:                      # every run sees the same input: the data's default, resolved once
        s = replace(s, context=data_context(data) if (Path(data) / 'DL_info.csv').exists() else 0)
    if 'imagenet' in s.modes and not s.backbone_weights:
        log.info("mode imagenet skipped: it needs --backbone NAME --backbone-weights PATH (a timm model's ImageNet weights)")
        s = replace(s, modes=tuple(m for m in s.modes if m != 'imagenet'))
    runs = efficiency_grid(s, data)
    runs, results = read_grid(runs) if s.report_only else (runs, run_grid(runs, s.jobs))
    rows = [test_row(m, **r.row) for r, m in zip(runs, results)]
    if not rows:
        log.info(f"no finished runs in {s.out / 'runs'} for these settings: nothing to report")
        return {'rows': [], 'summary': [], 'verdict': []}
    return _report(s, data, rows)


def efficiency_grid(s: EfficiencySettings, data: Path) -> list[Run]:
    """Every (label fraction, seed, mode, pretext) fine-tune of `s` (its context resolved), in priority
    order: fraction, seed, then mode and pretext, a self-trained student after the other runs of its
    fraction and seed."""
    runs = [_run(s, data, frac, seed, mode, p) for frac in s.fractions for seed in s.seeds for mode in s.modes
            for p in (['-'] if mode in NO_CHECKPOINT else s.pretexts)]
    cells = {k: i for i, k in enumerate(dict.fromkeys((r.cfg.label_fraction, r.cfg.seed) for r in runs))}
    return sorted(runs, key=lambda r: (cells[r.cfg.label_fraction, r.cfg.seed], r.teacher is not None))


def _pretraining_changes(s: EfficiencySettings, pretext: str) -> dict:
    "A pretext's PretrainConfig changes (`pretext_changes`), with --context, --code-channels and --backbone."
    return {**pretext_changes(pretext), 'context': s.context, **_code(s), **_body(s)}


def _code(s) -> dict:
    "--code-channels as a pretraining change (named in the folders), none for pretrain's."
    return {'code_channels': tuple(s.code_channels)} if s.code_channels else {}


def _body(s) -> dict:
    "--backbone as a change of every pretraining and run (named in the folders), none for the project's resnet."
    return {'backbone': s.backbone} if s.backbone != default_of(PretrainConfig, 'backbone') else {}


def _run(s: EfficiencySettings, data: Path, frac: float, seed: int, mode: str, p: str) -> Run:
    """The run of a mode at a label fraction and seed, from the pretraining of pretext `p` ('-': none); a
    self-trained student's teacher is the scratch run of its fraction and seed."""
    name = run_name(mode, frac, seed, s.context) + pretext_tag(p)
    name += (tag(_code(s)) if p != '-' else '') + (f'_{s.backbone}' if _body(s) else '')
    taught = mode in SELF_TRAINED
    name += f'_rounds{s.rounds}' if taught and s.rounds > 1 else ''
    pre = None if p == '-' else pretraining(s.out, data, s.pretrain_epochs, s.bs, {**_pretraining_changes(s, p), **precision_change(s)})
    changes = {**({'context': s.context} if mode in NO_CHECKPOINT else {}), **precision_change(s), **_body(s),
               **({'backbone_weights': Path(s.backbone_weights)} if mode == 'imagenet' else {}),
               **control_changes(p, mode), **mode_changes(mode, s.unfreeze_after, s.carry_weight),
               **({'pseudo_labels': pseudo_csv(s.out, frac, seed, s.context, s.pseudo_fp), 'pseudo_weight': s.pseudo_weight} if taught else {})}
    cfg = finetune_config(data, s.out / 'runs' / name, mode, frac, seed, s.epochs, s.bs, pre and Path(pre.out) / 'pretrained.pth', changes)
    base = name.removesuffix(f'_rounds{s.rounds}')
    earlier = tuple(s.out / 'runs' / (base + ('' if k == 1 else f'_rounds{k}')) for k in range(1, s.rounds)) if taught else ()
    return Run(cfg, title=f"{mode}{'' if p == '-' else f' ({p} pretext)'}, label fraction {frac:g}, seed {seed}",
               row=dict(mode=mode if p == '-' else f'{mode} [{p}{tag(_code(s))}]', fraction=frac, seed=seed), pretrain=pre,
               teacher=_run(s, data, frac, seed, 'scratch', '-').cfg if taught else None, fp=s.pseudo_fp if taught else None, earlier=earlier)


def _report(s: EfficiencySettings, data: Path, rows: list) -> dict:
    "The summary, verdict, table, plot and HTML report of the rows."
    summary = summarise(rows)
    verdict = verdict_lines(summary)
    result = {'rows': rows, 'summary': summary, 'verdict': verdict, 'machine': machine(),
              'settings': dict(data=str(data), patients=s.patients, native=s.native, fractions=list(s.fractions), modes=list(s.modes),
                               pretexts=list(s.pretexts), context=s.context, neighbours=s.neighbours, seeds=list(s.seeds), epochs=s.epochs,
                               pretrain_epochs=s.pretrain_epochs, bs=s.bs, backbone=s.backbone,
                               backbone_weights=str(s.backbone_weights) if s.backbone_weights else None, unfreeze_after=s.unfreeze_after,
                               carry_weight=s.carry_weight, pseudo_fp=s.pseudo_fp, pseudo_weight=s.pseudo_weight, rounds=s.rounds)}
    plot = efficiency_plot(summary, s.out / 'data_efficiency.png')
    table = efficiency_table(summary)
    report(s.out, 'efficiency', result, table, verdict, [plot, s.out / 'report.html'])
    header, table_rows = markdown_table(table)
    summary_report(s.out / 'report.html', 'lesion_fastai: data efficiency', f"Test FROC over seeds {', '.join(map(str, s.seeds))} per label "
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
        control = [s for s in cells if f'[{CONTROL}' in s['mode'] or s['mode'].startswith('full-scale ')]   # the scale-only start too
        pretrained = [s for s in cells if s['mode'].split(' [')[0] not in METHODS and s not in control]
        chosen = ([('best pretrained mode on validation is ', max(pretrained, key=lambda s: s['valid_froc']))] if pretrained else [])
        chosen += [('control (the untrained checkpoint, which should tie scratch): ' if f'[{CONTROL}' in s['mode'] else
                    "scale-only control (fresh weights with the pretrained weights' scale): ", s) for s in control]
        chosen += [(f'{METHODS[s["mode"].split(" [")[0]]}: ', s) for s in cells if s['mode'].split(' [')[0] in METHODS]
        for what, best in chosen:
            d, ci = best['diff'], best['diff_ci']
            if best['pairs'] < MIN_SEEDS: word = f"{best['pairs']} paired seed(s), fewer than the {MIN_SEEDS} an interval needs here: not resolved"
            else: word = 'no difference resolved' if abs(d) <= ci else 'better than scratch' if d > 0 else 'worse than scratch'
            line = (f"labels {frac:g}: {what}{best['mode']} (validation FROC {pm(best['valid_froc'], best['valid_ci'])}); "
                    f"test FROC {pm(best['froc'], best['froc_ci'])}, paired difference from scratch {pm(d, ci)}: {word}")
            if 'diff_control' in best:
                d, ci = best['diff_control'], best['diff_control_ci']
                line += (f"; from its control {_control_of(best['mode'])} {pm(d, ci)}: "
                         + ('not resolved' if best['control_pairs'] < MIN_SEEDS else 'no difference resolved' if abs(d) <= ci
                            else 'better than the control' if d > 0 else 'worse than the control'))
            lines.append(line)
    return lines


def _control_of(mode: str) -> str | None:
    "The row of a pretrained mode's control: the same mode from the untrained checkpoint (`full [masked]` -> `full [untrained]`)."
    if ' [' not in mode or f'[{CONTROL}' in mode: return None
    base, pretext = mode.split(' [', 1)
    return f"{base} [{CONTROL}{pretext[len(pretext.split('_')[0].rstrip(']')):]}"


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
            control = {r['seed']: r['froc'] for r in rows if r['fraction'] == frac and _control_of(mode) == r['mode']}
            paired = [r['froc'] - control[r['seed']] for r in sel if r['seed'] in control]
            if paired: agg['diff_control'], agg['diff_control_ci'], agg['control_pairs'] = *mean_ci(paired), len(paired)
            out.append(agg)
    return out


def _mode_order(mode: str):
    base = mode.split(' [')[0]
    return (list(MODES).index(base) if base in MODES else 9, mode)


def efficiency_table(summary) -> str:
    lines = ['| labels (fraction of training patients) | labeled slices | mode [pretext] | test FROC, mean 0.5-4 FPs | paired difference from scratch | '
             'paired difference from the control | sensitivity at 4 FPs | top box hit@0.5 | validation FROC | mean box FROC / hit@0.5 | seeds (trained in) |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for s in sorted(summary, key=lambda s: (s['fraction'], _mode_order(s['mode']))):
        diff = pm(s['diff'], s['diff_ci']) if 'diff' in s else ''
        diff_control = pm(s['diff_control'], s['diff_control_ci']) if 'diff_control' in s else ''
        lines.append(f"| {s['fraction']:g} | {s['train_slices']} | {s['mode']} | {pm(s['froc'], s['froc_ci'])} | {diff} | {diff_control} | {s['sens@4']:.3f} | "
                     f"{pm(s['hit@0.5'], s['hit_ci'])} | {pm(s['valid_froc'], s['valid_ci'])} | {s['baseline_froc']:.3f} / {s['baseline_hit@0.5']:.3f} | {s.get('precision', s['seeds'])} |")
    return '\n'.join(lines)


def efficiency_plot(summary, path):
    fig, axs = plt.subplots(1, 2, figsize=(12, 4), layout='constrained')
    modes = sorted(dict.fromkeys(s['mode'] for s in summary), key=_mode_order)
    fractions = sorted({s['fraction'] for s in summary})               # ticks at the grid's fractions, not at powers of 10
    for ax, key, ci, base, label in ((axs[0], 'froc', 'froc_ci', 'baseline_froc', 'test FROC, mean sensitivity 0.5-4 FPs'),
                                     (axs[1], 'hit@0.5', 'hit_ci', 'baseline_hit@0.5', 'test top box hit@0.5')):
        for i, mode in enumerate(modes):
            pts = sorted((s['fraction'], s[key], 0 if np.isnan(s[ci]) else s[ci]) for s in summary if s['mode'] == mode)
            f, m, e = zip(*pts)
            shift = 1.06 ** (i - (len(modes) - 1) / 2)             # side by side, so the error bars stay readable
            ax.errorbar([x * shift for x in f], m, yerr=e, marker='o', capsize=3, label=mode)
        b = sorted((s['fraction'], s[base]) for s in summary if s['mode'] == summary[0]['mode'])
        ax.plot(*zip(*b), ls='--', color='gray', label='mean box')
        ax.set_xscale('log'); ax.set_xlabel('labeled training patients'); ax.set_ylabel(label)
        ax.set_xticks(fractions, [f'{100 * f:g}%' for f in fractions]); ax.minorticks_off()
        ax.set_ylim(0, min(1, 1.15 * max(s[key] + (0 if np.isnan(s[ci]) else s[ci]) for s in summary) + .02))  # intervals of 2 seeds run far
        ax.grid(alpha=.3)
    axs[1].legend(loc='upper left', bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.suptitle('data efficiency on synthetic DeepLesion-layout data (error bars: 95% interval over seeds)')
    return save_fig(fig, path)


def add_parser(sub) -> None:
    p = sub.add_parser('efficiency', help='data efficiency: label fractions x freeze modes', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_settings(p, EfficiencySettings)
    p.set_defaults(run=lambda ap, args: efficiency(from_args(EfficiencySettings, ap, args)))
