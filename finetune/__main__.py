"""python -m finetune: train the lesion detector, from scratch or from a pretrained encoder.

Examples:
    python -m finetune --data data/synthetic --out runs/scratch
    python -m finetune --data data/synthetic --pretrained runs/pretrain/pretrained.pth --freeze sandwich --out runs/sandwich
    python -m finetune --data data/synthetic --pretrained runs/pretrain/pretrained.pth --freeze sandwich --sandwich decoder --out runs/decoder
    python -m finetune --eval runs/sandwich/export.pkl --data data/synthetic
    torchrun --nproc_per_node 4 -m finetune --data data/synthetic --out runs/scratch
        (data parallel, one process per GPU, or gloo on CPUs; --bs is per process; rank 0 writes and evaluates)
"""
from lesion_fastai.log import hush_third_party
hush_third_party(__name__)       # run as a command: quiet known third-party warnings before fastai loads

import argparse
import sys
from pathlib import Path

from lesion_fastai.config import FinetuneConfig, add_settings, from_args


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='python -m finetune', description=__doc__.split('\n\n')[0],
                                 epilog=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--eval', type=Path, default=None, metavar='MODEL', help='only evaluate an exported model on the test split, as '
                    'python -m lesion_fastai.evaluate MODEL --data DATA [--out OUT] does (--bs its batch size)')
    add_settings(ap, FinetuneConfig, defaults={'out': None}, shown={'out': 'runs/finetune; with --eval, the folder of MODEL'})
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    from lesion_fastai.distributed import quiet_other_ranks
    quiet_other_ranks()
    try:
        if args.eval is not None:                  # an alias of python -m lesion_fastai.evaluate
            from lesion_fastai.config import EvaluateConfig
            from lesion_fastai.evaluate import evaluate
            evaluate(from_args(EvaluateConfig, ap, args, model=args.eval))
            return
        cfg = from_args(FinetuneConfig, ap, args, out=args.out or Path('runs/finetune'))
        from lesion_fastai.finetuning import finetune
        finetune(cfg)
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")


if __name__ == '__main__':
    main()
