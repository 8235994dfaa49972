"""What the benchmarks share: their modes, the machine they ran on, their generated data, the configs
of their pretrainings and fine-tunes, the settings every benchmark of the efficiency folder has
(`BenchSettings`, whose fields are each subcommand's flags), and the ending every benchmark has: a
table printed and written as Markdown beside its JSON. `grid` runs what they build."""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..config import PRECISIONS, PretrainConfig, RunConfig, add_settings, check_fields, option
from ..files import atomic_write_text, write_json
from ..log import log

__all__ = ['MODES', 'MODE_ALIASES', 'GRID_MODES', 'NO_CHECKPOINT', 'SELF_TRAINED', 'UNFREEZE_AFTER', 'CARRY_WEIGHT', 'EPOCHS', 'SEEDS',
           'PATIENTS', 'NATIVE', 'EFFICIENCY_OUT', 'GROUP', 'mode_changes', 'machine', 'ensure_data', 'data_context', 'tag',
           'pretrain_folder', 'precision_change', 'pretrain_config', 'pretraining', 'finetune_config', 'run_name', 'teacher_config',
           'pseudo_csv', 'test_row', 'pm', 'report', 'default_of', 'unknown', 'BenchSettings', 'add_bench_settings', 'quick', 'data_folder',
           'CONTROL', 'pretext_changes', 'control_changes', 'pretext_tag']

# bench mode -> (FinetuneConfig.freeze, FinetuneConfig.sandwich); 'none' is the old name of 'full'. The -ft modes unfreeze after
# the frozen epochs (fastai's fine_tune); carry: scratch with labels carried to the neighbour slices; selftrain: scratch with the
# scratch run's pseudo-labels (the same label fraction and seed as teacher); selftrain-ae: the same, the student from the autoencoder;
# full-scale: full from fresh draws with the scale of the pretrained weights; full-kK: full with only the stem and first K stages loaded
MODES = {'scratch': ('scratch', 'encoder'), 'full': ('full', 'encoder'), 'encoder': ('encoder', 'encoder'),
         'sandwich': ('sandwich', 'encoder'), 'decoder-sandwich': ('sandwich', 'decoder'), 'imagenet': ('full', 'encoder'),
         'sandwich-ft': ('sandwich', 'encoder'), 'encoder-ft': ('encoder', 'encoder'), 'decoder-sandwich-ft': ('sandwich', 'decoder'),
         'carry': ('scratch', 'encoder'), 'selftrain': ('scratch', 'encoder'), 'selftrain-ae': ('full', 'encoder'),
         'full-scale': ('full', 'encoder'), **{f'full-k{k}': ('full', 'encoder') for k in range(4)}}
MODE_ALIASES = {'none': 'full'}
GRID_MODES = ('scratch', 'full', 'sandwich', 'decoder-sandwich', 'imagenet')
NO_CHECKPOINT = ('scratch', 'imagenet', 'carry', 'selftrain')   # modes that do not start from the autoencoder
SELF_TRAINED = ('selftrain', 'selftrain-ae')                      # students of the scratch run of their label fraction and seed


UNFREEZE_AFTER = 5   # the -ft modes' frozen epochs, chosen on validation of 5, 2 (docs/results.md)
CARRY_WEIGHT = .5    # the carry mode's weight, chosen on validation of 0.5, 1, 0.25, 0.1 (docs/results.md)
EPOCHS = 30          # every benchmark fine-tune's epochs, the same for every run
SEEDS = (0, 1, 2)    # label subsets and initialisations, shared by every mode
PATIENTS, NATIVE = 250, 256                      # the generated data: the demo's
EFFICIENCY_OUT = Path('runs/bench/efficiency')   # efficiency's folder, shared by select and study
GROUP = 'benchmark'                              # the flags' group in --help


def mode_changes(mode: str, unfreeze_after: int = UNFREEZE_AFTER, carry_weight: float = CARRY_WEIGHT) -> dict:
    "The FinetuneConfig settings a bench mode adds to its freeze mode."
    if mode.endswith('-ft'): return {'unfreeze_after': unfreeze_after}
    if mode == 'carry': return {'carry_weight': carry_weight}
    if mode == 'full-scale': return {'pretrained_init': 'scale'}
    if mode.startswith('full-k'): return {'transfer_stages': int(mode.removeprefix('full-k'))}
    return {}


def machine() -> str:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'
    return f"{platform.machine()}, {mp.cpu_count()} CPU cores, torch {torch.__version__}, {gpu}"


def ensure_data(data: Path, patients: int, native: int, neighbours: int = 2, seed: int = 1, workers: int = 1) -> Path:
    "A benchmark's synthetic data set in `data`, generated once (the same files for a seed, whatever the workers)."
    from ..synthetic import generate
    if not (Path(data) / 'DL_info.csv').exists():
        log.info(f"generating {patients} synthetic patients at {native} px, {neighbours} unlabelled slices on each side of a key slice, in {data}")
        generate(data, patients=patients, size=native, seed=seed, neighbours=neighbours, workers=workers)
    return Path(data)


