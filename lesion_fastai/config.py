"""Every setting of a run, in one place: `PretrainConfig` and `FinetuneConfig` (with `RunConfig`, the
fields both have), `EvaluateConfig` and `PredictConfig` (with `InferenceConfig`) hold each setting's
default, help text and allowed values, declared with `settings.option`. `__post_init__` checks them,
so `FinetuneConfig(kappa=0)` fails from Python as `--kappa 0` fails on the command line, and the
parsers of every command are built from the same fields (`add_settings`, `from_args`). A run resolves
its config once (`finetuning.resolve`, `pretraining.resolve`): what it records is `recorded(resolved)`.

A value out of its range is a `SettingError` (the command line's usage error, exit status 2); settings
that cannot go together (`--freeze sandwich` without a checkpoint, say) are found when the run starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import INITS
from .freeze import FREEZE_ALIASES, FREEZE_MODES
from .genesis import RATES as GENESIS_RATES
from .heatmap import KEEP, NMS_IOU
from .losses import BoxLoss
from .models.autoencoder import CODE_CHANNELS
from .models.detector import HEADS, KAPPA, SANDWICHES
from .settings import (SettingError, add_settings, check_fields, choices, flag_of, from_args, option, parse_floats, parse_ints, recorded,
                       settings_diff)

__all__ = ['SettingError', 'option', 'RunConfig', 'PretrainConfig', 'FinetuneConfig', 'InferenceConfig', 'EvaluateConfig', 'PredictConfig',
           'DEVICES', 'PRECISIONS', 'PRETEXTS', 'pretext_defaults', 'CACHES', 'DEFAULT_CONTEXT', 'PSEUDO_FP',
           'resolve_context', 'recorded', 'settings_diff', 'unused_settings', 'SANDWICH_SETTINGS', 'DECODER_SETTINGS',
           'add_settings', 'from_args', 'choices', 'parse_ints', 'parse_floats', 'flag_of', 'check_fields']

PRECISIONS = ('auto', 'fp32', 'bf16')
DECODER_SETTINGS = ('decoder_skips', 'decoder_deepest')   # change nothing in a run without the decoder sandwich
SANDWICH_SETTINGS = ('adapter_ratio', 'adapter_stem', 'adapter_gate', 'sandwich', *DECODER_SETTINGS)   # nor these without transfer layers


def unused_settings(*runs) -> list:
    """The settings that change nothing in any of `runs` (configs or records, with `freeze` and `sandwich`): the transfer
    layers' where none is a sandwich, the decoder sandwich's where none is one."""
    get = lambda run, k: run.get(k) if isinstance(run, dict) else getattr(run, k, None)
    if not any(get(r, 'freeze') == 'sandwich' for r in runs): return list(SANDWICH_SETTINGS)
    return list(DECODER_SETTINGS) if not any(get(r, 'freeze') == 'sandwich' and get(r, 'sandwich') == 'decoder' for r in runs) else []


DEFAULT_CONTEXT = 2   # neighbour slices on each side, where the data ships them: the strongest lever measured (docs/results.md)
PSEUDO_FP = .1        # self-training's threshold: the teacher's score at this many false positives per validation slice, chosen on
                      # validation of 0.1, 0.25, 0.5, 1 (docs/results.md)
CACHES = ('memory', 'disk', 'none')

# pretext: (mask ratio, patch as a fraction of the size, noise std), what each reconstructs:
# masked: every channel masked and noisy, all of it reconstructed; context: the key slice's patches masked, its
# neighbour slices whole, the key slice reconstructed; mae: a high ratio of small patches masked, no noise, the loss
# on the masked pixels only (masked autoencoders: He et al. 2022; convolutional ones: SparK, ConvNeXt V2); genesis:
# Models Genesis's transformations (Zhou et al. 2019, `genesis.py`), which mask nothing: None, the three unused.
PRETEXTS = {'masked': (.5, 1 / 16, .05), 'context': (.5, 1 / 16, .05), 'mae': (.75, 1 / 32, 0.), 'genesis': (None, None, None)}


def pretext_defaults(pretext: str) -> dict:
    """The settings a pretraining of `pretext` takes where they are not given: its mask ratio and noise
    (its patch depends on the slice size: `pretraining.resolve` fills it), or, for genesis, which masks nothing,
    Models Genesis's rates."""
    if pretext == 'genesis': return {f'genesis_{k}': v for k, v in GENESIS_RATES.items()}
    ratio, _, noise = PRETEXTS[pretext]
    return {'mask_ratio': ratio, 'noise_std': noise}


