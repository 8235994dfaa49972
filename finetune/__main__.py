"""python -m finetune: train the lesion detector, from scratch or from a pretrained encoder.

Examples:
    python -m finetune --data data/synthetic --out runs/scratch
    python -m finetune --data data/synthetic --pretrained runs/pretrain/pretrained.pth --freeze sandwich --out runs/sandwich
    python -m finetune --data data/synthetic --pretrained runs/pretrain/pretrained.pth --freeze sandwich --sandwich decoder --out runs/decoder
    python -m finetune --eval runs/sandwich/export.pkl --data data/synthetic
    torchrun --nproc_per_node 4 -m finetune --data data/synthetic --out runs/scratch
        (data parallel, one process per GPU, or gloo on CPUs; --bs is per process; rank 0 writes and evaluates)
"""
import argparse
import sys
from pathlib import Path

from lesion_fastai.cache import add_loading_args
from lesion_fastai.freeze import FREEZE_MODES
from lesion_fastai.losses import TERMS
from lesion_fastai.models.localizer import HEADS, SANDWICHES


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog='python -m finetune', description=__doc__.split('\n\n')[0],
                                 epilog=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', type=Path, required=True, help='DeepLesion-layout folder: DL_info.csv and Images_png/')
    ap.add_argument('--out', type=Path, default=None, help='output folder (default runs/finetune); with --eval, where eval files go')
    ap.add_argument('--eval', type=Path, default=None, metavar='MODEL', help='only evaluate an exported model (export.pkl) on the test split: '
                    'eval_metrics.json, eval_predictions.csv, eval_froc.png, eval_results.png')
    ap.add_argument('--head', choices=sorted(HEADS), default='direct', help='box head at each heatmap cell: direct (sigmoid x1,y1,w,h) or '
                    'gaussian (mean + kappa-scaled std) (default direct)')
    ap.add_argument('--target', choices=['points', 'bbox'], default='points', help='fastai target block for every lesion of a slice: '
                    'PointBlock (four corners each) or BBoxBlock (default points)')
    ap.add_argument('--keep', type=int, default=50, help='boxes kept per slice, the best heatmap peaks (default 50, as MULAN keeps)')
    ap.add_argument('--nms', type=float, default=None, metavar='IOU', help='also suppress kept boxes overlapping a better one at this IoU '
                    '(torchvision.ops.nms; default: off, the heatmap peaks are already one per 3x3 cells)')
    ap.add_argument('--stride', type=int, choices=[4, 8], default=4, help='stride of the centre heatmap in input pixels (default 4, so that '
                    'lesions of a few pixels get a cell of their own)')
    ap.add_argument('--size', type=int, default=None, help='input size in pixels (default half the native size, or the checkpoint\'s)')
    ap.add_argument('--windows', default=None, help="CT windows as channels, e.g. soft,lung or -100:200 or dicom (default soft, or the checkpoint's)")
    ap.add_argument('--context', type=int, default=None, help="neighbour slices on each side as extra channels (default 0, or the checkpoint's)")
    ap.add_argument('--epochs', type=int, default=20, help='epochs of fit_one_cycle (default 20)')
    lr = ap.add_mutually_exclusive_group()
    lr.add_argument('--lr', type=float, default=3e-3, help='maximum learning rate of the one-cycle schedule (default 3e-3)')
    lr.add_argument('--lr-find', action='store_true', help="pick the learning rate with fastai's lr_find (valley)")
    ap.add_argument('--bs', type=int, default=16, help='batch size (default 16)')
    ap.add_argument('--loss', default='ciou+diou+giou', help=f"sum of terms from {', '.join(TERMS)} joined by + (default ciou+diou+giou)")
    ap.add_argument('--map-weight', type=float, default=1., help="weight of the centre heatmap's focal loss against the box loss (default 1)")
    ap.add_argument('--map-radius', type=int, default=1, help="the box sizes predicted at cells within this many cells of each lesion's "
                    "centre cell are trained too (placed on the lesion's centre), so a heatmap peak one cell off still gives "
                    'a trained box size (default 1; 0: the centre cell only)')
    ap.add_argument('--wd', type=float, default=.01, help='weight decay (default 0.01)')
    ap.add_argument('--adapter-ratio', type=float, default=1., help='sandwich: hidden width of each transfer layer as a fraction of '
                    'its stage width (default 1, chosen on validation by bench select; 0.25 trains a quarter of the parameters)')
    ap.add_argument('--sandwich', choices=SANDWICHES, default='encoder', help='with --freeze sandwich: encoder (transfer layers between '
                    "the frozen encoder's stages, the head on the encoder; default) or decoder (3FabRec: the pretrained encoder and "
                    "decoder frozen, transfer layers between the decoder's blocks, the head on the decoder's stride-4 features)")
    ap.add_argument('--adapter-stem', action='store_true', help='sandwich: a transfer layer after the stem too (default: after each stage only)')
    ap.add_argument('--label-fraction', type=float, default=1., help='fraction of training patients whose labels are used, chosen with --seed (default 1)')
    ap.add_argument('--seed', type=int, default=0, help='random seed for labels subset, initialisation, batches and augmentation (default 0)')
    ap.add_argument('--pretrained', type=Path, default=None, metavar='CKPT', help='pretrained.pth from python -m pretrain; its settings are used')
    ap.add_argument('--freeze', choices=FREEZE_MODES, default=None,
                    help='with --pretrained: sandwich (frozen encoder, trainable transfer layers between its stages, default), '
                         'encoder (only the head trains), none (all train, encoder at lr/10); with --backbone-weights the same '
                         'modes (default none: ImageNet transfer); scratch without either')
    ap.add_argument('--update-frozen-bn', action='store_true', help='let frozen BatchNorm layers update their running statistics (default: keep them)')
    ap.add_argument('--kappa', type=float, default=.05, help='gaussian head: std scale, std = kappa * softplus(output) (default 0.05)')
    ap.add_argument('--nll-weight', type=float, default=.1, help='gaussian head: weight of the negative log-likelihood of the target '
                    'under the predicted mean and std, the term that makes the std an uncertainty (default 0.1, chosen on validation '
                    'by bench select; 0: the std is trained only through the sampled box, and collapses)')
    ap.add_argument('--out-bn', action='store_true', help='BatchNorm on the output layer (off by default: it hurt before)')
    ap.add_argument('--no-augment', action='store_true', help='no flips, rotations, zoom or lighting changes')
    ap.add_argument('--resume', action='store_true', help='continue an interrupted run from OUT/last.pth')
    ap.add_argument('--backbone', default=None, help="the body: resnet (default, or the checkpoint's) or a timm model name, e.g. resnet18 (features_only at strides 4-32, in_chans from windows x context)")
    ap.add_argument('--backbone-weights', type=Path, default=None, metavar='PATH', help="a local state dict of the timm --backbone (e.g. ImageNet weights: nothing is downloaded); timm adapts its first convolution to the input channels; without --pretrained this is the transfer-learning baseline, --freeze none by default")
    add_loading_args(ap)
    args = ap.parse_args(argv)
    if args.eval is None:
        for name, v, lo in (('--epochs', args.epochs, 1), ('--bs', args.bs, 1), ('--context', args.context or 0, 0), ('--size', args.size or 32, 32)):
            if v < lo: ap.error(f'{name} must be at least {lo}, got {v}')
        if args.map_radius < 0: ap.error(f'--map-radius must be at least 0, got {args.map_radius}')
        if not 0 < args.adapter_ratio <= 4: ap.error(f'--adapter-ratio must be in (0, 4], got {args.adapter_ratio}')
        if args.wd < 0: ap.error(f'--wd must be at least 0, got {args.wd}')
        if not 0 < args.label_fraction <= 1: ap.error(f'--label-fraction must be in (0, 1], got {args.label_fraction}')
        if args.lr <= 0: ap.error(f'--lr must be positive, got {args.lr}')
        if args.kappa <= 0: ap.error(f'--kappa must be positive, got {args.kappa}')
        if args.nll_weight < 0: ap.error(f'--nll-weight must be at least 0, got {args.nll_weight}')
        if args.keep < 1: ap.error(f'--keep must be at least 1, got {args.keep}')
        if args.nms is not None and not 0 < args.nms < 1: ap.error(f'--nms must be an IoU in (0, 1), got {args.nms}')
    return args


