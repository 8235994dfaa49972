"""The benchmarks' one runner, as timm's `bulk_runner.py` is to its `benchmark.py`: a benchmark builds
its grid (a list of `Run`s), `run_grid` trains it and returns each run's metrics in the grid's order,
and the benchmark builds its table from them. The runner owns what every grid needs: one pretraining
per set of pretraining settings, a self-trained student after its teacher, finished runs reused (or
refused when they were made with other settings), and with `jobs` the runs spread over processes.

    runs = [Run(cfg, title='scratch, label fraction 0.1, seed 0', row={'mode': 'scratch'}), ...]
    rows = [test_row(m, **r.row) for r, m in zip(runs, run_grid(runs, jobs=2))]
"""
from __future__ import annotations

import json
import multiprocessing as mp
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import FinetuneConfig, PretrainConfig, recorded, settings_diff, unused_settings
from ..log import log

__all__ = ['Run', 'run_grid', 'read_grid', 'finished', 'run_finetune', 'pretrain_once', 'ensure_pseudo_labels', 'self_trained',
           'in_process']


@dataclass(frozen=True)
class Run:
    """One fine-tune of a grid. `pretrain`: the pretraining whose checkpoint `cfg.pretrained` is (None:
    none). A self-trained student names its `teacher`, a run of the same grid, whose pseudo-labels at
    `fp` validation false positives per slice it learns from, through the students of the `earlier`
    rounds (their folders, each teaching the next). `title` is said when the run starts; `row` is what
    its table row says besides its metrics (None: a run only trained to teach another)."""
    cfg: FinetuneConfig
    title: str = ''
    row: dict | None = None
    pretrain: PretrainConfig | None = None
    teacher: FinetuneConfig | None = None
    fp: float | None = None
    earlier: tuple = ()


def finished(cfg) -> bool:
    return (Path(cfg.out) / 'metrics.json').exists()


def run_grid(runs, jobs: int = 1) -> list[dict]:
    """The metrics of every run of `runs`, in their order: each pretraining they name trained once,
    first (or found finished), a student after its teacher, each run fine-tuned, resumed or read back
    (`run_finetune`). With `jobs` > 1 the pretrainings and runs go to that many processes, each with
    its share of the CPU threads; a student's pseudo-labels (and earlier rounds) are made here, once
    its teacher is done."""
    order, pretrainings = _schedule(runs), _pretrainings(runs)
    if jobs > 1: return _in_pool(runs, order, pretrainings, jobs)
    for cfg in pretrainings: pretrain_once(cfg)
    results = {}
    for i in order:
        if not finished(runs[i].cfg): log.info(f"\n== {runs[i].title}")
        results[i] = run_finetune(_taught(runs[i]))
    return [results[i] for i in range(len(runs))]


def read_grid(runs) -> tuple[list, list[dict]]:
    """The finished runs of a grid and their metrics, nothing trained: a report of runs gathered from
    several machines, which may have trained in other precisions."""
    done = [r for r in runs if finished(r.cfg)]
    return done, [run_finetune(r.cfg, any_precision=True) for r in done]


def _teacher_of(run, index: dict) -> int | None:
    if run.teacher is None: return None
    if Path(run.teacher.out) not in index: raise ValueError(f"{run.cfg.out}: its teacher {run.teacher.out} is not a run of the grid")
    return index[Path(run.teacher.out)]


def _schedule(runs) -> list[int]:
    "The order the runs train in: the grid's, but a student never before its teacher."
    index = {Path(r.cfg.out): i for i, r in enumerate(runs)}
    order, waiting = [], {}

    def place(i):
        order.append(i)
        for j in waiting.pop(i, ()): place(j)
    for i, r in enumerate(runs):
        t = _teacher_of(r, index)
        if t is None or t in order: place(i)
        else: waiting.setdefault(t, []).append(i)
    return order


