"""`make demo`: pretrain the autoencoder on every training-patient slice, fine-tune the frozen sandwich,
and train the same detector from scratch with the same budget, then print where everything is.

The budget is meant to fit `make demo` into 15 minutes on a 2-core CPU, install and data included:
the built-in data at 256 px, trained at half that (128 px) with two neighbour slices on each side
(`--context 2`, the data's default), the library's default precision, three epochs of pretraining
and 60 of each fine-tune (chosen on validation: docs/results.md, "The demo's budget"). A run past
its budget says so, with the time it took.

    python -m lesion_fastai.demo --data data/synthetic --out runs/demo
"""
from __future__ import annotations

from .log import hush_third_party
hush_third_party(__name__)       # run as a command: quiet known third-party warnings before fastai loads

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import FinetuneConfig, PretrainConfig, RunConfig, add_settings, check_fields, from_args, option
from .files import atomic_write_text, write_json
from .finetuning import finetune
from .log import log
from .pretraining import pretrain
from .report import markdown_table, summary_report

__all__ = ['DemoSettings', 'parser', 'demo', 'main', 'BUDGET_S']

BUDGET_S = 15 * 60       # the whole of `make demo`, install and data included; this command's share is what is left of it

HEADER = ('| model | labeled slices | test sensitivity at 0.5 / 1 / 2 / 4 / 8 / 16 FPs per slice | FROC, mean 0.5-4 (validation) | '
          'top box hit@0.5 / IoU | mean box FROC / hit@0.5 | time s |\n|---|---|---|---|---|---|---|')


def _row(name, m):
    t, b = m['test'], m['test']['mean_box_baseline']
    sens = ' / '.join(f"{t['froc']['sensitivity'][k]:.3f}" for k in ('0.5', '1', '2', '4', '8', '16'))
    return (f"| {name} | {m['train_slices']} | {sens} | {t['froc']['mean_0.5_4']:.3f} ({m['valid']['froc']['mean_0.5_4']:.3f}) | "
            f"{t['top1']['hit@0.5']:.3f} / {t['top1']['mean_iou']:.3f} | {b['froc']['mean_0.5_4']:.3f} / {b['top1']['hit@0.5']:.3f} | "
            f"{m['time_s']:.0f} |")


