"""`make demo`: pretrain the autoencoder on every training-patient slice, fine-tune the frozen sandwich,
and train the same detector from scratch with the same budget, then print where everything is.

The budget is meant to fit `make demo` into 15 minutes on a 2-core CPU, install and data included:
the built-in data at 256 px, trained at half that (128 px) with two neighbour slices on each side
(`--context 2`, the data's default), the library's default precision, three epochs of pretraining
and 60 of each fine-tune (chosen on validation: README, "Demo"). A run past its budget says so,
with the time it took.

    python -m lesion_fastai.demo --data data/synthetic --out runs/demo
"""
from __future__ import annotations

from .log import hush_third_party
hush_third_party(__name__)       # run as a command: quiet known third-party warnings before fastai loads

import argparse
import sys
import time
from pathlib import Path

from .config import PRECISIONS, FinetuneConfig, PretrainConfig
from .files import atomic_write_text, write_json
from .finetuning import finetune
from .log import log
from .pretraining import pretrain
from .report import markdown_table, summary_report

__all__ = ['main', 'BUDGET_S']

BUDGET_S = 15 * 60       # the whole of `make demo`, install and data included; this command's share is what is left of it

HEADER = ('| model | labeled slices | test sensitivity at 0.5 / 1 / 2 / 4 / 8 / 16 FPs per slice | FROC, mean 0.5-4 (validation) | '
          'top box hit@0.5 / IoU | mean box FROC / hit@0.5 | time s |\n|---|---|---|---|---|---|---|')


def _row(name, m):
    t, b = m['test'], m['test']['mean_box_baseline']
    sens = ' / '.join(f"{t['froc']['sensitivity'][k]:.3f}" for k in ('0.5', '1', '2', '4', '8', '16'))
    return (f"| {name} | {m['train_slices']} | {sens} | {t['froc']['mean_0.5_4']:.3f} ({m['valid']['froc']['mean_0.5_4']:.3f}) | "
            f"{t['top1']['hit@0.5']:.3f} / {t['top1']['mean_iou']:.3f} | {b['froc']['mean_0.5_4']:.3f} / {b['top1']['hit@0.5']:.3f} | "
            f"{m['time_s']:.0f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(prog='python -m lesion_fastai.demo', description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument('--data', type=Path, default=Path('data/synthetic'), help='DeepLesion-layout folder')
    ap.add_argument('--out', type=Path, default=Path('runs/demo'), help='output folder')
    ap.add_argument('--pretrain-epochs', type=int, default=3, help='autoencoder epochs')
    ap.add_argument('--finetune-epochs', type=int, default=60, help='detector epochs (sandwich and scratch alike)')
    ap.add_argument('--size', type=int, default=None, help='input size (default half the native size)')
    ap.add_argument('--context', type=int, default=None, help='neighbour slices on each side as extra input channels '
                    '(default 2 where the data ships them, else 0)')
    ap.add_argument('--precision', choices=PRECISIONS, default='auto', help='as python -m finetune --precision')
    ap.add_argument('--seed', type=int, default=0, help='random seed')
    ap.add_argument('--resume', action='store_true', help='continue interrupted runs')
    ap.add_argument('--started', type=float, default=None, help='when `make demo` started (seconds since the epoch), so that '
                    'the budget counts the install and the data too (default: when this command started)')
    args = ap.parse_args(argv)
    try: _run(args)
    except (FileNotFoundError, ValueError, FloatingPointError) as e: sys.exit(f"error: {e}")


def _run(args):
    t0 = time.time()
    common = dict(data=args.data, seed=args.seed, resume=args.resume, precision=args.precision)
    log.info('== 1/3 autoencoder pretraining (labels unused)')
    pretrain(PretrainConfig(out=args.out / 'pretrain', epochs=args.pretrain_epochs, size=args.size, context=args.context, **common))
    ckpt = args.out / 'pretrain' / 'pretrained.pth'
    log.info('\n== 2/3 fine-tuning the frozen sandwich')
    sandwich = finetune(FinetuneConfig(out=args.out / 'sandwich', pretrained=ckpt, freeze='sandwich', epochs=args.finetune_epochs, **common))
    log.info('\n== 3/3 the same detector from scratch, same budget')
    scratch = finetune(FinetuneConfig(out=args.out / 'scratch', size=sandwich['config']['size'], context=sandwich['config']['context'],
                                      epochs=args.finetune_epochs, **common))
    table = '\n'.join([HEADER, _row('sandwich (pretrained, frozen)', sandwich), _row('scratch', scratch)])
    atomic_write_text(args.out / 'summary.md', table + '\n')
    took, since = time.time() - t0, time.time() - (args.started or t0)
    write_json({'sandwich': sandwich, 'scratch': scratch, 'time_s': round(took, 1), 'since_make_demo_s': round(since, 1),
                'budget_s': BUDGET_S}, args.out / 'summary.json')
    _report(args.out, table, took, since if args.started else None)
    wrote = sorted(p.relative_to(args.out) for p in args.out.rglob('*') if p.is_file() and not p.name.startswith('.')
                   and 'models' not in p.parts)
    log.info(f"\n{table}\n\ndone in {took:.0f} s" + (f" ({since:.0f} s since make demo started)" if args.started else '')
             + f". Results in {args.out}/:\n" + '\n'.join(f"  {args.out / p}" for p in wrote))
    if since > BUDGET_S:
        log.warning(f"warning: the demo took {since / 60:.1f} minutes, over its {BUDGET_S // 60}-minute budget "
                    f"(README, Demo, says what it takes on a 2-core CPU)")


def _report(out: Path, table: str, took: float, since: float | None):
    "runs/demo/report.html: the demo's table, each model's FROC curves and test slices; each run's own report.html has the rest."
    header, rows = markdown_table(table)
    figures = [(f'{name}: {what}', out / name / f, what) for name in ('sandwich', 'scratch')
               for f, what in (('froc.png', 'validation and test FROC curves, the mean box, published points'),
                               ('results.png', "the first test slices at the model's operating point"),
                               ('errors.png', 'the worst misses and false positives among the test slices'))]
    took_line = f"It took {took:.0f} s" + (f" ({since:.0f} s since make demo started)" if since is not None else '') + '.'
    summary_report(out / 'report.html', 'lesion_fastai demo: the frozen sandwich and scratch',
                   'The autoencoder pretrained on every training-patient slice (labels unused), then the frozen sandwich fine-tuned '
                   f'from it and the same detector trained from scratch with the same budget, on the built-in synthetic data. {took_line}',
                   tables=[('Test FROC (validation in brackets)', header, rows)],
                   notes=[f'Each run has a report of its own, with its training curves, settings and data counts: '
                          f'{out / "sandwich" / "report.html"} and {out / "scratch" / "report.html"}.'], figures=figures)


if __name__ == '__main__':
    main()