def _pretrainings(runs) -> list:
    "Each pretraining the runs name, once (one per folder), in the grid's order."
    found = {}
    for r in runs:
        if r.pretrain is None: continue
        if found.setdefault(Path(r.pretrain.out), r.pretrain) != r.pretrain:
            raise ValueError(f"{r.pretrain.out}: two pretrainings with other settings in one folder")
    return list(found.values())


def _taught(run):
    "A run's config, a student's with its pseudo-labels made (and its earlier rounds trained)."
    return run.cfg if run.teacher is None else self_trained(run.teacher, run.cfg, run.fp, run.earlier)


def _in_pool(runs, order, pretrainings, jobs: int) -> list[dict]:
    """`run_grid` in `jobs` processes: the pretrainings and the runs that need neither a checkpoint nor
    a teacher first, the runs from a checkpoint once the pretrainings are done, each student once its
    teacher is."""
    from concurrent.futures import ProcessPoolExecutor
    threads = max(1, mp.cpu_count() // jobs)
    index = {Path(r.cfg.out): i for i, r in enumerate(runs)}
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context('spawn')) as pool:
        submit = lambda fn, arg: pool.submit(in_process, threads, fn, arg)
        pretrained = [submit(pretrain_once, cfg) for cfg in pretrainings]
        futures = {i: submit(run_finetune, runs[i].cfg) for i in order if runs[i].pretrain is None and runs[i].teacher is None}
        for f in pretrained: f.result()
        futures.update({i: submit(run_finetune, runs[i].cfg) for i in order if runs[i].pretrain is not None and runs[i].teacher is None})
        for i in order:
            if runs[i].teacher is None: continue
            futures[_teacher_of(runs[i], index)].result()
            futures[i] = submit(run_finetune, _taught(runs[i]))
        return [futures[i].result() for i in range(len(runs))]


def in_process(threads: int, fn, *args):
    "Run `fn(*args)` in a pool worker with `threads` torch threads (several runs share the machine)."
    import torch
    torch.set_num_threads(threads)
    return fn(*args)


def pretrain_once(cfg) -> Path:
    """The checkpoint of the pretraining `cfg` (a PretrainConfig), trained (or resumed) only if it is not
    there yet; a finished pretraining made with other settings (`bench select`'s default 10 epochs in
    a folder an `efficiency --pretrain-epochs 3` filled, say) is an error, not a checkpoint reused."""
    from ..pretraining import pretrain
    ckpt, done = Path(cfg.out) / 'pretrained.pth', Path(cfg.out) / 'pretrain_metrics.json'
    if ckpt.exists() and not done.exists() and cfg.epochs and not (Path(cfg.out) / 'last.pth').exists():
        raise ValueError(f"{ckpt}: a checkpoint without the {done.name} its pretraining writes last, and no last.pth to resume it "
                         f"from; pretrain it into another --out, or remove {cfg.out}")
    if not (ckpt.exists() and done.exists()): pretrain(cfg)       # its metrics are written last: without them it did not finish
    elif 'out' in (then := json.loads(done.read_text()).get('config', {})):
        now = _settings_now(cfg, any_precision=False)
        diff = settings_diff(_settings_then(then, now), now, ignore=IGNORED + ('cache', 'cache_dir'), cls=PretrainConfig)
        if diff: raise ValueError(f"{done}: a finished pretraining with other settings ({_differences(diff)}); "
                                  f"ask for its settings (--pretrain-epochs {then.get('epochs')} if only the epochs differ) or choose another --out")
    return ckpt


PATHS = ('data', 'pretrained', 'pseudo_labels')      # compared relative to the benchmark folder
IGNORED = ('resume', 'quiet', 'out', 'num_workers')  # how a run is made, not what it is


def _inside(path, out) -> str:
    """A path relative to the benchmark folder of the run in `out` (`<folder>/runs/<run>`, or select's
    `<folder>/select/<setting>/<run>`): folders gathered from several machines compare, and a select
    run and an efficiency run of the same settings compare."""
    run = Path(out)
    folder = run.parents[2] if run.parent.parent.name == 'select' else run.parent.parent
    return str(Path(path).relative_to(folder)) if Path(path).is_relative_to(folder) else str(path)


