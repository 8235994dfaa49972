"""python -m pretrain: unsupervised autoencoder pretraining on every slice of the training patients.

Labels are not used: the autoencoder reconstructs clean slices from masked, noisy ones (or, with
--pretext context, a slice's masked patches from its neighbour slices; with --pretext mae, three
quarters of small patches, scored on the masked pixels only). Writes
OUT/pretrained.pth (encoder, decoder, construction arguments, config) for python -m finetune --pretrained.

Example:
    python -m pretrain --data data/synthetic --out runs/pretrain --epochs 10
    python -m pretrain --data data/synthetic --out runs/pretrain_context --pretext context --context 2
    python -m pretrain --data data/synthetic --out runs/pretrain_mae --pretext mae
    torchrun --nproc_per_node 4 -m pretrain --data data/synthetic --out runs/pretrain --cache disk
        (data parallel, one process per GPU, or gloo on CPUs; --bs is per process; rank 0 writes)
"""
import argparse
import sys
from pathlib import Path

from lesion_fastai.cache import add_loading_args
from lesion_fastai.models.autoencoder import CODE_CHANNELS


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
    ap.add_argument('--mask-ratio', type=float, default=None, help='fraction of patches masked out of the input (default 0.5; mae 0.75)')
    ap.add_argument('--patch', type=int, default=None, help='masked patch size in pixels (default size/16; mae size/32)')
    ap.add_argument('--noise-std', type=float, default=None, help='Gaussian noise added to the windowed input (default 0.05; mae 0)')
    codes = ','.join(map(str, CODE_CHANNELS))
    ap.add_argument('--code-channels', default=codes, help="the autoencoder's bottleneck: channels of its codes at strides 32, 16, 8, "
                    f"and 4 with a fourth number (default {codes})")
    ap.add_argument('--loss', choices=['l1', 'mse'], default='l1', help='reconstruction loss (default l1)')
    ap.add_argument('--pretext', choices=['masked', 'context', 'mae'], default='masked',
                    help="masked: every channel masked and noisy, all reconstructed (default); context: only the key "
                         "slice's patches masked, its --context neighbours whole, the key slice reconstructed (needs "
                         "--context 1 or more; fine-tune with the same --context); mae: three quarters of small patches "
                         "masked, no noise, the loss on the masked pixels only (masked autoencoders)")
    ap.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    ap.add_argument('--resume', action='store_true', help='continue an interrupted run from OUT/last.pth')
    ap.add_argument('--backbone', default='resnet', help="the body: resnet (the project's own, default) or a timm model name, e.g. resnet18, convnext_atto (features_only at strides 4-32, in_chans from windows x context)")
    ap.add_argument('--backbone-weights', type=Path, default=None, metavar='PATH', help="a local state dict of the timm --backbone (e.g. ImageNet weights: nothing is downloaded); timm adapts its first convolution to the input channels")
    ap.add_argument('--dedup', type=float, default=0., metavar='DIFF', help='drop training slices whose windowed pixels differ from the '
                    'slice kept before them in their series by less than DIFF on average (e.g. 0.01; default 0: keep every slice)')
    add_loading_args(ap)
    args = ap.parse_args(argv)
    for name, v, lo in (('--epochs', args.epochs, 1), ('--bs', args.bs, 1), ('--context', args.context, 0), ('--size', args.size or 32, 32)):
        if v < lo: ap.error(f'{name} must be at least {lo}, got {v}')
    if args.mask_ratio is not None and not 0 <= args.mask_ratio < 1: ap.error(f'--mask-ratio must be in [0, 1), got {args.mask_ratio}')
    try: args.code_channels = tuple(int(c) for c in args.code_channels.split(','))
    except ValueError: ap.error(f'--code-channels must be 3 or 4 integers joined by commas, got {args.code_channels!r}')
    if not 3 <= len(args.code_channels) <= 4 or min(args.code_channels) < 1:
        ap.error(f'--code-channels must be 3 or 4 positive integers joined by commas, got {args.code_channels}')
    return args


def main(argv=None):
    args = parse_args(argv)
    from lesion_fastai.distributed import quiet_other_ranks
    quiet_other_ranks()
    from lesion_fastai.train import PretrainConfig, pretrain
    try:
        pretrain(PretrainConfig(data=args.data, out=args.out, epochs=args.epochs, lr=args.lr, bs=args.bs, size=args.size,
                                windows=args.windows, context=args.context, seed=args.seed, patients=args.patients,
                                mask_ratio=args.mask_ratio, patch=args.patch, noise_std=args.noise_std, loss=args.loss,
                                pretext=args.pretext, code_channels=args.code_channels,
                                resume=args.resume, num_workers=args.workers, cache=args.cache, cache_dir=args.cache_dir,
                                precision=args.precision, dedup=args.dedup, backbone=args.backbone, backbone_weights=args.backbone_weights))
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")


if __name__ == '__main__':
    main()
