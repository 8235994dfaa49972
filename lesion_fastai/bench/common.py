"""What the benchmarks share: the machine they ran on, their generated data, their fine-tunes (resumed,
or refused when a finished run had other settings), one pretraining per set of pretraining changes,
and the ending every benchmark has: a table printed and written as Markdown beside its JSON."""
from __future__ import annotations

import json
import multiprocessing as mp
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..config import PRECISIONS
from ..files import atomic_write_text, write_json
from ..log import log

__all__ = ['MODES', 'GRID_MODES', 'NO_CHECKPOINT', 'SELF_TRAINED', 'UNFREEZE_AFTER', 'CARRY_WEIGHT', 'mode_changes', 'machine', 'ensure_data', 'data_context', 'tag', 'pretrain_folder', 'pretrain_once', 'prepare',
           'run_finetune', 'finetune_config', 'run_name', 'teacher_config', 'pseudo_csv', 'ensure_pseudo_labels', 'self_trained', 'test_row', 'pm', 'report', 'in_process', 'add_data_args', 'data_args']

# bench mode -> (FinetuneConfig.freeze, FinetuneConfig.sandwich); 'none' is the old name of 'full'. The -ft modes unfreeze after
# the frozen epochs (fastai's fine_tune); carry: scratch with labels carried to the neighbour slices; selftrain: scratch with the
# scratch run's pseudo-labels (the same label fraction and seed as teacher); selftrain-ae: the same, the student from the autoencoder
MODES = {'scratch': ('scratch', 'encoder'), 'full': ('full', 'encoder'), 'encoder': ('encoder', 'encoder'),
         'sandwich': ('sandwich', 'encoder'), 'decoder-sandwich': ('sandwich', 'decoder'), 'imagenet': ('full', 'encoder'),
         'sandwich-ft': ('sandwich', 'encoder'), 'encoder-ft': ('encoder', 'encoder'), 'decoder-sandwich-ft': ('sandwich', 'decoder'),
         'carry': ('scratch', 'encoder'), 'selftrain': ('scratch', 'encoder'), 'selftrain-ae': ('full', 'encoder')}
MODE_ALIASES = {'none': 'full'}
GRID_MODES = ('scratch', 'full', 'sandwich', 'decoder-sandwich', 'imagenet')
NO_CHECKPOINT = ('scratch', 'imagenet', 'carry', 'selftrain')   # modes that do not start from the autoencoder
SELF_TRAINED = ('selftrain', 'selftrain-ae')                      # students of the scratch run of their label fraction and seed


UNFREEZE_AFTER = 5   # the -ft modes' frozen epochs, chosen on validation of 5, 2 (README)
CARRY_WEIGHT = .5    # the carry mode's weight, chosen on validation of 0.5, 1, 0.25, 0.1 (README)


def mode_changes(mode: str, unfreeze_after: int = UNFREEZE_AFTER, carry_weight: float = CARRY_WEIGHT) -> dict:
    "The FinetuneConfig settings a bench mode adds to its freeze mode."
    if mode.endswith('-ft'): return {'unfreeze_after': unfreeze_after}
    if mode == 'carry': return {'carry_weight': carry_weight}
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


def pretrain_once(data: Path, folder: Path, pretrain_epochs: int, bs: int, changes: dict | None = None) -> Path:
    "The checkpoint of one pretraining with these changes, trained (or resumed) only if it is not there yet."
    from ..config import PretrainConfig
    from ..pretraining import pretrain
    ckpt = folder / 'pretrained.pth'
    if not ckpt.exists():
        pretrain(PretrainConfig(**{**dict(data=data, out=folder, epochs=pretrain_epochs, bs=bs, resume=True), **(changes or {})}))
    return ckpt


def data_context(data: Path) -> int:
    "The context every benchmark run of `data` sees: the data's default (2 where it ships neighbour slices, else 0)."
    from ..config import resolve_context
    from ..deeplesion import load_data
    return resolve_context(None, load_data(data)[1], data)


def prepare(out: Path, data: Path, patients: int, native: int, pretrain_epochs: int, bs: int,
             pretrain_changes: dict | None = None) -> Path:
    """The benchmark's data (generated once, unless `data` holds some) and its autoencoder pretraining
    with the data's default context resolved (`out/pretrain_context2`, say, or with other settings
    `out/pretrain_context2_<changes>`; the same folder `efficiency` makes); returns the checkpoint."""
    ensure_data(data, patients, native)
    changes = dict(pretrain_changes or {})
    changes.setdefault('context', data_context(data))
    speed = {k: changes.pop(k) for k in ('precision',) if k in changes}
    return pretrain_once(data, pretrain_folder(out, changes), pretrain_epochs, bs, {**changes, **speed})


def _inside(path, out) -> str:
    "A path relative to the benchmark folder of the run in `out` (`<folder>/runs/<run>`): folders gathered from several machines compare."
    try: return str(Path(path).relative_to(Path(out).parent.parent))
    except ValueError: return str(path)