def _code_channels(v) -> str | None:
    if not 3 <= len(v) <= 4 or min(v) < 1: return f"must be 3 or 4 positive integers joined by commas, got {','.join(map(str, v))}"
    return None


def _loss_terms(v) -> str | None:
    try: BoxLoss(v)
    except ValueError as e: return str(e).removeprefix('loss ')
    return None


def _windows(v) -> str | None:
    from .deeplesion import resolve_windows
    try: resolve_windows(v, (0., 1.))
    except ValueError as e: return str(e)
    return None


@dataclass(kw_only=True)
class RunConfig:
    "The settings both runs have: data, output, schedule, input, seed, loading, precision, body."
    data: Path = option(help='DeepLesion-layout folder: DL_info.csv and Images_png/', group='data')
    out: Path = option(help='output folder', group='data')
    epochs: int = option(20, 'epochs of fit_one_cycle', at_least=1, group='training')
    lr: float = option(3e-3, 'maximum learning rate of the one-cycle schedule', above=0, group='training', mutex='lr')
    bs: int = option(16, 'batch size', at_least=1, group='training')
    size: int | None = option(None, 'input size in pixels', at_least=32, default_help='half the native slice size', group='input')
    windows: str | None = option('soft', 'CT windows as channels, e.g. soft,lung or -100:200 or dicom', check=_windows, group='input')
    context: int | None = option(None, 'neighbour slices on each side of a slice as extra input channels', at_least=0,
                                 default_help=f'{DEFAULT_CONTEXT} where the data ships neighbour slices (DeepLesion does), else 0', group='input')
    seed: int = option(0, 'random seed: initialisation, batches, augmentation (and finetune\'s label subset)', group='training')
    backbone: str | None = option('resnet', "the body: resnet (the project's own) or a timm model name, e.g. resnet18, convnext_atto "
                                  '(features_only at strides 4-32, in_chans from windows x context)', group='model')
    backbone_weights: Path | None = option(None, "a local state dict of the timm --backbone (ImageNet weights, say: nothing is "
                                           'downloaded); timm adapts its first convolution to the input channels', metavar='PATH',
                                           group='model')
    resume: bool = option(False, 'continue an interrupted run from OUT/last.pth', group='training')
    num_workers: int = option(0, 'DataLoader worker processes (0: the main process; with workers use --cache disk, since an in-memory '
                              'cache is not shared with them); also the processes that build the disk cache', flag='--workers', metavar='N',
                              at_least=0, group='loading')
    cache: str = option('memory', 'prepared slices: memory (kept for this run), disk (a memory-mapped float16 array built once per '
                        'slices and settings, reused by later runs and workers) or none', choices=CACHES, group='loading')
    cache_dir: Path | None = option(None, 'folder of the disk cache', default_help='~/.cache/lesion_fastai', group='loading')
    skip_unreadable: bool = option(False, "leave out the slice files that cannot be read, naming each once, rather than stop (NIH's "
                                   'release ships two broken PNGs): a neighbour is replaced by the nearest readable slice of its '
                                   'series, a key slice (a missing one too) leaves the run with its lesions', group='loading')
    precision: str = option('auto', 'auto: bfloat16 autocast and channels_last on a CUDA GPU, float32 on the CPU; fp32: float32 '
                            'everywhere; bf16: bfloat16 on a GPU or on a CPU with bfloat16 units (AVX512-BF16, AMX: about twice as '
                            'fast there, a little lower validation FROC), an error elsewhere', choices=PRECISIONS, group='loading')

    def __post_init__(self):
        self.data, self.out = Path(self.data), Path(self.out)
        if self.cache_dir is not None: self.cache_dir = Path(self.cache_dir)
        if self.backbone_weights is not None: self.backbone_weights = Path(self.backbone_weights)
        check_fields(self)


