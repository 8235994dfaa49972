"""Benchmarks: figures printed beside their baselines, results written as JSON, Markdown and plots.

    python -m lesion_fastai.bench efficiency [--quick]   # label fractions x {scratch, none, sandwich, decoder-sandwich} x seeds
    python -m lesion_fastai.bench study [--quick]        # why the sandwich does (not) match: one change at a time
    python -m lesion_fastai.bench select --setting adapter_ratio --values 0.25,1   # a default, chosen on validation
    python -m lesion_fastai.bench throughput [--quick]   # slice loading and training images/s, peak memory
    python -m lesion_fastai.bench gpu                    # the GPU path: bf16 training, inference, loaders (make gpu-check)
    python -m lesion_fastai.bench scale                  # the disk slice cache from 5,000 to 50,000 slices, extrapolated to 930k
    python -m lesion_fastai.bench stats                  # the built-in data's lesion statistics beside DeepLesion's
    python -m lesion_fastai.bench lesions --pretrained CKPT --data DATA   # does the autoencoder keep the lesions?

Both resume: finished runs are kept (their metrics.json) and skipped when the command is run again.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import queue
import resource
import time
from pathlib import Path

import numpy as np

from .files import atomic_write_text

__all__ = ['efficiency', 'study', 'select', 'lesions', 'throughput', 'gpu_check', 'scale', 'main']

# bench mode -> (FinetuneConfig.freeze, FinetuneConfig.sandwich)
MODES = {'scratch': ('scratch', 'encoder'), 'none': ('none', 'encoder'), 'encoder': ('encoder', 'encoder'),
         'sandwich': ('sandwich', 'encoder'), 'decoder-sandwich': ('sandwich', 'decoder'), 'imagenet': ('none', 'encoder')}
GRID_MODES = ('scratch', 'none', 'sandwich', 'decoder-sandwich', 'imagenet')
NO_CHECKPOINT = ('scratch', 'imagenet')   # modes that do not start from the autoencoder: imagenet is --backbone-weights' transfer


def _machine() -> str:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'
    return f"{platform.machine()}, {mp.cpu_count()} CPU cores, torch {torch.__version__}, {gpu}"


# --- data efficiency -----------------------------------------------------------------------------------------

def _generate(data: Path, patients: int, native: int, neighbours: int = 2, workers: int = 1) -> None:
    "The benchmark's synthetic data, generated once (seed 1)."
    from .synthetic import generate
    if not (data / 'DL_info.csv').exists():
        print(f"generating {patients} synthetic patients at {native} px, {neighbours} unlabelled slices on each side of a key slice, in {data}")
        generate(data, patients=patients, size=native, seed=1, neighbours=neighbours, workers=workers)


def _tag(changes: dict | None) -> str:
    "Pretraining changes as a name: _context2_pretextcontext, _code64-8-4-4."
    short = lambda k, v: ('code', '-'.join(map(str, v))) if k == 'code_channels' else (k, v)
    return ''.join('_{}{}'.format(*short(k, v)) for k, v in sorted((changes or {}).items()))


def _pretrain_folder(out: Path, changes: dict | None) -> Path:
    return out / ('pretrain' + _tag(changes))


def _pretrain_once(data: Path, folder: Path, pretrain_epochs: int, bs: int, changes: dict | None = None) -> Path:
    from .train import PretrainConfig, pretrain
    ckpt = folder / 'pretrained.pth'
    if not ckpt.exists():
        pretrain(PretrainConfig(**{**dict(data=data, out=folder, epochs=pretrain_epochs, bs=bs, resume=True), **(changes or {})}))
    return ckpt


def _prepare(out: Path, data: Path, patients: int, native: int, pretrain_epochs: int, bs: int,
             pretrain_changes: dict | None = None) -> Path:
    """The benchmark's data (generated once) and its autoencoder pretraining (`out/pretrain`, or
    `out/pretrain_<changes>` for a pretraining with other settings); returns the checkpoint."""
    _generate(data, patients, native)
    return _pretrain_once(data, _pretrain_folder(out, pretrain_changes), pretrain_epochs, bs, pretrain_changes)


def _inside(path, out) -> str:
    "A path relative to the benchmark folder of the run in `out` (`<folder>/runs/<run>`): folders gathered from several machines compare."
    try: return str(Path(path).relative_to(Path(out).parent.parent))
    except ValueError: return str(path)


def _run(cfg, any_precision: bool = False) -> dict:
    """Fine-tune with `cfg`, or return the metrics of a finished run in `cfg.out` made with the same
    settings; a finished run with other settings is an error rather than a silently wrong row. With
    `any_precision` (reporting runs from several machines) a run may have trained in another precision."""
    from dataclasses import asdict
    from .train import FinetuneConfig, finetune, resolved_precision
    done = Path(cfg.out) / 'metrics.json'
    if not done.exists(): return finetune(cfg)
    m = json.loads(done.read_text())
    ignore = {'resume', 'quiet', 'out', 'num_workers'} | ({'adapter_ratio', 'adapter_stem', 'sandwich'} if cfg.freeze != 'sandwich' else set())
    want = {k: v for k, v in asdict(cfg).items() if v is not None and k not in ignore}
    want['precision'] = resolved_precision(cfg.precision)      # runs record what they trained in
    if any_precision: want.pop('precision')
    for k in ('data', 'pretrained'):
        if k in want: want[k] = _inside(want[k], cfg.out)
    fields = FinetuneConfig.__dataclass_fields__               # a setting added since the run: its default then
    default = lambda k: 'fp32' if k == 'precision' else fields[k].default   # runs from before bf16 trained in fp32
    have = lambda k: _inside(m['config'][k], m['config']['out']) if k in ('data', 'pretrained') and m['config'].get(k) else m['config'].get(k, default(k))
    diff = {k: (have(k), v) for k, v in want.items() if str(have(k)) != str(v)}
    if diff: raise ValueError(f"{done}: a finished run with other settings ({', '.join(f'{k}: {a} there, {b} now' for k, (a, b) in diff.items())}); "
                              f"choose another --out or remove {cfg.out}")
    return m


def _finetune_config(data: Path, run: Path, mode: str, fraction: float, seed: int, epochs: int, bs: int, ckpt: Path,
                     changes: dict | None = None):
    "A benchmark fine-tune: same steps per epoch for every label fraction, pretrained unless from scratch, resumable."
    from .train import FinetuneConfig
    freeze, sandwich = MODES[mode]
    cfg = dict(data=data, out=run, epochs=epochs, bs=bs, label_fraction=fraction, seed=seed, same_epoch_length=True,
               pretrained=None if mode in NO_CHECKPOINT else ckpt, freeze=freeze, sandwich=sandwich, quiet=True, resume=True)
    return FinetuneConfig(**{**cfg, **(changes or {})})


def _row(m: dict, **extra) -> dict:
    "A run's test figures (FROC and top box) beside the mean box's, and its validation FROC."
    t, b = m['test'], m['test']['mean_box_baseline']
    return {**extra, 'train_slices': m['train_slices'], 'train_patients': m['train_patients'],
            'froc': t['froc']['mean_0.5_4'], 'sens@4': t['froc']['sensitivity']['4'], 'hit@0.5': t['top1']['hit@0.5'],
            'mean_iou': t['top1']['mean_iou'], 'centre_error_mm': t['top1']['centre_error_mm'],
            'valid_froc': m['valid']['froc']['mean_0.5_4'], 'baseline_froc': b['froc']['mean_0.5_4'],
            'baseline_hit@0.5': b['top1']['hit@0.5'], 'baseline_mean_iou': b['top1']['mean_iou'], 'n_test': t['froc']['slices'],
            'time_s': m['time_s'], 'trainable': m['parameters']['trainable'], 'precision': m['config'].get('precision', 'fp32')}


def _in_process(threads: int, fn, *args):
    "Run `fn(*args)` in a pool worker with `threads` torch threads (several runs share the machine)."
    import torch
    torch.set_num_threads(threads)
    return fn(*args)


def efficiency(out: Path, data: Path, patients: int, native: int, fractions, modes, seeds, epochs: int,
               pretrain_epochs: int, bs: int, pretexts=('masked',), context: int = 0, neighbours: int = 10,
               jobs: int = 1, report_only: bool = False, precision: str = 'auto', code_channels: tuple | None = None,
               backbone: str = 'resnet', backbone_weights: Path | None = None) -> dict:
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
    note without them."""
    from concurrent.futures import ProcessPoolExecutor
    from .files import write_json
    if not report_only: _generate(data, patients, native, neighbours, max(1, jobs))
    # each pretext's PretrainConfig changes (the default 'masked' keeps the plain out/pretrain folder)
    if 'imagenet' in modes and not backbone_weights:
        print("mode imagenet skipped: it needs --backbone NAME --backbone-weights PATH (a timm model's ImageNet weights)")
        modes = [m for m in modes if m != 'imagenet']
    code = {'code_channels': tuple(code_channels)} if code_channels else {}
    body = {'backbone': backbone} if backbone != 'resnet' else {}
    pre = {p: {**({'pretext': p} if p != 'masked' else {}), **({'context': context} if context else {}), **code, **body} for p in pretexts}
    ckpts = {p: _pretrain_folder(out, c) / 'pretrained.pth' for p, c in pre.items()}
    speed = {} if precision == 'auto' else {'precision': precision}
    pre = {p: {**c, **speed} for p, c in pre.items()}
    todo = []                                  # in priority order: fraction, seed, then mode and pretext
    for frac in fractions:
        for seed in seeds:
            for mode in modes:
                for p in (['-'] if mode in NO_CHECKPOINT else pretexts):
                    name = f'{mode}_{frac:g}_seed{seed}' + (f'_context{context}' if context else '') + ('' if p in ('-', 'masked') else f'_{p}')
                    name += (_tag(code) if p != '-' else '') + (f'_{backbone}' if body else '')
                    changes = {**({'context': context} if mode in NO_CHECKPOINT and context else {}), **speed, **body,
                               **({'backbone_weights': Path(backbone_weights)} if mode == 'imagenet' else {})}
                    cfg = _finetune_config(data, out / 'runs' / name, mode, frac, seed, epochs, bs, ckpts.get(p), changes)
                    todo.append((p, mode, frac, seed, cfg))
    if report_only:
        todo = [t for t in todo if (Path(t[4].out) / 'metrics.json').exists()]
        results = [_run(t[4], any_precision=True) for t in todo]
    elif jobs > 1:
        threads = max(1, mp.cpu_count() // jobs)
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context('spawn')) as pool:
            pretraining = {p: pool.submit(_in_process, threads, _pretrain_once, data, ckpts[p].parent, pretrain_epochs, bs, pre[p])
                           for p in pretexts if any(m not in NO_CHECKPOINT for m in modes)}
            scratch = {i: pool.submit(_in_process, threads, _run, t[4]) for i, t in enumerate(todo) if t[1] in NO_CHECKPOINT}
            for f in pretraining.values(): f.result()
            rest = {i: pool.submit(_in_process, threads, _run, t[4]) for i, t in enumerate(todo) if t[1] not in NO_CHECKPOINT}
            results = [{**scratch, **rest}[i].result() for i in range(len(todo))]
    else:
        for p in pretexts:
            if any(m not in NO_CHECKPOINT for m in modes): _pretrain_once(data, ckpts[p].parent, pretrain_epochs, bs, pre[p])
        results = []
        for p, mode, frac, seed, cfg in todo:
            if not (Path(cfg.out) / 'metrics.json').exists(): print(f"\n== {mode}{'' if p == '-' else f' ({p} pretext)'}, label fraction {frac:g}, seed {seed}")
            results.append(_run(cfg))
    rows = [_row(m, mode=mode if p == '-' else f'{mode} [{p}{_tag(code)}]', fraction=frac, seed=seed)
            for (p, mode, frac, seed, _), m in zip(todo, results)]
    if not rows:
        print(f"no finished runs in {out / 'runs'} for these settings: nothing to report")
        return {'rows': [], 'summary': [], 'verdict': []}
    summary = _summarise(rows)
    verdict = _verdict(summary)
    result = {'rows': rows, 'summary': summary, 'verdict': verdict, 'machine': _machine(),
              'settings': dict(data=str(data), patients=patients, native=native, fractions=list(fractions), modes=list(modes),
                               pretexts=list(pretexts), context=context, neighbours=neighbours, seeds=list(seeds), epochs=epochs,
                               pretrain_epochs=pretrain_epochs, bs=bs, backbone=backbone,
                               backbone_weights=str(backbone_weights) if backbone_weights else None)}
    write_json(result, out / 'efficiency.json')
    table = _efficiency_table(summary)
    atomic_write_text(out / 'efficiency.md', table + '\n\n' + '\n'.join(verdict) + '\n')
    _efficiency_plot(summary, out / 'data_efficiency.png')
    print('\n' + table + '\n\n' + '\n'.join(verdict))
    print(f"\nwrote {out / 'efficiency.json'}, {out / 'efficiency.md'}, {out / 'data_efficiency.png'}")
    return result


