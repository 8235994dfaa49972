"""`make demo`: pretrain the autoencoder on every training-patient slice, fine-tune the frozen sandwich,
and train the same detector from scratch with the same budget, then print where everything is.

The budget fits `make demo` into 15 minutes on a 2-core CPU, install and data included: one epoch of
pretraining and 10 of each fine-tune, at half the slices' resolution (512 -> 256), one slice per input.
`--context 2` (two neighbour slices on each side as extra channels) detects far better on validation
but takes the demo to 15 min 14 s on a fresh clone.

    python -m lesion_fastai.demo --data data/synthetic --out runs/demo
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import FinetuneConfig, PretrainConfig
from .files import atomic_write_text, write_json
from .finetuning import finetune
from .log import log
from .pretraining import pretrain

__all__ = ['main']


HEADER = ('| model | labeled slices | test sensitivity at 0.5 / 1 / 2 / 4 / 8 / 16 FPs per slice | FROC, mean 0.5-4 | '
          'top box hit@0.5 / IoU | mean box FROC / hit@0.5 | time s |\n|---|---|---|---|---|---|---|')


def _row(name, m):
    t, b = m['test'], m['test']['mean_box_baseline']
    sens = ' / '.join(f"{t['froc']['sensitivity'][k]:.3f}" for k in ('0.5', '1', '2', '4', '8', '16'))
    return (f"| {name} | {m['train_slices']} | {sens} | {t['froc']['mean_0.5_4']:.3f} | {t['top1']['hit@0.5']:.3f} / "
            f"{t['top1']['mean_iou']:.3f} | {b['froc']['mean_0.5_4']:.3f} / {b['top1']['hit@0.5']:.3f} | {m['time_s']:.0f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(prog='python -m lesion_fastai.demo', description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument('--data', type=Path, default=Path('data/synthetic'), help='DeepLesion-layout folder')
    ap.add_argument('--out', type=Path, default=Path('runs/demo'), help='output folder')
    ap.add_argument('--pretrain-epochs', type=int, default=1, help='autoencoder epochs')
    ap.add_argument('--finetune-epochs', type=int, default=10, help='detector epochs (sandwich and scratch alike)')
    ap.add_argument('--size', type=int, default=None, help='input size (default half the native size)')
    ap.add_argument('--context', type=int, default=0, help='neighbour slices on each side as extra input channels')
    ap.add_argument('--seed', type=int, default=0, help='random seed')
    ap.add_argument('--resume', action='store_true', help='continue interrupted runs')
    args = ap.parse_args(argv)
    try: _run(args)
    except (FileNotFoundError, ValueError, FloatingPointError) as e: sys.exit(f"error: {e}")


def _run(args):
    t0 = time.time()
    log.info('== 1/3 autoencoder pretraining (labels unused)')
    pretrain(PretrainConfig(data=args.data, out=args.out / 'pretrain', epochs=args.pretrain_epochs, size=args.size,
                            context=args.context, seed=args.seed, resume=args.resume))
    ckpt = args.out / 'pretrain' / 'pretrained.pth'
    log.info('== 2/3 fine-tuning the frozen sandwich')
    sandwich = finetune(FinetuneConfig(data=args.data, out=args.out / 'sandwich', pretrained=ckpt, freeze='sandwich',
                                       epochs=args.finetune_epochs, seed=args.seed, resume=args.resume))
    log.info('== 3/3 the same detector from scratch, same budget')
    scratch = finetune(FinetuneConfig(data=args.data, out=args.out / 'scratch', size=sandwich['config']['size'],
                                      context=sandwich['config']['context'],
                                      epochs=args.finetune_epochs, seed=args.seed, resume=args.resume))
    table = '\n'.join([HEADER, _row('sandwich (pretrained, frozen)', sandwich), _row('scratch', scratch)])
    atomic_write_text(args.out / 'summary.md', table + '\n')
    write_json({'sandwich': sandwich, 'scratch': scratch, 'time_s': round(time.time() - t0, 1)}, args.out / 'summary.json')
    log.info(f"\n{table}\n\ndone in {time.time() - t0:.0f} s. Results in {args.out}/:")
    for p in ('summary.md', 'pretrain/reconstructions.png', 'sandwich/froc.png', 'sandwich/results.png', 'sandwich/metrics.json',
              'sandwich/predictions.csv', 'scratch/froc.png', 'scratch/results.png', 'scratch/metrics.json', 'sandwich/export.pkl'):
        log.info(f"  {args.out / p}")


if __name__ == '__main__':
    main()