def _genesis_rate(rate: str, help: str):
    """The field of one of Models Genesis's rates (`genesis.RATES`): unset, the official one; a pretraining
    recorded before the field was made at the official rate if it was a genesis one, at none otherwise."""
    then = lambda record: GENESIS_RATES[rate] if record.get('pretext') == 'genesis' else None
    return option(None, f'genesis: {help}', at_least=0, at_most=1, default_help=f"Models Genesis's {GENESIS_RATES[rate]:g}",
                  unrecorded=then, group='pretext')


@dataclass(kw_only=True)
class PretrainConfig(RunConfig):
    "Settings of `python -m pretrain`: the autoencoder and its pretext."
    epochs: int = option(10, 'epochs of fit_one_cycle (0: the checkpoint of the untrained autoencoder, the control a pretrained start '
                         'is read against: the same path with no pretraining)', at_least=0, group='training')
    windows: str = option('soft', 'CT windows as channels, e.g. soft,lung or -100:200', check=_windows, group='input')
    backbone: str = option('resnet', "the body: resnet (the project's own) or a timm model name, e.g. resnet18, convnext_atto "
                           '(features_only at strides 4-32, in_chans from windows x context)', group='model')
    patients: str = option('train', 'slices of the training patients only, or of train and test patients (labels unused either way; '
                           'all: the autoencoder then sees the test slices a detector is scored on, so its test FROC is no longer '
                           'held out from pretraining)',
                           choices=('train', 'all'), group='data')
    pretext: str = option('masked', "masked: every channel masked and noisy, all reconstructed; context: only the key slice's patches "
                          'masked, its --context neighbours whole, the key slice reconstructed (needs --context 1 or more; fine-tune '
                          'with the same --context); mae: three quarters of small patches masked, no noise, the loss on the masked '
                          'pixels only (masked autoencoders); genesis: Models Genesis (Zhou et al. 2019), each slice locally '
                          'shuffled, mapped through a random intensity curve and in- or out-painted with noise, all of it '
                          'reconstructed (--mask-ratio, --patch and --noise-std unused)', choices=tuple(PRETEXTS), group='pretext')
    mask_ratio: float | None = option(None, 'fraction of patches masked out of the input', at_least=0, below=1,
                                      default_help="the pretext's: 0.5, mae 0.75, genesis unused", group='pretext')
    patch: int | None = option(None, 'masked patch size in pixels', at_least=1,
                               default_help="the pretext's: size/16, mae size/32, genesis unused", group='pretext')
    noise_std: float | None = option(None, 'Gaussian noise added to the windowed input', at_least=0,
                                     default_help="the pretext's: 0.05, mae 0, genesis unused", group='pretext')
    genesis_local: float | None = _genesis_rate('local', 'probability that a slice is locally shuffled')
    genesis_nonlinear: float | None = _genesis_rate('nonlinear', 'probability that a slice is mapped through a random intensity curve')
    genesis_paint: float | None = _genesis_rate('paint', 'probability that a slice is in- or out-painted with noise')
    genesis_outpaint: float | None = _genesis_rate('outpaint', 'share of the painted slices that are out-painted (the rest in-painted)')
    loss: str = option('l1', 'reconstruction loss', choices=('l1', 'mse'), group='pretext')
    code_channels: tuple = option(CODE_CHANNELS, "the autoencoder's bottleneck: channels of its codes at strides 32, 16, 8, and 4 with "
                                  'a fourth number', parse=parse_ints, check=_code_channels, group='model')
    dedup: float = option(0., 'drop training slices whose windowed pixels differ from the slice kept before them in their series by '
                          'less than DIFF on average (e.g. 0.01; 0: keep every slice)', at_least=0, metavar='DIFF', group='data')

    def __post_init__(self):
        self.code_channels = tuple(self.code_channels)
        super().__post_init__()