def _settings_now(cfg, any_precision: bool) -> dict:
    "What a finished run must have been made with: the settings `cfg` gives (None: left to the run), in the precision it resolves to here."
    from ..fit import resolved_precision
    now = {k: v for k, v in recorded(cfg).items() if v is not None}
    now['precision'] = resolved_precision(cfg.precision)      # runs record what they trained in
    if any_precision: now.pop('precision')
    return {k: _inside(v, cfg.out) if k in PATHS else v for k, v in now.items()}


def _differences(diff: dict) -> str:
    "`settings_diff`'s answer as the errors say it: `epochs: 3 there, 10 now, ...`."
    return ', '.join(f'{k}: {a} there, {b} now' for k, (a, b) in diff.items())


def _settings_then(record: dict, names) -> dict:
    "A finished run's recorded settings of these `names`; a run from before bf16 trained in fp32."
    then = {k: _inside(record[k], record['out']) if k in PATHS and record[k] else record[k] for k in names if k in record}
    if 'precision' in names: then.setdefault('precision', 'fp32')
    return then


def run_finetune(cfg, any_precision: bool = False) -> dict:
    """Fine-tune with `cfg` (quietly: a benchmark runs many), or return the metrics of a finished run in
    `cfg.out` made with the same settings (`config.settings_diff`: a setting the run lacks counts as
    its default then, an old name of a freeze mode as its new one); a finished run with other settings
    is an error rather than a silently wrong row. With `any_precision` (reporting runs from several
    machines) a run may have trained in another precision."""
    from ..finetuning import finetune
    from ..log import quiet
    done = Path(cfg.out) / 'metrics.json'
    if not done.exists():
        with quiet(): return finetune(cfg)
    m = json.loads(done.read_text())
    now = _settings_now(cfg, any_precision)
    ignore = IGNORED + tuple(unused_settings(cfg))
    diff = settings_diff(_settings_then(m['config'], now), now, ignore=ignore, cls=FinetuneConfig)
    if diff: raise ValueError(f"{done}: a finished run with other settings ({_differences(diff)}{_OLD_CONTROL if _old_control(diff) else ''}); "
                              f"choose another --out or remove {cfg.out}")
    return m


_OLD_CONTROL = (": a control run from before the control took the weights scratch draws with its seed (--pretrained-init scratch), "
                "when it took the untrained checkpoint's")


def _old_control(diff: dict) -> bool:
    "Whether a finished run differs only in being a control from the untrained checkpoint's weights where it now takes scratch's draw."
    return diff.get('pretrained_init', (None, None))[1] == 'scratch' and set(diff) <= {'pretrained_init', 'pretrained'}


def ensure_pseudo_labels(teacher, student, fp: float):
    """`student` (a FinetuneConfig with `pseudo_labels`), its pseudo-labels made from the finished
    `teacher` run's export at `fp` validation false positives per slice, once."""
    if not Path(student.pseudo_labels).exists():
        from ..log import quiet
        from ..selftrain import pseudo_labels_from
        with quiet(): pseudo_labels_from(Path(teacher.out) / 'export.pkl', student, student.pseudo_labels, fp)
    return student


def self_trained(teacher, student, fp: float, earlier=()):
    """`student` (a FinetuneConfig whose `pseudo_labels` are round 1's) after self-training: round 1's
    teacher is the finished `teacher` run; the student of each earlier round (trained here into its
    folder of `earlier` unless it finished there) teaches the next, its pseudo-labels at `fp` written
    in its own folder. Returns the last round's student, its pseudo-labels made."""
    for folder in earlier:
        taught = replace(student, out=Path(folder))
        run_finetune(ensure_pseudo_labels(teacher, taught, fp))
        teacher, student = taught, replace(student, pseudo_labels=Path(taught.out) / f'pseudo_labels_fp{fp:g}.csv')
    return ensure_pseudo_labels(teacher, student, fp)