def tag(changes: dict | None) -> str:
    "Pretraining changes as a name: _context2_pretextcontext, _code64-8-4-4 (one slice, context 0, is the plain name)."
    short = lambda k, v: ('code', '-'.join(map(str, v))) if k == 'code_channels' else (k, v)
    return ''.join('_{}{}'.format(*short(k, v)) for k, v in sorted((changes or {}).items()) if (k, v) != ('context', 0))


def pretrain_folder(out: Path, changes: dict | None) -> Path:
    return out / ('pretrain' + tag(changes))


def precision_change(s) -> dict:
    "A benchmark's --precision as a config change: none for auto, so that auto's runs are configured as they always were."
    return {} if s.precision == 'auto' else {'precision': s.precision}


def pretrain_config(data: Path, folder: Path, epochs: int, bs: int, changes: dict | None = None) -> PretrainConfig:
    "A benchmark's autoencoder pretraining into `folder` with these PretrainConfig changes, resumable."
    return PretrainConfig(**{**dict(data=data, out=folder, epochs=epochs, bs=bs, resume=True), **(changes or {})})


def pretraining(out: Path, data: Path, epochs: int, bs: int, changes: dict) -> PretrainConfig:
    """The pretraining of `data` with these changes in `out/pretrain<changes>` (`tag`), named without its
    precision: one checkpoint serves runs in any precision."""
    return pretrain_config(data, pretrain_folder(out, {k: v for k, v in changes.items() if k != 'precision'}), epochs, bs, changes)


CONTROL = 'untrained'   # the pretext of the control: the pretraining with no epochs, which every pretrained start is read against


def pretext_changes(pretext: str) -> dict:
    """A pretext's PretrainConfig changes (the default 'masked' keeps the plain out/pretrain folder); the
    control's, no epochs (out/pretrain_epochs0: its runs take only its architecture, `control_changes`)."""
    if pretext == CONTROL: return {'epochs': 0}
    return {'pretext': pretext} if pretext != 'masked' else {}


def control_changes(pretext: str | None, mode: str) -> dict:
    """The FinetuneConfig settings of a control run: the weights scratch draws with the run's seed
    (`--pretrained-init scratch`), so that the control differs from the scratch run of its seed in the
    mode's path alone. A control with weights of its own (the untrained checkpoint's, one draw shared by
    every seed, then one per seed) paired a draw's luck with the path's effect in every pair."""
    return {'pretrained_init': 'scratch'} if pretext == CONTROL and mode not in NO_CHECKPOINT else {}


def pretext_tag(pretext: str | None) -> str:
    "A run folder's pretext part: none for a run without a pretraining (None, '-') or from the default 'masked', else '_<pretext>'."
    return '' if pretext in (None, '-', 'masked') else f'_{pretext}'


def data_context(data: Path) -> int:
    "The context every benchmark run of `data` sees: the data's default (2 where it ships neighbour slices, else 0)."
    from ..config import resolve_context
    from ..deeplesion import load_data
    return resolve_context(None, load_data(data)[1], data)


def finetune_config(data: Path, run: Path, mode: str, fraction: float, seed: int, epochs: int, bs: int, ckpt: Path | None,
                    changes: dict | None = None):
    "A benchmark fine-tune: same steps per epoch for every label fraction, pretrained unless from scratch, resumable."
    from ..config import FinetuneConfig
    freeze, sandwich = MODES[MODE_ALIASES.get(mode, mode)]
    cfg = dict(data=data, out=run, epochs=epochs, bs=bs, label_fraction=fraction, seed=seed, same_epoch_length=True,
               pretrained=None if mode in NO_CHECKPOINT else ckpt, freeze=freeze, sandwich=sandwich, resume=True)
    return FinetuneConfig(**{**cfg, **(changes or {})})


def run_name(mode: str, fraction: float, seed: int, context: int | None) -> str:
    "A grid run's folder name, before its pretext, code and body: `scratch_0.1_seed0_context2`."
    return f'{mode}_{fraction:g}_seed{seed}' + (f'_context{context}' if context else '')


def teacher_config(out: Path, data: Path, fraction: float, seed: int, epochs: int, bs: int, context: int | None,
                   changes: dict | None = None):
    """The teacher of the selftrain modes at a label fraction and seed: `efficiency`'s scratch run of
    that fraction and seed (`select` trains or reuses the same run)."""
    return finetune_config(data, out / 'runs' / run_name('scratch', fraction, seed, context), 'scratch', fraction, seed, epochs, bs,
                           None, {'context': context, **(changes or {})})


def pseudo_csv(out: Path, fraction: float, seed: int, context: int | None, fp: float) -> Path:
    "Where the pseudo-labels of a label fraction and seed's teacher at `fp` validation false positives per slice go."
    return out / 'pseudo' / (f'{fraction:g}_seed{seed}' + (f'_context{context}' if context else '') + f'_fp{fp:g}.csv')