@dataclass(kw_only=True)
class FinetuneConfig(RunConfig):
    "Settings of `python -m finetune`: the detector, its loss, the freeze mode and the label subset."
    size: int | None = option(None, 'input size in pixels', at_least=32, default_help="half the native slice size, or the checkpoint's",
                              group='input')
    windows: str | None = option(None, 'CT windows as channels, e.g. soft,lung or -100:200 or dicom', check=_windows,
                                 default_help="soft, or the checkpoint's", group='input')
    context: int | None = option(None, 'neighbour slices on each side of a slice as extra input channels', at_least=0,
                                 default_help=f"the checkpoint's, else {DEFAULT_CONTEXT} where the data ships neighbour slices "
                                 '(DeepLesion does), else 0', group='input')
    backbone: str | None = option(None, "the body: resnet (the project's own) or a timm model name, e.g. resnet18 (features_only at "
                                  'strides 4-32, in_chans from windows x context)', default_help="resnet, or the checkpoint's",
                                  group='model')
    backbone_weights: Path | None = option(None, "a local state dict of the timm --backbone (ImageNet weights, say: nothing is "
                                           'downloaded); timm adapts its first convolution to the input channels; without '
                                           '--pretrained this is the transfer-learning baseline, --freeze full by default',
                                           metavar='PATH', group='model')
    head: str = option('direct', 'box head at each heatmap cell: direct (sigmoid x1,y1,w,h) or gaussian (mean + kappa-scaled std)',
                       choices=tuple(sorted(HEADS)), group='model')
    target: str = option('points', 'fastai target block for every lesion of a slice: PointBlock (four corners each) or BBoxBlock',
                         choices=('points', 'bbox'), group='model')
    stride: int = option(4, 'stride of the centre heatmap in input pixels (4: lesions of a few pixels get a cell of their own)',
                         choices=(4, 8), group='model')
    keep: int = option(KEEP, 'boxes kept per slice, the best heatmap peaks (as MULAN keeps)', at_least=1, group='model')
    nms_iou: float | None = option(NMS_IOU, 'also suppress kept boxes overlapping a better one at this IoU (torchvision.ops.nms)',
                                   flag='--nms', above=0, below=1, metavar='IOU',
                                   default_help='off: the heatmap peaks are already one per 3x3 cells', group='model')
    lr_find: bool = option(False, "pick the learning rate with fastai's lr_find (valley)", group='training', mutex='lr')
    loss: str = option('ciou+diou+giou', 'sum of box terms from ciou, diou, giou, l1, mse joined by +', check=_loss_terms,
                       group='loss')
    map_weight: float = option(1., "weight of the centre heatmap's focal loss against the box loss", at_least=0, group='loss')
    map_radius: int = option(1, "the box sizes predicted at cells within this many cells of each lesion's centre cell are trained too "
                             "(placed on the lesion's centre), so a heatmap peak one cell off still gives a trained box size "
                             '(0: the centre cell only)', at_least=0, group='loss')
    wd: float = option(.01, 'weight decay', at_least=0, group='training')
    adapter_ratio: float = option(1., 'sandwich: hidden width of each transfer layer as a fraction of its stage width (1 was chosen '
                                  'on validation by bench select; 0.25 trains a quarter of the parameters)', above=0, at_most=4,
                                  group='freeze')
    adapter_stem: bool = option(False, 'sandwich: a transfer layer after the stem too (default: after each stage only)', group='freeze')
    adapter_gate: bool = option(True, "sandwich: transfer layers whose branch's last convolution starts at zero, as before the gate "
                                "(default: each layer's residual is a learned scalar starting at zero times its branch, chosen on "
                                'validation by bench select)', flag='--no-adapter-gate', unrecorded=False, group='freeze')
    sandwich: str = option('encoder', "with --freeze sandwich: encoder (transfer layers between the frozen encoder's stages, the head "
                           'on the encoder) or decoder (3FabRec: the pretrained encoder and decoder frozen, transfer layers between '
                           "the decoder's blocks, the head on the decoder's stride-4 features)", choices=SANDWICHES, group='freeze')
    decoder_skips: bool = option(True, "with --sandwich decoder: the head reads only what the autoencoder's codes carry, as 3FabRec "
                                 "builds it (default: what the head's pyramid reads of each decoder block also gains a 1x1 projection "
                                 "of the frozen encoder stage at its stride, a path around the codes, chosen on validation by bench "
                                 "select)", flag='--no-decoder-skips', unrecorded=False, group='freeze')
    decoder_deepest: bool = option(False, "with --sandwich decoder: the head's pyramid also reads the frozen encoder's deepest stage "
                                   "(stride 32), below the decoder's first block, as every other mode's pyramid reads it (default: the "
                                   "decoder's blocks at strides 4-16 alone)", group='freeze')
    label_fraction: float = option(1., 'fraction of training patients whose labels are used, chosen with --seed', above=0, at_most=1,
                                   group='data')
    carry_weight: float = option(0., "labels carried to the neighbour slices of each labelled key slice, within the lesion's extent "
                                 '(half its long diameter, at the series\' slice interval) and shrunk as a ball\'s cross-section, as '
                                 'training targets of this weight; 0: off', at_least=0, at_most=1, group='unlabelled')
    pseudo_labels: Path | None = option(None, 'a pseudo-label CSV (python -m lesion_fastai.selftrain) whose boxes, on training '
                                        "patients' slices the run has no labels for, join the training targets", metavar='CSV',
                                        group='unlabelled')
    pseudo_weight: float = option(.5, 'weight of the pseudo-labels as training targets', above=0, at_most=1, group='unlabelled')
    same_epoch_length: bool = option(False, "repeat a label subset to the full training set's length per epoch", cli=False)
    pretrained: Path | None = option(None, 'pretrained.pth from python -m pretrain; its settings are used', metavar='CKPT',
                                     group='freeze')
    freeze: str | None = option(None, 'with --pretrained: sandwich (frozen encoder, trainable transfer layers between its stages), '
                                'encoder (only the head trains), full (every layer trains at one rate, the pretrained ones at lr/--lr-mult; the old name '
                                '"none" still works); with --backbone-weights the same modes (default full: ImageNet transfer); '
                                'scratch without either', choices=FREEZE_MODES, aliases=FREEZE_ALIASES,
                                default_help='sandwich with --pretrained, full with --backbone-weights, else scratch', group='freeze')
    update_frozen_bn: bool = option(False, 'let frozen BatchNorm layers update their running statistics (default: keep them)',
                                    group='freeze')
    train_frozen_bn: bool = option(False, "the frozen layers' BatchNorm weights and biases train and their statistics follow the data, "
                                   "fastai's default train_bn=True (default: frozen BatchNorm kept whole, train_bn=False)", group='freeze')
    unfreeze_after: int = option(0, "with --freeze sandwich or encoder, fastai's fine_tune recipe: that many epochs frozen (a one-cycle "
                                 'peaking at its end), then every layer trains for the rest of --epochs in a second one-cycle at '
                                 'discriminative rates (the pretrained layers at lr/D/--lr-mult, the rest at lr/D, D --unfrozen-lr-div); '
                                 '0: frozen throughout', at_least=0, metavar='K', group='freeze')
    unfrozen_lr_div: float = option(1., "with --unfreeze-after: the rate of the unfrozen epochs is lr divided by this (1: the rate "
                                    "scratch trains at, chosen on validation of 2, 1 with the untrained control, docs/results.md; fastai's "
                                    'fine_tune halves it: 2, as every run that unfroze did before this setting)', above=0, metavar='D',
                                    unrecorded=lambda run: 2. if run.get('unfreeze_after') else 1., group='freeze')
    lr_mult: float = option(1., "how many times slower the pretrained layers train than the fresh ones: with --freeze full, and with "
                            "--unfreeze-after once unfrozen (fastai's fine_tune lr_mult; 1, one rate as from scratch, chosen on validation "
                            "of 100, 10, 1, docs/results.md)", above=0,
                            group='freeze')
    transfer_stages: int | None = option(None, "with --pretrained and --freeze full: the checkpoint's stem and first K stages load, the "
                                         'later stages start fresh (0: the stem only)', at_least=0, metavar='K',
                                         default_help='every stage', group='freeze')
    pretrained_init: str = option('weights', "what a pretrained start takes from --pretrained: its weights; only their scale (each "
                                  "pretrained tensor's mean and std, fresh draws: the scale-only control of Raghu et al. 2019; "
                                  "BatchNorm statistics fresh); or only its architecture (scratch: the weights a scratch run draws "
                                  "with --seed, so that the run differs from scratch in the --freeze path alone: the control)",
                                  choices=INITS, group='freeze')
    kappa: float = option(KAPPA, 'gaussian head: std scale, std = kappa * softplus(output)', above=0, group='loss')
    nll_weight: float = option(.1, 'gaussian head: weight of the negative log-likelihood of the target under the predicted mean and '
                               'std, the term that makes the std an uncertainty (0.1 was chosen on validation by bench select; 0: the '
                               'std is trained only through the sampled box, and collapses)', at_least=0, group='loss')
    out_bn: bool = option(False, 'BatchNorm on the output layer (off by default: it hurt before)', group='model')
    augment: bool = option(True, 'no flips, rotations, zoom or lighting changes', flag='--no-augment', group='training')
    n_figure: int = option(8, 'test slices drawn in results.png', at_least=1, cli=False)
    time_budget_s: float | None = option(None, 'stop training after this many seconds', above=0, cli=False)

    def __post_init__(self):
        if self.pretrained is not None: self.pretrained = Path(self.pretrained)
        if self.pseudo_labels is not None: self.pseudo_labels = Path(self.pseudo_labels)
        super().__post_init__()