def run_finetune(cfg, any_precision: bool = False) -> dict:
    """Fine-tune with `cfg` (quietly: a benchmark runs many), or return the metrics of a finished run in
    `cfg.out` made with the same settings; a finished run with other settings is an error rather than a
    silently wrong row. With `any_precision` (reporting runs from several machines) a run may have
    trained in another precision."""
    from ..config import FinetuneConfig
    from ..finetuning import finetune
    from ..fit import resolved_precision
    from ..log import quiet
    done = Path(cfg.out) / 'metrics.json'
    if not done.exists():
        with quiet(): return finetune(cfg)
    m = json.loads(done.read_text())
    ignore = {'resume', 'quiet', 'out', 'num_workers'} | ({'adapter_ratio', 'adapter_stem', 'sandwich'} if cfg.freeze != 'sandwich' else set())
    want = {k: v for k, v in asdict(cfg).items() if v is not None and k not in ignore}
    want['precision'] = resolved_precision(cfg.precision)      # runs record what they trained in
    if any_precision: want.pop('precision')
    for k in ('data', 'pretrained', 'pseudo_labels'):
        if k in want: want[k] = _inside(want[k], cfg.out)
    fields = FinetuneConfig.__dataclass_fields__               # a setting added since the run: its default then
    default = lambda k: 'fp32' if k == 'precision' else fields[k].default   # runs from before bf16 trained in fp32
    old_name = {'full': 'none'}                                # the freeze mode's name when the run was made, maybe
    have = lambda k: _inside(m['config'][k], m['config']['out']) if k in ('data', 'pretrained', 'pseudo_labels') and m['config'].get(k) else m['config'].get(k, default(k))
    same = lambda k, v: str(have(k)) == str(v) or (k == 'freeze' and str(have(k)) == old_name.get(v))
    diff = {k: (have(k), v) for k, v in want.items() if not same(k, v)}
    if diff: raise ValueError(f"{done}: a finished run with other settings ({', '.join(f'{k}: {a} there, {b} now' for k, (a, b) in diff.items())}); "
                              f"choose another --out or remove {cfg.out}")
    return m


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


def ensure_pseudo_labels(teacher, student, fp: float):
    """`student` (a FinetuneConfig with `pseudo_labels`), its pseudo-labels made from the finished
    `teacher` run's export at `fp` validation false positives per slice, once."""
    if not Path(student.pseudo_labels).exists():
        from ..log import quiet
        from ..selftrain import pseudo_labels_from
        with quiet(): pseudo_labels_from(Path(teacher.out) / 'export.pkl', student, student.pseudo_labels, fp)
    return student


def self_trained(teacher, student, fp: float, rounds: int, round_out):
    """`student` (a FinetuneConfig whose `pseudo_labels` are round 1's) after `rounds` rounds of
    self-training: round 1's teacher is the finished `teacher` run; the student of each earlier round
    k (trained here into `round_out(k)` unless it finished there) teaches the next, its pseudo-labels
    at `fp` written in its own folder. Returns the last round's student, its pseudo-labels made."""
    from dataclasses import replace
    for k in range(1, rounds):
        taught = replace(student, out=Path(round_out(k)))
        run_finetune(ensure_pseudo_labels(teacher, taught, fp))
        teacher, student = taught, replace(student, pseudo_labels=Path(taught.out) / f'pseudo_labels_fp{fp:g}.csv')
    return ensure_pseudo_labels(teacher, student, fp)


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


def in_process(threads: int, fn, *args):
    "Run `fn(*args)` in a pool worker with `threads` torch threads (several runs share the machine)."
    import torch
    torch.set_num_threads(threads)
    return fn(*args)


def add_data_args(p, out_help: str, quick_help: str) -> None:
    "Flags shared by `efficiency`, `study` and `select`: the same data, pretraining and batch size."
    p.add_argument('--out', type=Path, default=Path('runs/bench/efficiency'), help=out_help)
    p.add_argument('--data', type=Path, default=None, help='data folder (default: generated under --out)')
    p.add_argument('--patients', type=int, default=250, help='synthetic patients to generate')
    p.add_argument('--native', type=int, default=256, help='native slice size of the generated data (trained at half)')
    p.add_argument('--pretrain-epochs', type=int, default=10, help='autoencoder epochs (one pretraining per pretext serves every run)')
    p.add_argument('--bs', type=int, default=16, help='batch size')
    p.add_argument('--precision', choices=PRECISIONS, default='auto', help='of every pretraining and run: auto is bf16 on a GPU, fp32 on the CPU')
    p.add_argument('--quick', action='store_true', help=quick_help)


def data_args(args, neighbours: int = 2) -> Path:
    """After parsing `add_data_args`' flags: --quick's small settings (40 patients at 128 px, 2 epochs, one
    of pretraining, its own folder) and the data folder, default `OUT/data_<patients>p_<native>px[_<n>n]`."""
    if args.quick:
        args.out = args.out.with_name(args.out.name + '_quick') if args.out == Path('runs/bench/efficiency') else args.out
        args.patients, args.epochs, args.pretrain_epochs, args.native = 40, 2, 1, 128
    return args.data or args.out / (f'data_{args.patients}p_{args.native}px' + (f'_{neighbours}n' if neighbours != 2 else ''))