MIN_SEEDS = 3   # two seeds give an interval from one degree of freedom: two equal differences would look certain


def _verdict(summary) -> list[str]:
    """Per label fraction: the pretrained mode with the best validation FROC, and its paired test
    difference from scratch, resolved only with at least `MIN_SEEDS` pairs and a 95% interval that
    excludes 0."""
    lines = []
    for frac in sorted(dict.fromkeys(s['fraction'] for s in summary)):
        cells = [s for s in summary if s['fraction'] == frac and s['mode'] != 'scratch' and 'diff' in s]
        if not cells: continue
        best = max(cells, key=lambda s: s['valid_froc'])
        d, ci = best['diff'], best['diff_ci']
        if best['pairs'] < MIN_SEEDS: word = f"{best['pairs']} paired seed(s), fewer than the {MIN_SEEDS} an interval needs here: not resolved"
        else: word = 'no difference resolved' if abs(d) <= ci else 'better than scratch' if d > 0 else 'worse than scratch'
        lines.append(f"labels {frac:g}: best pretrained mode on validation is {best['mode']} (validation FROC {_pm(best['valid_froc'], best['valid_ci'])}); "
                     f"test FROC {_pm(best['froc'], best['froc_ci'])}, paired difference from scratch {_pm(d, ci)}: {word}")
    return lines


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
    ('none (all layers fine-tuned), 10%', 'none', .1, {}),
    ('  full width, pretext masks 4 px patches (not 8)', 'sandwich', .1, {'adapter_ratio': 1.}, {'patch': 4}),
    ('sandwich, all labels, full width, 60 epochs', 'sandwich', 1., {'adapter_ratio': 1., 'epochs': 60}),
    ('sandwich, 10%, full width, 60 epochs', 'sandwich', .1, {'adapter_ratio': 1., 'epochs': 60}),
]


