"""python -m pretrain: unsupervised autoencoder pretraining on every slice of the training patients.

Labels are not used: the autoencoder reconstructs clean slices from masked, noisy ones (or, with
--pretext context, a slice's masked patches from its neighbour slices). Writes
OUT/pretrained.pth (encoder, decoder, construction arguments, config) for python -m finetune --pretrained.

Example:
    python -m pretrain --data data/synthetic --out runs/pretrain --epochs 10
    python -m pretrain --data data/synthetic --out runs/pretrain_context --pretext context --context 2
"""
import argparse
import sys
from pathlib import Path

from lesion_fastai.cache import add_loading_args


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog='python -m pretrain', description=__doc__.split('\n\n')[0],
                                 epilog=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', type=Path, required=True, help='DeepLesion-layout folder: DL_info.csv and Images_png/')
    ap.add_argument('--out', type=Path, default=Path('runs/pretrain'), help='output folder (default runs/pretrain)')
    ap.add_argument('--epochs', type=int, default=10, help='epochs of fit_one_cycle (default 10)')
    ap.add_argument('--lr', type=float, default=3e-3, help='maximum learning rate (default 3e-3)')
    ap.add_argument('--bs', type=int, default=16, help='batch size (default 16)')
    ap.add_argument('--size', type=int, default=None, help='input size in pixels (default half the native size)')
    ap.add_argument('--windows', default='soft', help='CT windows as channels, e.g. soft,lung or -100:200 (default soft)')
    ap.add_argument('--context', type=int, default=0, help='neighbour slices on each side as extra channels (default 0)')
    ap.add_argument('--patients', choices=['train', 'all'], default='train',
                    help='slices of training patients only (default), or of train and test patients (labels unused either way)')
    ap.add_argument('--mask-ratio', type=float, default=.5, help='fraction of patches masked out of the input (default 0.5)')
    ap.add_argument('--patch', type=int, default=None, help='masked patch size in pixels (default size/16)')
    ap.add_argument('--noise-std', type=float, default=.05, help='Gaussian noise added to the windowed input (default 0.05)')
    ap.add_argument('--loss', choices=['l1', 'mse'], default='l1', help='reconstruction loss (default l1)')
    ap.add_argument('--pretext', choices=['masked', 'context'], default='masked',
                    help="masked: every channel masked and noisy, all reconstructed (default); context: only the key "
                         "slice's patches masked, its --context neighbours whole, the key slice reconstructed (needs "
                         "--context 1 or more; fine-tune with the same --context)")
    ap.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    ap.add_argument('--resume', action='store_true', help='continue an interrupted run from OUT/last.pth')
    add_loading_args(ap)
    args = ap.parse_args(argv)
    for name, v, lo in (('--epochs', args.epochs, 1), ('--bs', args.bs, 1), ('--context', args.context, 0), ('--size', args.size or 32, 32)):
        if v < lo: ap.error(f'{name} must be at least {lo}, got {v}')
    if not 0 <= args.mask_ratio < 1: ap.error(f'--mask-ratio must be in [0, 1), got {args.mask_ratio}')
    return args


def main(argv=None):
    args = parse_args(argv)
    from lesion_fastai.train import PretrainConfig, pretrain
    try:
        pretrain(PretrainConfig(data=args.data, out=args.out, epochs=args.epochs, lr=args.lr, bs=args.bs, size=args.size,
                                windows=args.windows, context=args.context, seed=args.seed, patients=args.patients,
                                mask_ratio=args.mask_ratio, patch=args.patch, noise_std=args.noise_std, loss=args.loss,
                                pretext=args.pretext,
                                resume=args.resume, num_workers=args.workers, cache=args.cache, cache_dir=args.cache_dir))
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")


if __name__ == '__main__':
    main()