DEVICES = ('auto', 'cpu', 'cuda')


@dataclass(kw_only=True)
class InferenceConfig:
    "Settings of running a trained detector: `python -m lesion_fastai.evaluate` and `python -m lesion_fastai.predict`."
    model: Path = option(help="a trained detector: finetune's OUT/export.pkl, or its OUT/model.safetensors (model.json beside it)",
                         cli=False)
    device: str = option('auto', 'auto: a CUDA GPU when there is one', choices=DEVICES, group='inference')
    bs: int = option(16, 'slices per batch', at_least=1, group='inference')

    def __post_init__(self):
        for name in ('model', 'data', 'out'):
            if getattr(self, name, None) is not None: setattr(self, name, Path(getattr(self, name)))
        check_fields(self)


@dataclass(kw_only=True)
class EvaluateConfig(InferenceConfig):
    "Settings of `python -m lesion_fastai.evaluate`: a trained detector scored on the test patients of a data folder."
    data: Path = option(help='DeepLesion-layout folder whose test patients (Train_Val_Test 3) are scored', group='data')
    out: Path | None = option(None, 'output folder: eval_metrics.json, eval_predictions.csv, eval_froc.png, eval_results.png, '
                              'eval_errors.png, eval_report.html', default_help='the folder of MODEL', group='data')
    skip_unreadable: bool = option(False, 'leave out the test slices that cannot be read or are missing, naming each once, rather '
                                   'than stop; a neighbour is replaced by the nearest readable slice of its series', group='data')