def _as_in(cls, name: str, **changes):
    """The field `name` of the config class `cls` as it is declared there (default, help, bounds, flag),
    with `changes` to its default or metadata: a setting the demo hands on to its runs keeps one source."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = changes.pop('default', f.default)
    return dataclasses.field(default=default, metadata={**f.metadata, **changes})


@dataclass(kw_only=True)
class DemoSettings:
    "Settings of `python -m lesion_fastai.demo`; those it hands on to every run are `RunConfig`'s fields."
    data: Path = _as_in(RunConfig, 'data', default=Path('data/synthetic'))
    out: Path = option(Path('runs/demo'), 'output folder: pretrain/, sandwich/, scratch/ and the summary', group='data')
    pretrain_epochs: int = option(3, 'epochs of the autoencoder', at_least=1, group='training')
    finetune_epochs: int = option(60, 'epochs of each detector, the sandwich and scratch alike', at_least=1, group='training')
    seed: int = _as_in(RunConfig, 'seed')
    resume: bool = _as_in(RunConfig, 'resume', help='continue interrupted runs, each from its last.pth')
    size: int | None = _as_in(RunConfig, 'size')
    context: int | None = _as_in(RunConfig, 'context')
    precision: str = _as_in(RunConfig, 'precision')
    started: float | None = option(None, 'when `make demo` started (seconds since the epoch), so that the budget counts the install '
                                   'and the data too', default_help='when this command started', group='budget')

    def __post_init__(self):
        self.data, self.out = Path(self.data), Path(self.out)
        check_fields(self)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='python -m lesion_fastai.demo', description=__doc__.split('\n\n')[0])
    add_settings(ap, DemoSettings)
    return ap


def main(argv=None):
    ap = parser()
    cfg = from_args(DemoSettings, ap, ap.parse_args(argv))
    try: demo(cfg)
    except (FileNotFoundError, ValueError, FloatingPointError) as e: sys.exit(f"error: {e}")


def demo(cfg: DemoSettings) -> dict:
    """Pretrain, fine-tune the sandwich and train from scratch into `cfg.out` (module docstring); write
    summary.md, summary.json and report.html there. Returns what summary.json holds."""
    t0 = time.time()
    common = dict(data=cfg.data, seed=cfg.seed, resume=cfg.resume, precision=cfg.precision)
    log.info('== 1/3 autoencoder pretraining (labels unused)')
    pretrain(PretrainConfig(out=cfg.out / 'pretrain', epochs=cfg.pretrain_epochs, size=cfg.size, context=cfg.context, **common))
    ckpt = cfg.out / 'pretrain' / 'pretrained.pth'
    log.info('\n== 2/3 fine-tuning the frozen sandwich')
    sandwich = finetune(FinetuneConfig(out=cfg.out / 'sandwich', pretrained=ckpt, freeze='sandwich', epochs=cfg.finetune_epochs, **common))
    log.info('\n== 3/3 the same detector from scratch, same budget')
    scratch = finetune(FinetuneConfig(out=cfg.out / 'scratch', size=sandwich['config']['size'], context=sandwich['config']['context'],
                                      epochs=cfg.finetune_epochs, **common))
    table = '\n'.join([HEADER, _row('sandwich (pretrained, frozen)', sandwich), _row('scratch', scratch)])
    atomic_write_text(cfg.out / 'summary.md', table + '\n')
    took, since = time.time() - t0, time.time() - (cfg.started or t0)
    summary = {'sandwich': sandwich, 'scratch': scratch, 'time_s': round(took, 1), 'since_make_demo_s': round(since, 1), 'budget_s': BUDGET_S}
    write_json(summary, cfg.out / 'summary.json')
    _report(cfg.out, table, took, since if cfg.started else None)
    wrote = sorted(p.relative_to(cfg.out) for p in cfg.out.rglob('*') if p.is_file() and not p.name.startswith('.')
                   and 'models' not in p.parts)
    log.info(f"\n{table}\n\ndone in {took:.0f} s" + (f" ({since:.0f} s since make demo started)" if cfg.started else '')
             + f". Results in {cfg.out}/:\n" + '\n'.join(f"  {cfg.out / p}" for p in wrote))
    if since > BUDGET_S:
        log.warning(f"warning: the demo took {since / 60:.1f} minutes, over its {BUDGET_S // 60}-minute budget "
                    f"(docs/results.md, section Demo, says what it takes on a 2-core CPU)")
    return summary


def _report(out: Path, table: str, took: float, since: float | None):
    "runs/demo/report.html: the demo's table, each model's FROC curves and test slices; each run's own report.html has the rest."
    header, rows = markdown_table(table)
    figures = [(f'{name}: {what}', out / name / f, what) for name in ('sandwich', 'scratch')
               for f, what in (('froc.png', 'validation and test FROC curves, the mean box, published points'),
                               ('results.png', "the first test slices at the model's operating point"),
                               ('errors.png', 'the worst misses and false positives among the test slices'))]
    took_line = f"It took {took:.0f} s" + (f" ({since:.0f} s since make demo started)" if since is not None else '') + '.'
    summary_report(out / 'report.html', 'lesion_fastai demo: the frozen sandwich and scratch',
                   'The autoencoder pretrained on every training-patient slice (labels unused), then the frozen sandwich fine-tuned '
                   f'from it and the same detector trained from scratch with the same budget, on the built-in synthetic data. {took_line}',
                   tables=[('Test FROC (validation in brackets)', header, rows)],
                   notes=[f'Each run has a report of its own, with its training curves, settings and data counts: '
                          f'{out / "sandwich" / "report.html"} and {out / "scratch" / "report.html"}.'], figures=figures)


if __name__ == '__main__':
    main()