def study(out: Path, data: Path, patients: int, native: int, epochs: int, pretrain_epochs: int, bs: int, seed: int = 0,
          variants=STUDY) -> dict:
    """Where the sandwich with 10% of the labels stands against scratch with all of them, and what
    each single change (objective, transfer layers, learning rate, regularisation, epochs) does to
    it. Same data, pretraining and epoch length as `efficiency` (pass the same --out to share them)."""
    from .files import write_json
    rows = []
    for i, (name, mode, frac, change, *pretrain_change) in enumerate(variants):
        ckpt = _prepare(out, data, patients, native, pretrain_epochs, bs, *pretrain_change)
        run = out / 'study' / f'{i:02d}_{mode}_{frac:g}_seed{seed}'
        if not (run / 'metrics.json').exists(): print(f"\n== {name}")
        rows.append(_row(_run(_finetune_config(data, run, mode, frac, seed, epochs, bs, ckpt, change)), variant=name, mode=mode, fraction=frac,
                         change=change, pretrain_change=pretrain_change[0] if pretrain_change else {}))
    lines = ['| variant | labeled slices | trainable parameters | test FROC | top box hit@0.5 / IoU | valid FROC | mean box FROC / hit@0.5 | time s |',
             '|---|---|---|---|---|---|---|---|']
    lines += [f"| {r['variant']} | {r['train_slices']} | {r['trainable']:,} | {r['froc']:.3f} | {r['hit@0.5']:.3f} / {r['mean_iou']:.3f} | "
              f"{r['valid_froc']:.3f} | {r['baseline_froc']:.3f} / {r['baseline_hit@0.5']:.3f} | {r['time_s']:.0f} |" for r in rows]
    table = '\n'.join(lines)
    write_json({'rows': rows, 'machine': _machine(), 'settings': dict(data=str(data), epochs=epochs, bs=bs, seed=seed)},
               out / 'study.json')
    atomic_write_text(out / 'study.md', table + '\n')
    print(f"\n{table}\n\nwrote {out / 'study.json'}, {out / 'study.md'}")
    return {'rows': rows}


def _validation_row(m: dict, **extra) -> dict:
    "What `select` may look at: validation figures only."
    v = m['valid']
    cal = v['top1'].get('calibration')
    return {**extra, 'valid_froc': v['froc']['mean_0.5_4'], 'valid_mean_iou': v['top1']['mean_iou'], 'valid_hit@0.5': v['top1']['hit@0.5'],
            'train_slices': m['train_slices'],
            'valid_within_1std': cal['within_1std'] if cal else None, 'valid_within_2std': cal['within_2std'] if cal else None,
            'calibration_error': (abs(cal['within_1std'] - .683) + abs(cal['within_2std'] - .954)) / 2 if cal else None}


CRITERIA = {'froc': ('valid_froc', max), 'iou': ('valid_mean_iou', max), 'calibration': ('calibration_error', min)}


def select(out: Path, data: Path, patients: int, native: int, setting: str, values, mode: str, fractions, seeds,
           epochs: int, pretrain_epochs: int, bs: int, changes: dict | None = None, criterion: str = 'froc') -> dict:
    """Choose the default of one fine-tuning `setting` on validation, never on test: every value x label
    fraction x seed is fine-tuned (same data, pretraining and steps as `efficiency`; a seed fixes the
    label subset and the initialisation, shared by all values), and only validation figures are
    reported: per value the mean and 95% interval of `criterion` ('froc': validation FROC, mean
    sensitivity over 0.5-4 FPs per slice; 'iou': the top box's validation mean IoU, both higher is
    better; 'calibration': the Gaussian std's distance from 68% / 95% coverage, lower is better),
    and its paired difference from the first value (the current default) over the same seeds."""
    from .stats import mean_ci
    from .files import write_json
    from .synthetic import generate
    key, best_of = CRITERIA[criterion]
    if mode == 'scratch':
        ckpt = None
        if not (data / 'DL_info.csv').exists(): generate(data, patients=patients, size=native, seed=1)
    else: ckpt = _prepare(out, data, patients, native, pretrain_epochs, bs)
    rows = []
    for frac in fractions:
        for seed in seeds:
            for v in values:
                run = out / 'select' / setting / f'{mode}_{v:g}_{frac:g}_seed{seed}'
                if not (run / 'metrics.json').exists(): print(f"\n== {setting} {v:g}, {mode}, label fraction {frac:g}, seed {seed}")
                m = _run(_finetune_config(data, run, mode, frac, seed, epochs, bs, ckpt, {**(changes or {}), setting: v}))
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
    result = {'rows': rows, 'summary': summary, 'verdict': verdict, 'best': best, 'machine': _machine(),
              'settings': dict(setting=setting, values=list(values), mode=mode, fractions=list(fractions), seeds=list(seeds),
                               epochs=epochs, criterion=criterion, changes=changes or {})}
    write_json(result, out / f'select_{setting}.json')
    atomic_write_text(out / f'select_{setting}.md', table + f"\n\n{verdict}\n")
    print(f"\n{table}\n\n{verdict}\n\nwrote {out / f'select_{setting}.json'}, {out / f'select_{setting}.md'}")
    return result