@dataclass(kw_only=True)
class PredictConfig(InferenceConfig):
    "Settings of `python -m lesion_fastai.predict`: a trained detector on new scans."
    inputs: tuple = option((), 'PNG, DICOM or NIfTI files, or folders holding them (searched recursively)', cli=False)
    out: Path = option(help='output folder: predictions.csv, skipped.csv, overlays/', group='data')
    num_workers: int = option(0, 'DataLoader worker processes reading the slices (0: the main process)', flag='--workers', metavar='N',
                              at_least=0, group='inference')
    overlays: bool = option(False, 'write OUT/overlays/*.png: each slice with its boxes above --min-score and its top box always',
                            group='output')
    min_score: float | None = option(None, 'lowest score of a box drawn on an overlay (the top box of a slice is drawn whatever it '
                                     'scores)', default_help="the model's operating point, the score of 1 false positive per "
                                     'validation slice', group='output')
    max_boxes: int = option(5, 'most boxes drawn on an overlay, best first', at_least=1, group='output')
    strict: bool = option(False, 'any input that cannot be predicted is an error (exit 1, nothing written)', group='output')


def resolve_context(context: int | None, records, data) -> int:
    """The neighbour slices a run sees on each side: `context` when given, else `DEFAULT_CONTEXT` where
    the data ships neighbour slices (`deeplesion.ships_neighbours`), else 0, which is said once."""
    from .deeplesion import ships_neighbours
    from .log import log
    if context is not None: return context
    if ships_neighbours(records): return DEFAULT_CONTEXT
    log.info(f"--context: {data} ships no neighbour slices beside its key slices, so each slice is seen alone (--context 0)")
    return 0


