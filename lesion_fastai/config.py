"""Every setting of a run, in one place: `PretrainConfig` and `FinetuneConfig` (with `RunConfig`, the
fields both have) hold each setting's default, help text and allowed values. `__post_init__` checks
them, so `FinetuneConfig(kappa=0)` fails from Python as `--kappa 0` fails on the command line, and
the parsers of `python -m pretrain`, `python -m finetune`, the search and the benchmarks are built from
the same fields (`add_settings`, `from_args`).

A value out of its range is a `SettingError` (the command line's usage error, exit status 2); settings
that cannot go together (`--freeze sandwich` without a checkpoint, say) are found when the run starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path

from .freeze import FREEZE_ALIASES, FREEZE_MODES
from .heatmap import KEEP, NMS_IOU
from .losses import BoxLoss
from .models.autoencoder import CODE_CHANNELS
from .models.detector import HEADS, KAPPA, SANDWICHES

__all__ = ['SettingError', 'option', 'RunConfig', 'PretrainConfig', 'FinetuneConfig', 'PRECISIONS', 'PRETEXTS', 'CACHES', 'DEFAULT_CONTEXT', 'PSEUDO_FP',
           'resolve_context',
           'add_settings', 'from_args', 'choices', 'parse_ints', 'parse_floats', 'flag_of']

PRECISIONS = ('auto', 'fp32', 'bf16')
DEFAULT_CONTEXT = 2   # neighbour slices on each side, where the data ships them: the strongest lever measured (README)
PSEUDO_FP = .1        # self-training's threshold: the teacher's score at this many false positives per validation slice, chosen on
                      # validation of 0.1, 0.25, 0.5, 1 (README)
CACHES = ('memory', 'disk', 'none')

# pretext: (mask ratio, patch as a fraction of the size, noise std), what each reconstructs:
# masked: every channel masked and noisy, all of it reconstructed; context: the key slice's patches masked, its
# neighbour slices whole, the key slice reconstructed; mae: a high ratio of small patches masked, no noise, the loss
# on the masked pixels only (masked autoencoders: He et al. 2022; convolutional ones: SparK, ConvNeXt V2).
PRETEXTS = {'masked': (.5, 1 / 16, .05), 'context': (.5, 1 / 16, .05), 'mae': (.75, 1 / 32, 0.)}


class SettingError(ValueError):
    "A setting outside the values it allows; on the command line, argparse's usage error."


def option(default=MISSING, help: str = '', *, flag: str | None = None, choices=None, aliases: dict | None = None,
           at_least=None, above=None, at_most=None, below=None, parse=None, check=None, metavar: str | None = None,
           default_help: str | None = None, cli: bool = True, group: str = 'run', mutex: str | None = None):
    """A config field with what its command-line flag needs: `help` (the default is appended unless
    `default_help` says it in words), `flag` (default --name-with-dashes), allowed `choices` (with
    `aliases`: old names accepted for new ones), bounds (`at_least`, `above`, `at_most`, `below`),
    `parse` (text -> value, for tuples), `check` (value -> message or None, for what bounds cannot
    say). `cli=False` keeps a field out of the parsers (set from Python only)."""
    meta = dict(help=help, flag=flag, choices=choices, aliases=aliases or {}, at_least=at_least, above=above, at_most=at_most,
                below=below, parse=parse, check=check, metavar=metavar, default_help=default_help, cli=cli, group=group, mutex=mutex)
    return field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get('flag') or '--' + f.name.replace('_', '-')


def _bounds(m: dict) -> str | None:
    "The allowed range in words: 'at least 1', 'positive', 'in (0, 1]'."
    lo = ('(', m['above']) if m['above'] is not None else ('[', m['at_least']) if m['at_least'] is not None else None
    hi = (')', m['below']) if m['below'] is not None else (']', m['at_most']) if m['at_most'] is not None else None
    if lo and hi: return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo: return f"at least {lo[1]:g}" if lo[0] == '[' else 'positive' if lo[1] == 0 else f"greater than {lo[1]:g}"
    if hi: return f"at most {hi[1]:g}" if hi[0] == ']' else f"less than {hi[1]:g}"
    return None


def _out_of_bounds(m: dict, v) -> bool:
    return ((m['at_least'] is not None and v < m['at_least']) or (m['above'] is not None and v <= m['above'])
            or (m['at_most'] is not None and v > m['at_most']) or (m['below'] is not None and v >= m['below']))


def _check_fields(cfg) -> None:
    "Each field against its choices, bounds and check; aliases are replaced by the names they stand for."
    for f in dataclasses.fields(cfg):
        m, v = f.metadata, getattr(cfg, f.name)
        if not m or v is None: continue
        if m['aliases'] and v in m['aliases']:
            v = m['aliases'][v]
            object.__setattr__(cfg, f.name, v)
        if m['choices'] is not None and v not in m['choices']:
            raise SettingError(f"{flag_of(f)} {v!r}: expected one of {', '.join(map(str, m['choices']))}")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and _out_of_bounds(m, v):
            raise SettingError(f"{flag_of(f)} must be {_bounds(m)}, got {v:g}")
        problem = m['check'](v) if m['check'] else None
        if problem: raise SettingError(f"{flag_of(f)} {problem}")


def parse_ints(text: str) -> tuple[int, ...]:
    "'64,8,4' -> (64, 8, 4)."
    try: return tuple(int(c) for c in str(text).split(',') if c.strip())
    except ValueError: raise argparse.ArgumentTypeError(f"{text!r} is not integers joined by commas") from None


def parse_floats(text: str) -> tuple[float, ...]:
    "'0.02,0.1,1' -> (0.02, 0.1, 1.0)."
    try: return tuple(float(c) for c in str(text).split(',') if c.strip())
    except ValueError: raise argparse.ArgumentTypeError(f"{text!r} is not numbers joined by commas") from None


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
    seed: int = option(0, 'random seed: label subset, initialisation, batches, augmentation', group='training')
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
    precision: str = option('auto', 'auto: bfloat16 autocast and channels_last on a CUDA GPU, float32 on the CPU; fp32: float32 '
                            'everywhere; bf16: bfloat16 on a GPU or on a CPU with bfloat16 units (AVX512-BF16, AMX: about twice as '
                            'fast there, a little lower validation FROC), an error elsewhere', choices=PRECISIONS, group='loading')

    def __post_init__(self):
        self.data, self.out = Path(self.data), Path(self.out)
        if self.cache_dir is not None: self.cache_dir = Path(self.cache_dir)
        if self.backbone_weights is not None: self.backbone_weights = Path(self.backbone_weights)
        _check_fields(self)


@dataclass(kw_only=True)
class PretrainConfig(RunConfig):
    "Settings of `python -m pretrain`: the autoencoder and its pretext."
    epochs: int = option(10, 'epochs of fit_one_cycle', at_least=1, group='training')
    windows: str = option('soft', 'CT windows as channels, e.g. soft,lung or -100:200', check=_windows, group='input')
    backbone: str = option('resnet', "the body: resnet (the project's own) or a timm model name, e.g. resnet18, convnext_atto "
                           '(features_only at strides 4-32, in_chans from windows x context)', group='model')
    patients: str = option('train', 'slices of the training patients only, or of train and test patients (labels unused either way)',
                           choices=('train', 'all'), group='data')
    pretext: str = option('masked', "masked: every channel masked and noisy, all reconstructed; context: only the key slice's patches "
                          'masked, its --context neighbours whole, the key slice reconstructed (needs --context 1 or more; fine-tune '
                          'with the same --context); mae: three quarters of small patches masked, no noise, the loss on the masked '
                          'pixels only (masked autoencoders)', choices=tuple(PRETEXTS), group='pretext')
    mask_ratio: float | None = option(None, 'fraction of patches masked out of the input', at_least=0, below=1,
                                      default_help="the pretext's: 0.5, mae 0.75", group='pretext')
    patch: int | None = option(None, 'masked patch size in pixels', at_least=1, default_help="the pretext's: size/16, mae size/32",
                               group='pretext')
    noise_std: float | None = option(None, 'Gaussian noise added to the windowed input', at_least=0,
                                     default_help="the pretext's: 0.05, mae 0", group='pretext')
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
    sandwich: str = option('encoder', "with --freeze sandwich: encoder (transfer layers between the frozen encoder's stages, the head "
                           'on the encoder) or decoder (3FabRec: the pretrained encoder and decoder frozen, transfer layers between '
                           "the decoder's blocks, the head on the decoder's stride-4 features)", choices=SANDWICHES, group='freeze')
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
                                'encoder (only the head trains), full (every layer trains, the encoder at lr/10; the old name '
                                '"none" still works); with --backbone-weights the same modes (default full: ImageNet transfer); '
                                'scratch without either', choices=FREEZE_MODES, aliases=FREEZE_ALIASES,
                                default_help='sandwich with --pretrained, full with --backbone-weights, else scratch', group='freeze')
    update_frozen_bn: bool = option(False, 'let frozen BatchNorm layers update their running statistics (default: keep them)',
                                    group='freeze')
    unfreeze_after: int = option(0, "with --freeze sandwich or encoder, fastai's fine_tune recipe: that many epochs frozen (a one-cycle "
                                 'peaking at its end), then every layer trains for the rest of --epochs in a second one-cycle at '
                                 'discriminative rates (the pretrained layers at lr/2/--lr-mult, the rest at lr/2); 0: frozen throughout',
                                 at_least=0, metavar='K', group='freeze')
    lr_mult: float = option(1., "with --unfreeze-after: how many times slower the pretrained layers train than the fresh ones once "
                            "unfrozen (fastai's fine_tune lr_mult; 1, chosen on validation of 100, 10, 1, README)", above=0,
                            group='freeze')
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


def resolve_context(context: int | None, records, data) -> int:
    """The neighbour slices a run sees on each side: `context` when given, else `DEFAULT_CONTEXT` where
    the data ships neighbour slices (`deeplesion.ships_neighbours`), else 0, which is said once."""
    from .deeplesion import ships_neighbours
    from .log import log
    if context is not None: return context
    if ships_neighbours(records): return DEFAULT_CONTEXT
    log.info(f"--context: {data} ships no neighbour slices beside its key slices, so each slice is seen alone (--context 0)")
    return 0


def choices(cls, name: str) -> tuple:
    "The values a field of a config class allows."
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata['choices']


def _help(f: dataclasses.Field) -> str:
    m = f.metadata
    if m['default_help'] is not None: return f"{m['help']} (default {m['default_help']})"
    if f.default is MISSING or f.default is False or m['flag'] == '--no-augment': return m['help']
    shown = ','.join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
    return f"{m['help']} (default {shown})"


def add_settings(ap: argparse.ArgumentParser, cls, names=None, defaults: dict | None = None, shown: dict | None = None,
                 required=('data',)) -> None:
    """Add the flags of `cls`'s fields (those in `names`, default every field with a flag) to `ap`,
    in argument groups; `defaults` replace a field's default on the command line (`shown` says one in
    words in the help); `required` fields must be given."""
    defaults, shown = defaults or {}, shown or {}
    hints = typing.get_type_hints(cls)
    groups, mutex = {}, {}
    for f in dataclasses.fields(cls):
        m = f.metadata
        if not m.get('cli') or (names is not None and f.name not in names): continue
        g = groups.get(m['group']) or groups.setdefault(m['group'], ap.add_argument_group(f"{m['group']} settings"))
        if m['mutex']: g = mutex.get(m['mutex']) or mutex.setdefault(m['mutex'], g.add_mutually_exclusive_group())
        kind = hints[f.name]
        default = defaults.get(f.name, f.default)
        kw = dict(dest=f.name, help=_help(f) if f.name not in defaults else f"{m['help']} (default {shown.get(f.name, default)})")
        if kind is bool:
            g.add_argument(flag_of(f), action='store_false' if default is True else 'store_true', **kw)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind) if typing.get_origin(kind) else kind
        parse = m['parse'] or (base if base in (int, float, Path) else str)
        choices_ = None if m['aliases'] or m['choices'] is None else m['choices']
        if m['aliases'] and m['choices']: kw['metavar'] = '{' + ','.join(m['choices']) + '}'
        if m['metavar']: kw['metavar'] = m['metavar']
        g.add_argument(flag_of(f), type=parse, choices=choices_, default=None if default is MISSING else default,
                       required=f.name in required and default is MISSING, **kw)


def from_args(cls, ap: argparse.ArgumentParser, args: argparse.Namespace, **extra):
    """`cls` from parsed flags (and `extra` fields); a value out of range is argparse's usage error,
    naming the flag (exit status 2)."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    try: return cls(**{**given, **extra})
    except SettingError as e: ap.error(str(e))