def test_row(m: dict, **extra) -> dict:
    "A run's test figures (FROC and top box) beside the mean box's, and its validation FROC."
    t, b = m['test'], m['test']['mean_box_baseline']
    return {**extra, 'train_slices': m['train_slices'], 'train_patients': m['train_patients'],
            'froc': t['froc']['mean_0.5_4'], 'sens@4': t['froc']['sensitivity']['4'], 'hit@0.5': t['top1']['hit@0.5'],
            'mean_iou': t['top1']['mean_iou'], 'centre_error_mm': t['top1']['centre_error_mm'],
            'valid_froc': m['valid']['froc']['mean_0.5_4'], 'baseline_froc': b['froc']['mean_0.5_4'],
            'baseline_hit@0.5': b['top1']['hit@0.5'], 'baseline_mean_iou': b['top1']['mean_iou'], 'n_test': t['froc']['slices'],
            'time_s': m['time_s'], 'trainable': m['parameters']['trainable'], 'precision': m['config'].get('precision', 'fp32')}


def pm(mean, ci) -> str:
    "mean +- half-width of its interval, or the mean alone where there is no interval."
    return f"{mean:.3f}" if np.isnan(ci) else f"{mean:.3f} +- {ci:.3f}"


def report(out: Path, stem: str, result: dict, table: str, notes=(), figures=()) -> None:
    """The ending of every benchmark: `result` as `out/<stem>.json`, the table and its notes as
    `out/<stem>.md`, both printed with what was written."""
    write_json(result, out / f'{stem}.json')
    text = '\n\n'.join([table, *(['\n'.join(notes)] if notes else [])])
    atomic_write_text(out / f'{stem}.md', text + '\n')
    wrote = ', '.join(str(p) for p in (out / f'{stem}.json', out / f'{stem}.md', *figures))
    log.info(f"\n{result.get('machine', '')}\n\n{text}\n\nwrote {wrote}")


def default_of(cls, name: str):
    "The default of a config class's field: a benchmark flag that means the same setting says it once."
    return next(f for f in dataclasses.fields(cls) if f.name == name).default


def unknown(names, allowed, empty_ok: bool = True) -> str | None:
    "The check of a list flag's names: each one of `allowed` (and, unless `empty_ok`, at least one)."
    bad = [n for n in names if n not in allowed]
    return f"unknown {bad}, expected some of {', '.join(allowed)}" if bad or not (names or empty_ok) else None


@dataclass(kw_only=True)
class BenchSettings:
    """What `efficiency`, `select` and `study` share: the data, its pretraining and the batch size (with
    the same --out they share them), and --quick's smoke run."""
    out: Path = option(EFFICIENCY_OUT, 'output folder', group=GROUP)
    data: Path | None = option(None, 'data folder (default: generated under --out)', group=GROUP)
    patients: int = option(PATIENTS, 'synthetic patients to generate', at_least=1, group=GROUP)
    native: int = option(NATIVE, 'native slice size of the generated data (trained at half)', at_least=1, group=GROUP)
    pretrain_epochs: int = option(default_of(PretrainConfig, 'epochs'), "autoencoder epochs (one pretraining per pretext, or per value "
                                  "of select's pretext setting, serves every run; the control's, no epochs, gives its runs only the architecture)", group=GROUP)
    bs: int = option(default_of(RunConfig, 'bs'), 'batch size', at_least=1, group=GROUP)
    precision: str = option(default_of(RunConfig, 'precision'), 'of every pretraining and run: auto is bf16 on a GPU, fp32 on the CPU',
                            choices=PRECISIONS, group=GROUP)
    quick: bool = option(False, 'a few-minute smoke run: 40 patients, 2 epochs', group=GROUP)

    def __post_init__(self):
        self.out = Path(self.out)
        if self.data is not None: self.data = Path(self.data)
        check_fields(self)


def quick(s, **more):
    """`s` as --quick runs it: 40 patients at 128 px, 2 epochs, one of pretraining, and `more`, in a folder
    of its own when --out is the default one."""
    if not s.quick: return s
    out = s.out.with_name(s.out.name + '_quick') if s.out == EFFICIENCY_OUT else s.out
    return replace(s, out=out, patients=40, epochs=2, pretrain_epochs=1, native=128, **more)


def data_folder(s, neighbours: int = 2) -> Path:
    "The data of a benchmark's settings `s`: --data, or generated under --out (`data_<patients>p_<native>px[_<neighbours>n]`)."
    return s.data or s.out / (f'data_{s.patients}p_{s.native}px' + (f'_{neighbours}n' if neighbours != 2 else ''))


def _typed(v) -> str:
    return ','.join(f'{x:g}' if isinstance(x, float) else str(x) for x in v)


def add_bench_settings(p: argparse.ArgumentParser, cls, required=()) -> None:
    """The flags of the settings class `cls` on the bench subcommand `p` (`config.add_settings`): a list
    flag's default as it is typed ('0.02,0.1,1'), each help ending as ArgumentDefaultsHelpFormatter
    ends it, '(default: X)', as every bench flag's does."""
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get('cli')]
    add_settings(p, cls, defaults={f.name: _typed(f.default) for f in fields if isinstance(f.default, tuple)}, required=required)
    helps = {f.name: f.metadata['help'] for f in fields}
    for action in p._actions:
        if action.dest in helps: action.help = helps[action.dest]