def main(argv=None):
    args = parse_args(argv)
    from lesion_fastai.distributed import quiet_other_ranks
    quiet_other_ranks()
    from lesion_fastai.train import FinetuneConfig, evaluate_export, finetune
    try:
        if args.eval is not None:
            from lesion_fastai.metrics import summary_line
            print(f"test: {summary_line(evaluate_export(args.eval, args.data, args.out)['test'])}")
            return
        finetune(FinetuneConfig(
            data=args.data, out=args.out or Path('runs/finetune'), head=args.head, target=args.target, stride=args.stride, keep=args.keep, nms_iou=args.nms, size=args.size,
            windows=args.windows, context=args.context, epochs=args.epochs, lr=args.lr, lr_find=args.lr_find, bs=args.bs,
            loss=args.loss, map_weight=args.map_weight, map_radius=args.map_radius, wd=args.wd, adapter_ratio=args.adapter_ratio,
            adapter_stem=args.adapter_stem, sandwich=args.sandwich, label_fraction=args.label_fraction, seed=args.seed, pretrained=args.pretrained, freeze=args.freeze,
            update_frozen_bn=args.update_frozen_bn, kappa=args.kappa, nll_weight=args.nll_weight, out_bn=args.out_bn, augment=not args.no_augment,
            resume=args.resume, num_workers=args.workers, cache=args.cache, cache_dir=args.cache_dir,
            precision=args.precision, backbone=args.backbone, backbone_weights=args.backbone_weights))
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")


if __name__ == '__main__':
    main()
