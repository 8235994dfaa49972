"""python -m pretrain: unsupervised autoencoder pretraining on every slice of the training patients.

Labels are not used: the autoencoder reconstructs clean slices from masked, noisy ones (or, with
--pretext context, a slice's masked patches from its neighbour slices; with --pretext mae, three
quarters of small patches, scored on the masked pixels only; with --pretext genesis, the whole slice
from Models Genesis's shuffled, intensity-mapped, in- or out-painted one). Writes
OUT/pretrained.pth (encoder, decoder, construction arguments, config) for python -m finetune --pretrained.

Example:
    python -m pretrain --data data/synthetic --out runs/pretrain --epochs 10
    python -m pretrain --data data/synthetic --out runs/pretrain_context --pretext context --context 2
    python -m pretrain --data data/synthetic --out runs/pretrain_mae --pretext mae
    python -m pretrain --data data/synthetic --out runs/pretrain_genesis --pretext genesis
    torchrun --nproc_per_node 4 -m pretrain --data data/synthetic --out runs/pretrain --cache disk
        (data parallel, one process per GPU, or gloo on CPUs; --bs is per process; rank 0 writes)
"""
from lesion_fastai.log import hush_third_party
hush_third_party(__name__)       # run as a command: quiet known third-party warnings before fastai loads

import argparse
import sys
from pathlib import Path

from lesion_fastai.config import PretrainConfig, add_settings, from_args


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='python -m pretrain', description=__doc__.split('\n\n')[0],
                                 epilog=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(ap, PretrainConfig, defaults={'out': Path('runs/pretrain')})
    return ap


def main(argv=None):
    ap = parser()
    cfg = from_args(PretrainConfig, ap, ap.parse_args(argv))
    from lesion_fastai.distributed import quiet_other_ranks
    quiet_other_ranks()
    from lesion_fastai.pretraining import pretrain
    try: pretrain(cfg)
    except (FileNotFoundError, ValueError, FloatingPointError) as e: sys.exit(f"error: {e}")


if __name__ == '__main__':
    main()