def _summarise(rows):
    """Mean over seeds of each (mode, fraction) cell, with 95% intervals of the FROC score, the top-box hit
    rate and the validation FROC, and (pretrained modes) the paired test FROC difference from scratch
    over the seeds both have."""
    from .stats import mean_ci
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


def _pm(mean, ci) -> str:
    return f"{mean:.3f}" if np.isnan(ci) else f"{mean:.3f} +- {ci:.3f}"


def _mode_order(mode: str):
    base = mode.split(' [')[0]
    return (list(MODES).index(base) if base in MODES else 9, mode)


def _efficiency_table(summary) -> str:
    lines = ['| labels (fraction of training patients) | labeled slices | mode [pretext] | test FROC, mean 0.5-4 FPs | paired difference from scratch | '
             'sensitivity at 4 FPs | top box hit@0.5 | validation FROC | mean box FROC / hit@0.5 | seeds (trained in) |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for s in sorted(summary, key=lambda s: (s['fraction'], _mode_order(s['mode']))):
        diff = _pm(s['diff'], s['diff_ci']) if 'diff' in s else ''
        lines.append(f"| {s['fraction']:g} | {s['train_slices']} | {s['mode']} | {_pm(s['froc'], s['froc_ci'])} | {diff} | {s['sens@4']:.3f} | "
                     f"{_pm(s['hit@0.5'], s['hit_ci'])} | {_pm(s['valid_froc'], s['valid_ci'])} | {s['baseline_froc']:.3f} / {s['baseline_hit@0.5']:.3f} | {s.get('precision', s['seeds'])} |")
    return '\n'.join(lines)


def _efficiency_plot(summary, path):
    from .plots import plt, save_fig
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


# --- the slice cache at scale ----------------------------------------------------------------------------------

DEEPLESION_SLICES = 930_000


def scale(out: Path, counts=(5000, 50000), native: int = 128, size: int = 64, workers: int = 2) -> dict:
    """The disk slice cache at growing sizes: one generated data set (`native` px, 20 unlabelled slices
    per key slice) large enough for the largest count; for each count its first slices are built into a
    fresh cache by `workers` processes (slices/s), then read back in a random order through an
    unpickled copy, as a DataLoader worker reads it (slices/s). Reports how the time grows and what
    that gives for DeepLesion's ~930k slices (time at the largest count's rate; size at 256 px)."""
    import pickle
    import shutil
    from .cache import build_slice_cache
    from .deeplesion import list_slices
    from .files import write_json
    from .synthetic import generate
    data = out / f'data_{native}px'
    have = len(list_slices(data)) if (data / 'DL_info.csv').exists() else 0
    if have < max(counts):
        shutil.rmtree(data, ignore_errors=True)
        generate(data, patients=max(counts) // 35 + 10, size=native, seed=11, neighbours=10, workers=workers)
    paths = list_slices(data)
    if len(paths) < max(counts): raise ValueError(f"{data}: {len(paths)} slices, fewer than {max(counts)}")
    rows = []
    for n in counts:
        folder = out / f'cache_{n}'
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        cache = build_slice_cache(paths[:n], 'soft', 0, size, folder, quiet=True, workers=workers)
        build_s = time.perf_counter() - t
        cache = pickle.loads(pickle.dumps(cache))
        order = np.random.default_rng(0).permutation(n)
        keys = list(cache.index)
        t = time.perf_counter()
        for i in order: cache.get(keys[i])
        read_s = time.perf_counter() - t
        rows.append({'slices': n, 'build_s': build_s, 'build_per_s': n / build_s, 'read_per_s': n / read_s,
                     'cache_mb': cache.array_file.stat().st_size / 2 ** 20})
        shutil.rmtree(folder, ignore_errors=True)
    last = rows[-1]
    res = {'machine': _machine(), 'native': native, 'size': size, 'workers': workers, 'rows': rows,
           'growth': last['build_s'] / rows[0]['build_s'], 'count_ratio': last['slices'] / rows[0]['slices'],
           'deeplesion_build_h': DEEPLESION_SLICES / last['build_per_s'] / 3600,
           'deeplesion_256px_gb': DEEPLESION_SLICES * 256 * 256 * 2 / 1e9}
    write_json(res, out / 'scale.json')
    lines = [f'| slices | build, s | build, slices/s | random reads, slices/s | cache, MB |', '|---|---|---|---|---|']
    lines += [f"| {r['slices']:,} | {r['build_s']:.1f} | {r['build_per_s']:.0f} | {r['read_per_s']:.0f} | {r['cache_mb']:.0f} |" for r in rows]
    table = '\n'.join(lines)
    summary = (f"{res['count_ratio']:.0f}x the slices took {res['growth']:.1f}x the build time; DeepLesion's {DEEPLESION_SLICES:,} slices "
               f"at the last rate: {res['deeplesion_build_h']:.1f} h with {workers} process(es) ({native} px PNG -> {size} px here), "
               f"{res['deeplesion_256px_gb']:.0f} GB at 256 px")
    atomic_write_text(out / 'scale.md', table + '\n\n' + summary + '\n')
    print(f"{res['machine']}\n\n{table}\n\n{summary}\nwrote {out / 'scale.json'}")
    return res


# --- data statistics -------------------------------------------------------------------------------------------

def stats(data: Path, sample: Path | None, patients: int, native: int) -> str:
    """The built-in generator's lesion statistics beside DeepLesion's: the published totals (32,735 lesions
    on 32,120 key slices) and the real sample of DL_info rows (`sample`), as a Markdown table."""
    from .deeplesion import lesion_statistics, read_dl_info
    from .metrics import LESION_TYPES
    from .synthetic import generate
    if not (data / 'DL_info.csv').exists(): generate(data, patients=patients, size=native, seed=1)
    cols = {'built-in generator': lesion_statistics(read_dl_info(data / 'DL_info.csv'))}
    if sample is not None and Path(sample).exists(): cols['real DeepLesion sample'] = lesion_statistics(read_dl_info(sample, root=Path(sample).parent))
    published = {'lesions_per_slice': 32735 / 32120}
    d = lambda c, k: f"{c['diameter_mm'][k]:.1f}"
    rows = [('lesions / key slices', lambda c: f"{c['lesions']} / {c['key_slices']}", '32,735 / 32,120'),
            ('lesions per key slice', lambda c: f"{c['lesions_per_slice']:.3f}", f"{published['lesions_per_slice']:.3f}"),
            ('key slices with several lesions', lambda c: f"{100 * c['multi_lesion_slices']:.1f}%", ''),
            ('long diameter, mm: 5% / 25% / median / 75% / 95%', lambda c: ' / '.join(d(c, k) for k in ('p5', 'p25', 'p50', 'p75', 'p95')), ''),
            ('Possibly_noisy lesions', lambda c: f"{100 * c['noisy']:.1f}%", '0.3% of the test split')]
    rows += [(f"type {t} ({name}), share of labelled lesions", (lambda t: lambda c: f"{100 * c['types'].get(t, 0):.0f}%")(t), '')
             for t, name in LESION_TYPES.items()]
    lines = [f"| statistic | {' | '.join(cols)} | DeepLesion, published |", '|---' * (len(cols) + 2) + '|']
    lines += [f"| {name} | {' | '.join(f(c) for c in cols.values())} | {pub} |" for name, f, pub in rows]
    table = '\n'.join(lines)
    print(table)
    return table


# --- what the autoencoder keeps of the lesions ------------------------------------------------------------------

def lesions(checkpoints, data: Path) -> str:
    """Per checkpoint: validation reconstruction L1 over the slice and inside the lesion boxes, and the
    median share of lesion contrast the reconstruction keeps, from the clean and the pretext's input."""
    from .probe import lesion_reconstruction_of
    lines = ['| checkpoint | pretext | input | L1, whole slice | L1, inside lesion boxes | L1, ring around them | lesion contrast kept (median) | lesions |',
             '|---|---|---|---|---|---|---|---|']
    from .checkpoint import load_pretrained
    for ckpt in checkpoints:
        pretext = load_pretrained(ckpt)['config'].get('pretext', 'masked')
        for kind, r in lesion_reconstruction_of(ckpt, data).items():
            lines.append(f"| {ckpt} | {pretext} | {kind} | {r['l1_slice']:.4f} | {r['l1_lesion']:.4f} | {r['l1_ring']:.4f} | {r['contrast_kept_median']:.2f} | "
                         f"{r['lesions_with_contrast']} of {r['lesions']} |")
    table = '\n'.join(lines)
    print(table)
    return table


# --- throughput ----------------------------------------------------------------------------------------------

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _train_speed(kind: str, size: int, bs: int, steps: int, q, device: str = 'cpu', amp: bool = False):
    """Runs in a fresh process so its peak memory is its own: training images/s of one model (the
    detector with its whole loss, or the earlier experiment's one-box localizer with a box loss), or
    with kind 'infer' the detector's inference slices/s, decoding included."""
    import torch
    from .losses import BoxLoss, DetectionLoss
    from .models.legacy import LegacyLocalizer
    from .models.localizer import create_localizer, detections
    torch.manual_seed(0)
    model = (LegacyLocalizer(size=size) if kind == 'legacy' else create_localizer(1)).to(device)
    if device == 'cuda': model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.rand(bs, 1, size, size, device=device)
    box = torch.tensor([[.25, .25, .75, .75]], device=device)
    if kind == 'legacy': loss_fn = lambda out: BoxLoss('giou+l1')((out + 1) / 2, box.repeat(bs, 1))
    else:
        y, flags = (box * 2 - 1).reshape(1, 2, 2).repeat(bs, 1, 1), torch.ones(bs, 1, device=device)
        loss_fn = lambda out: DetectionLoss()(out, y, flags)
    if kind == 'infer': model.eval()
    for i in range(steps + 1):
        if i == 1:
            if device == 'cuda': torch.cuda.synchronize()
            t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            if kind == 'infer':
                with torch.no_grad(): detections(model(x), 50)
                continue
            loss = loss_fn(model(x))
        opt.zero_grad(); loss.backward(); opt.step()
    if device == 'cuda': torch.cuda.synchronize()
    ips = bs * steps / (time.perf_counter() - t)
    mem = torch.cuda.max_memory_allocated() / 2 ** 20 if device == 'cuda' else _peak_rss_mb()
    q.put((ips, mem))


def _measure(kind, size, bs, steps, device='cpu', amp=False):
    ctx = mp.get_context('spawn')
    q = ctx.Queue()
    p = ctx.Process(target=_train_speed, args=(kind, size, bs, steps, q, device, amp))
    p.start()
    while True:                       # a measurement that dies (out of memory, an error) must not leave us waiting
        try: res = q.get(timeout=5); break
        except queue.Empty:
            if not p.is_alive(): raise RuntimeError(f"the {kind} measurement ({device}, batch {bs}) died with exit code {p.exitcode}")
    p.join()
    return res


def _loading(paths, size: int, cache_dir: Path):
    """Slices/s of our loader against a naive scikit-image path (imread + resize), same files, same run;
    then from the in-memory cache (a later epoch of the same run) and from the disk cache (building it,
    and reading it from a fresh process's view, as a later run or a DataLoader worker does)."""
    import pickle
    import shutil
    from skimage.io import imread
    from skimage.transform import resize
    from .cache import build_slice_cache
    from .data import CTSlice
    from .deeplesion import WINDOWS, window
    rate = lambda t, n=len(paths): n / (time.perf_counter() - t)
    ours = CTSlice('soft', 0, size)
    t = time.perf_counter()
    for p in paths: ours(p)
    res = {'ours': rate(t)}
    t = time.perf_counter()
    for p in paths:
        hu = imread(p).astype(np.float32) - 32768
        resize(window(hu, *WINDOWS['soft']), (size, size), anti_aliasing=True)
    res['skimage'] = rate(t)
    cached = CTSlice('soft', 0, size, {})
    for p in paths: cached(p)
    t = time.perf_counter()
    for p in paths: cached(p)
    res['ours_cached'] = rate(t)
    shutil.rmtree(cache_dir, ignore_errors=True)
    t = time.perf_counter()
    disk = build_slice_cache(paths, 'soft', 0, size, cache_dir, quiet=True)
    res['disk_cache_build'] = rate(t)
    disk = pickle.loads(pickle.dumps(disk))          # unmapped, as a worker or a later run receives it
    from_disk = CTSlice('soft', 0, size, disk)
    t = time.perf_counter()
    for _ in range(5):
        for p in paths: from_disk(p)
    res['ours_disk_cache'] = rate(t, 5 * len(paths))
    return res


def throughput(out: Path, quick: bool = False) -> dict:
    """Slice loading (PNG -> HU -> window -> half resolution) against scikit-image, training images/s
    and peak memory of our detector against the earlier experiment's localizer (same input and
    batch), and the detector's inference slices/s, decoding into scored boxes included."""
    import torch
    from .synthetic import generate
    from .deeplesion import list_slices
    from .files import write_json
    slices = out / 'slices512'
    if not (slices / 'DL_info.csv').exists(): generate(slices, patients=4, size=512, seed=5)
    paths = list_slices(slices)[:20 if quick else 60]
    load = _loading(paths, 256, out / 'slice_cache')
    ours, naive, cached, disk = load['ours'], load['skimage'], load['ours_cached'], load['ours_disk_cache']
    size, bs = 256, 8
    loc = _measure('localizer', size, bs, 2 if quick else 5)
    leg = _measure('legacy', size, 2 if quick else 4, 1 if quick else 2)
    inf = _measure('infer', size, 16, 2 if quick else 8)
    res = {'machine': _machine(), 'size': size, 'bs': bs,
           'loading_slices_per_s': load,
           'train_images_per_s': {'ours': loc[0], 'legacy': leg[0]},
           'peak_memory_mb': {'ours': loc[1], 'legacy': leg[1]},
           'inference_slices_per_s': inf[0]}
    if torch.cuda.is_available():
        res['gpu'] = {'ours_fp32': _measure('localizer', size, 64, 20, 'cuda')[0],
                      'ours_bf16': _measure('localizer', size, 64, 20, 'cuda', amp=True)[0],
                      'legacy_bf16': _measure('legacy', size, 16, 5, 'cuda', amp=True)[0]}
        workers = max(1, mp.cpu_count() - 1)
        res['gpu']['loader_keeps_up'] = {'png': ours * workers >= res['gpu']['ours_bf16'],
                                         'disk_cache': disk * workers >= res['gpu']['ours_bf16']}
    write_json(res, out / 'throughput.json')
    lines = ['| measure | ours | baseline | ratio |', '|---|---|---|---|',
             f"| slice loading, 512 px PNG -> 256 px windowed, slices/s per process | {ours:.0f} | {naive:.0f} (scikit-image imread + resize) | {ours / naive:.1f}x |",
             f"| same, from the in-memory slice cache (later epochs of a run) | {cached:.0f} | {naive:.0f} | {cached / naive:.0f}x |",
             f"| building the disk slice cache (once per slices and settings) | {load['disk_cache_build']:.0f} | {naive:.0f} | {load['disk_cache_build'] / naive:.1f}x |",
             f"| same, from the disk cache (memory-mapped float16; later runs, workers) | {disk:.0f} | {naive:.0f} | {disk / naive:.0f}x |",
             f"| training images/s at {size} px (CPU) | {loc[0]:.1f} | {leg[0]:.2f} (earlier experiment's localizer) | {loc[0] / leg[0]:.0f}x |",
             f"| peak memory of the training process, MB | {loc[1]:.0f} | {leg[1]:.0f} | {leg[1] / loc[1]:.1f}x less |",
             f"| detector inference at {size} px, slices/s (batch 16, up to 50 scored boxes each) | {inf[0]:.1f} | | |"]
    if 'gpu' in res:
        g = res['gpu']
        lines.append(f"| GPU training images/s, bf16 autocast | {g['ours_bf16']:.0f} | {g['legacy_bf16']:.0f} | {g['ours_bf16'] / g['legacy_bf16']:.0f}x |")
    table = '\n'.join(lines)
    atomic_write_text(out / 'throughput.md', table + '\n')
    print(f"{res['machine']}\n\n{table}\n\nwrote {out / 'throughput.json'}")
    return res


def _loader_rate(dl, epochs: int = 2) -> float:
    "Slices/s of a DataLoader: the first epoch starts the workers, the later ones are timed."
    for _ in dl: pass
    t, n = time.perf_counter(), 0
    for _ in range(epochs):
        for b in dl: n += len(b[0])
    return n / (time.perf_counter() - t)


def _end_to_end(dls, device: str, amp: bool) -> float:
    "Training images/s of one fastai epoch of the autoencoder on these loaders, loading included."
    import torch
    from fastai.callback.channelslast import ChannelsLast  # noqa: F401 (Learner.to_channelslast)
    from fastai.learner import Learner
    from .models.autoencoder import create_autoencoder
    learn = Learner(dls, create_autoencoder(dls.one_batch()[0].shape[1]).to(device), loss_func=torch.nn.L1Loss())
    if amp: learn.to_channelslast(amp_mode='bf16')
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)                                   # warm-up: workers, cudnn autotuning
        if device == 'cuda': torch.cuda.synchronize()
        t = time.perf_counter()
        learn.fit(1)
        if device == 'cuda': torch.cuda.synchronize()
    return len(dls.train) * dls.train.bs / (time.perf_counter() - t)


def gpu_check(out: Path, device: str = 'cuda', size: int = 256, bs: int = 64, steps: int = 20, workers: int | None = None,
              patients: int = 100) -> dict:
    """The GPU path in figures, on the built-in data: training images/s at `size` px of the detector in
    float32 and in bfloat16 autocast with channels_last, the earlier experiment's localizer in bf16 on
    the same device, inference slices/s (decoding into scored boxes included) and the peak GPU memory
    of each (each measured in a fresh process); then the loaders: building the disk cache, a fastai
    DataLoader over it with `workers` processes and pinned memory (slices/s), and one fastai epoch of
    the autoencoder end to end (loading included). Loading keeps up when it is faster than bf16 training.
    `device='cpu'` runs the same steps in float32 (for tests and for comparison)."""
    import torch
    from .cache import build_slice_cache
    from .data import autoencoder_dls
    from .deeplesion import list_slices, patient_of
    from .files import write_json
    from .synthetic import generate
    if device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU here (torch.cuda.is_available() is False); "
                         "`python -m lesion_fastai.bench gpu --device cpu` runs the same steps on the CPU")
    workers = max(1, mp.cpu_count() - 1) if workers is None else workers
    amp = device == 'cuda'
    t0 = time.perf_counter()
    data = out / f'data_{patients}p_{2 * size}px'
    if not (data / 'DL_info.csv').exists(): generate(data, patients=patients, size=2 * size, seed=7, workers=max(1, workers))
    res = {'machine': _machine(), 'device': torch.cuda.get_device_name() if device == 'cuda' else 'cpu',
           'size': size, 'bs': bs, 'workers': workers}
    train = {'ours_fp32': _measure('localizer', size, bs, steps, device)}
    if amp: train['ours_bf16'] = _measure('localizer', size, bs, steps, device, amp=True)
    train['legacy' + ('_bf16' if amp else '_fp32')] = _measure('legacy', size, max(2, bs // 4), max(1, steps // 4), device, amp)
    res['train_images_per_s'] = {k: v[0] for k, v in train.items()}
    res['peak_memory_mb'] = {k: v[1] for k, v in train.items()}
    inf = _measure('infer', size, bs, steps, device, amp)
    res['inference_slices_per_s'], res['peak_memory_mb']['inference'] = inf
    paths = list_slices(data)
    t = time.perf_counter()
    cache = build_slice_cache(paths, 'soft', 0, size, out / 'slice_cache', quiet=True, workers=max(1, workers))
    res['slices'] = len(paths)
    res['loading_slices_per_s'] = {'disk_cache_build': len(paths) / (time.perf_counter() - t)}
    patient_ids = sorted({patient_of(Path(p).parent.name) for p in paths})
    valid = set(patient_ids[-max(1, len(patient_ids) // 7):])          # a few patients' slices: the validation set
    for n in sorted({0, workers}):
        dls = autoencoder_dls(paths, valid, size=size, bs=bs, num_workers=n, seed=0, cache=cache, pin_memory=amp, device=device)
        res['loading_slices_per_s'][f'{n}_workers'] = _loader_rate(dls.train)
    res['end_to_end_images_per_s'] = _end_to_end(dls, device, amp)
    best = res['train_images_per_s'].get('ours_bf16', res['train_images_per_s']['ours_fp32'])
    res['loader_keeps_up'] = res['loading_slices_per_s'][f'{workers}_workers'] >= best
    res['time_s'] = round(time.perf_counter() - t0, 1)
    write_json(res, out / 'gpu.json')
    tr, mem, ld = res['train_images_per_s'], res['peak_memory_mb'], res['loading_slices_per_s']
    leg = next(k for k in tr if k.startswith('legacy'))
    rows = [('| measure | value | baseline |', '|---|---|---|'),
            [f"| training images/s at {size} px, float32, batch {bs} | {tr['ours_fp32']:.0f} | |"],
            [f"| training images/s, bf16 autocast + channels_last | {tr['ours_bf16']:.0f} | {tr[leg]:.0f} (earlier experiment's localizer, bf16) |"] if amp
            else [f"| training images/s of the earlier experiment's localizer, float32 | {tr[leg]:.1f} | |"],
            [f"| inference slices/s at {size} px, batch {bs}, scored boxes decoded | {res['inference_slices_per_s']:.0f} | |",
             f"| peak {'GPU ' if amp else ''}memory, MB: training {'bf16' if amp else 'fp32'} / inference | "
             f"{mem['ours_bf16' if amp else 'ours_fp32']:.0f} / {mem['inference']:.0f} | {mem[leg]:.0f} (earlier localizer, training) |",
             f"| building the disk cache, slices/s ({len(paths)} slices, {2 * size} px PNG, {max(1, workers)} processes) | {ld['disk_cache_build']:.0f} | |",
             f"| DataLoader from the disk cache, {workers} workers, slices/s | {ld[f'{workers}_workers']:.0f} | {ld['0_workers']:.0f} (no workers) |",
             f"| one fastai epoch of the autoencoder end to end, images/s | {res['end_to_end_images_per_s']:.0f} | |",
             f"| loading keeps up with training | {'yes' if res['loader_keeps_up'] else 'no'} | |"]]
    table = '\n'.join(line for group in rows for line in group)
    atomic_write_text(out / 'gpu.md', table + '\n')
    print(f"{res['machine']}, {res['device']}\n\n{table}\n\nwrote {out / 'gpu.json'} ({res['time_s']:.0f} s)")
    return res


def _data_args(p, out_help: str, quick_help: str) -> None:
    "Flags shared by `efficiency` and `study`: the same data, pretraining and batch size."
    p.add_argument('--out', type=Path, default=Path('runs/bench/efficiency'), help=out_help)
    p.add_argument('--data', type=Path, default=None, help='data folder (default: generated under --out)')
    p.add_argument('--patients', type=int, default=250, help='synthetic patients to generate')
    p.add_argument('--native', type=int, default=256, help='native slice size of the generated data (trained at half)')
    p.add_argument('--pretrain-epochs', type=int, default=10, help='autoencoder epochs (one pretraining per pretext serves every run)')
    p.add_argument('--bs', type=int, default=16, help='batch size')
    p.add_argument('--quick', action='store_true', help=quick_help)


def main(argv=None):
    ap = argparse.ArgumentParser(prog='python -m lesion_fastai.bench', description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest='which', required=True)
    e = sub.add_parser('efficiency', help='data efficiency: label fractions x freeze modes', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _data_args(e, 'output folder', 'a few-minute smoke run: 40 patients, 2 fractions, 2 epochs, one seed')
    e.add_argument('--fractions', default='0.02,0.1,1', help='label fractions of training patients (runs go in this order)')
    e.add_argument('--modes', default=','.join(GRID_MODES), help=f"scratch and pretrained modes to compare, of {', '.join(MODES)} "
                   "(sandwich: transfer layers between the frozen encoder's stages; decoder-sandwich: 3FabRec's, between the frozen "
                   "decoder's blocks; encoder: only the head trains; none: everything trains from the pretrained encoder)")
    e.add_argument('--pretexts', default='masked', help='pretraining pretexts (masked, mae, context), one pretraining each')
    e.add_argument('--context', type=int, default=0, help='neighbour slices on each side as input channels, for every run (context pretext: 1 or more)')
    e.add_argument('--neighbours', type=int, default=10, help='unlabelled slices the generator writes on each side of a key slice '
                   '(10: 20 unlabelled slices per labelled one)')
    e.add_argument('--seeds', default='0,1,2', help='seeds, comma separated (label subset and initialisation)')
    e.add_argument('--epochs', type=int, default=30, help='fine-tuning epochs, the same for every run')
    e.add_argument('--jobs', type=int, default=1, help='runs in parallel processes (a GPU machine with many cores)')
    e.add_argument('--report-only', action='store_true', help='train nothing: report the runs that finished')
    e.add_argument('--precision', choices=['auto', 'fp32', 'bf16'], default='auto', help='of every run: auto is bf16 on a GPU, fp32 on the CPU')
    e.add_argument('--backbone', default='resnet', help='the body of every pretraining and run: resnet or a timm model name')
    e.add_argument('--backbone-weights', type=Path, default=None, help="a local state dict of the timm --backbone (ImageNet weights): "
                   "the imagenet mode fine-tunes from it, every layer training (skipped with a note without it)")
    e.add_argument('--code-channels', default=None, help="the autoencoder's codes of every pretraining, as python -m pretrain --code-channels "
                   "(e.g. 64,8,4,4 adds a stride-4 code; default: pretrain's)")
    st = sub.add_parser('study', help='the sandwich at 10%% labels against scratch at 100%%, one change at a time',
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _data_args(st, "output folder (efficiency's: shares its data and pretraining)", 'a few-minute smoke run: 40 patients, 2 epochs, three variants')
    st.add_argument('--seed', type=int, default=0, help='seed of every run')
    st.add_argument('--epochs', type=int, default=30, help='fine-tuning epochs (a variant may change them)')
    se = sub.add_parser('select', help='choose the default of one fine-tuning setting on validation (never on test)',
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _data_args(se, "output folder (efficiency's: shares its data and pretraining)", 'a few-minute smoke run: 40 patients, 2 epochs')
    se.add_argument('--setting', required=True, help='a FinetuneConfig field, e.g. adapter_ratio, nll_weight, map_radius, lr, wd')
    se.add_argument('--values', required=True, help='values to compare, comma separated; the first is the current default')
    se.add_argument('--mode', choices=list(MODES), default='sandwich', help='scratch or freeze mode of every run')
    se.add_argument('--head', choices=['direct', 'gaussian'], default='direct', help='box head of every run')
    se.add_argument('--fractions', default='0.1,1', help='label fractions of training patients')
    se.add_argument('--seeds', default='0,1,2', help='seeds, comma separated (label subset and initialisation)')
    se.add_argument('--epochs', type=int, default=30, help='fine-tuning epochs, the same for every run')
    se.add_argument('--criterion', choices=sorted(CRITERIA), default='froc',
                    help="froc: validation FROC (mean sensitivity 0.5-4 FPs per slice); iou: the top box's validation mean IoU; "
                         "calibration: the Gaussian std's distance from 68%% / 95%% coverage")
    sc = sub.add_parser('scale', help='the disk slice cache from 5,000 to 50,000 slices: build and read rates, extrapolated to 930k',
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sc.add_argument('--out', type=Path, default=Path('runs/bench/scale'), help='output folder (generated data, scale.json, scale.md)')
    sc.add_argument('--counts', default='5000,50000', help='slice counts, comma separated (the data is generated for the largest)')
    sc.add_argument('--native', type=int, default=128, help='slice size of the generated PNGs')
    sc.add_argument('--size', type=int, default=64, help='prepared size in the cache')
    sc.add_argument('--workers', type=int, default=2, help='processes that generate the data and build the cache')
    sa = sub.add_parser('stats', help="the built-in data's lesion statistics beside DeepLesion's", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sa.add_argument('--data', type=Path, default=Path('runs/bench/efficiency/data_250p_256px'), help='data folder (generated if missing)')
    sa.add_argument('--sample', type=Path, default=Path('../shared/fixtures/DL_info_sample.csv'), help='real DL_info rows to compare with')
    sa.add_argument('--patients', type=int, default=250, help='patients to generate if --data is missing')
    sa.add_argument('--native', type=int, default=256, help='slice size to generate if --data is missing')
    le = sub.add_parser('lesions', help="does a pretrained autoencoder keep the lesions? its validation reconstructions inside the boxes",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    le.add_argument('--pretrained', type=Path, nargs='+', required=True, help='pretrained.pth files of python -m pretrain')
    le.add_argument('--data', type=Path, required=True, help='the data they were pretrained on')
    t = sub.add_parser('throughput', help='loading and training speed, peak memory', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument('--out', type=Path, default=Path('runs/bench/throughput'), help='output folder')
    t.add_argument('--quick', action='store_true', help='fewer slices and steps')
    g = sub.add_parser('gpu', help='the GPU path: bf16 training, inference, loaders with workers, peak GPU memory (make gpu-check)',
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument('--out', type=Path, default=Path('runs/bench/gpu'), help='output folder (generated data, disk cache, gpu.json, gpu.md)')
    g.add_argument('--device', choices=['cuda', 'cpu'], default='cuda', help='cpu runs the same steps in float32')
    g.add_argument('--size', type=int, default=256, help='input size in pixels (the data is generated at twice this)')
    g.add_argument('--bs', type=int, default=64, help='batch size')
    g.add_argument('--steps', type=int, default=20, help='timed training steps per model')
    g.add_argument('--workers', type=int, default=None, help='DataLoader workers (default: CPU cores - 1)')
    g.add_argument('--patients', type=int, default=100, help='synthetic patients to generate for the loaders')
    args = ap.parse_args(argv)
    if args.which == 'throughput': return throughput(args.out, args.quick)
    if args.which == 'gpu': return gpu_check(args.out, args.device, args.size, args.bs, args.steps, args.workers, args.patients)
    if args.which == 'stats': return stats(args.data, args.sample, args.patients, args.native)
    if args.which == 'scale': return scale(args.out, [int(c) for c in args.counts.split(',')], args.native, args.size, args.workers)
    if args.which == 'lesions': return lesions(args.pretrained, args.data)
    if args.quick:
        args.out = args.out.with_name(args.out.name + '_quick') if args.out == Path('runs/bench/efficiency') else args.out
        args.patients, args.epochs, args.pretrain_epochs, args.native = 40, 2, 1, 128
        if args.which == 'efficiency': args.seeds, args.neighbours = '0', 2
    neighbours = getattr(args, 'neighbours', 2)
    data = args.data or args.out / (f'data_{args.patients}p_{args.native}px' + (f'_{neighbours}n' if neighbours != 2 else ''))
    if args.which == 'select':
        from .train import FinetuneConfig
        if args.setting not in FinetuneConfig.__dataclass_fields__: ap.error(f'--setting {args.setting!r} is not a fine-tuning setting')
        return select(args.out, data, args.patients, args.native, args.setting, [float(v) for v in args.values.split(',')], args.mode,
                      [float(f) for f in args.fractions.split(',')], [int(s) for s in args.seeds.split(',')], args.epochs,
                      args.pretrain_epochs, args.bs, {'head': args.head} if args.head != 'direct' else None, args.criterion)
    if args.which == 'study':
        return study(args.out, data, args.patients, args.native, args.epochs, args.pretrain_epochs, args.bs, args.seed,
                     [STUDY[0], STUDY[4], STUDY[6]] if args.quick else STUDY)
    fractions = [float(f) for f in args.fractions.split(',')]
    modes = [m for m in args.modes.split(',') if m]
    bad = [m for m in modes if m not in MODES]
    if bad: ap.error(f"--modes: unknown {bad}, expected some of {', '.join(MODES)}")
    from .train import PRETEXTS
    pretexts = [p for p in args.pretexts.split(',') if p]
    bad = [p for p in pretexts if p not in PRETEXTS]
    if bad or not pretexts: ap.error(f"--pretexts: unknown {bad}, expected some of {', '.join(PRETEXTS)}")
    if 'context' in pretexts and args.context < 1: ap.error('--pretexts context needs --context 1 or more')
    if args.jobs < 1: ap.error(f'--jobs must be at least 1, got {args.jobs}')
    try: code = tuple(int(c) for c in args.code_channels.split(',')) if args.code_channels else None
    except ValueError: ap.error(f'--code-channels must be 3 or 4 integers joined by commas, got {args.code_channels!r}')
    if code and (not 3 <= len(code) <= 4 or min(code) < 1): ap.error(f'--code-channels must be 3 or 4 positive integers, got {args.code_channels}')
    if args.quick: fractions = [.1, 1.]
    return efficiency(args.out, data, args.patients, args.native, fractions, modes, [int(s) for s in args.seeds.split(',')],
                      args.epochs, args.pretrain_epochs, args.bs, pretexts, args.context, neighbours, args.jobs, args.report_only,
                      args.precision, code, args.backbone, args.backbone_weights)


if __name__ == '__main__':
    main()
