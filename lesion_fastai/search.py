"""python -m lesion_fastai.search: tune fine-tuning settings with Optuna on the validation FROC.

A study in SQLite storage (resumable: run the same command again and it goes on where it stopped; a
trial whose process was killed, silent past its heartbeat's grace, is asked again with its settings and
its run continues from its last.pth),
each trial a `finetune` run in OUT/trials/<number> scored by its best validation FROC (mean
sensitivity over 0.5-4 FPs per slice; the test split is never looked at), trials pruned after any
epoch whose validation FROC falls below the median of earlier trials at that epoch (Optuna's
MedianPruner, through a fastai callback). The search space is what users tune: learning rate, weight
decay, epochs, heatmap loss weight, and with --pretrained the freeze mode and transfer-layer width;
kappa for --head gaussian. Writes OUT/trials.csv, OUT/trials.png and OUT/best_command.txt, the best
trial as a ready `python -m finetune` command line. Needs optuna: pip install -e '.[search]'.

Examples:
    python -m lesion_fastai.search --data data/synthetic --out runs/search --trials 20 --timeout 3600
    python -m lesion_fastai.search --data data/synthetic --pretrained runs/demo/pretrain/pretrained.pth --label-fraction 0.1 --out runs/search_sw
"""
from __future__ import annotations

from .log import hush_third_party
hush_third_party(__name__)       # run as a command: quiet known third-party warnings before fastai loads

import argparse
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from fastai.callback.core import Callback

from .config import FinetuneConfig, check_fields, add_settings, from_args, option

__all__ = ['PruneOnValidFROC', 'SearchSettings', 'space', 'search', 'parser', 'main']

# the fine-tuning settings a study holds fixed for every trial: FinetuneConfig's flags
FIXED = ('data', 'pretrained', 'head', 'label_fraction', 'bs', 'size', 'seed')


@dataclass(kw_only=True)
class SearchSettings:
    "The study's own settings; those of every trial's run it holds fixed are `FinetuneConfig`'s (`FIXED`)."
    out: Path = option(Path('runs/search'), 'output folder: study.db, trials/, trials.csv, trials.png, best_command.txt', group='study')
    trials: int = option(20, 'finished trials the study should hold (a resumed study runs the rest)', at_least=1, group='study')
    timeout: float | None = option(None, 'stop starting trials after this many seconds', default_help='none', group='study')
    storage: str | None = option(None, 'Optuna storage URL', default_help='sqlite:///OUT/study.db', group='study')
    study_name: str = option('finetune', 'study name in the storage', group='study')
    max_epochs: int = option(20, 'most epochs a trial may train (the search picks from a third of it up)', at_least=1, group='study')

    def __post_init__(self):
        self.out = Path(self.out)
        check_fields(self)


class PruneOnValidFROC(Callback):
    "Report the validation FROC to the Optuna trial after every epoch and stop a trial the pruner gives up on."
    order = 95                     # after the epoch is recorded and saved: history.csv, best.pth, last.pth

    def __init__(self, trial): self.trial = trial

    def after_epoch(self):
        import optuna
        names = list(self.recorder.metric_names)                 # epoch, train_loss, valid_loss, froc, time
        froc = float(self.recorder.log[names.index('froc')])
        self.trial.report(froc, self.epoch)
        if self.trial.should_prune(): raise optuna.TrialPruned(f"validation FROC {froc:.3f} after epoch {self.epoch}")


def space(trial, pretrained: bool, head: str, max_epochs: int) -> dict:
    "FinetuneConfig settings for one trial."
    cfg = dict(lr=trial.suggest_float('lr', 3e-4, 1e-2, log=True), wd=trial.suggest_float('wd', 1e-4, .3, log=True),
               epochs=trial.suggest_int('epochs', max(1, max_epochs // 3), max_epochs),
               map_weight=trial.suggest_float('map_weight', .25, 4., log=True))
    if pretrained:
        cfg['freeze'] = trial.suggest_categorical('freeze', ['sandwich', 'encoder', 'full'])
        if cfg['freeze'] == 'sandwich': cfg['adapter_ratio'] = trial.suggest_categorical('adapter_ratio', [.25, .5, 1.])
    if head == 'gaussian': cfg['kappa'] = trial.suggest_float('kappa', .01, .2, log=True)
    return cfg


FLAGS = {'lr': '--lr', 'wd': '--wd', 'epochs': '--epochs', 'map_weight': '--map-weight', 'freeze': '--freeze',
         'adapter_ratio': '--adapter-ratio', 'kappa': '--kappa'}


def _command(data, base: dict, params: dict, out: str) -> str:
    args = ['python', '-m', 'finetune', '--data', str(data), '--out', out]
    for k, flag in (('pretrained', '--pretrained'), ('head', '--head'), ('label_fraction', '--label-fraction'), ('bs', '--bs'),
                    ('size', '--size'), ('seed', '--seed')):
        if base.get(k) is not None: args += [flag, str(base[k])]
    for k, v in params.items(): args += [FLAGS[k], f'{v:.4g}' if isinstance(v, float) else str(v)]
    return ' '.join(shlex.quote(a) for a in args)


def _plot(study, path) -> None:
    import optuna
    from .plots import plt, save_fig
    trials = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    names = sorted({k for t in trials for k in t.params if isinstance(t.params[k], float)})
    fig, axs = plt.subplots(1, 1 + len(names), figsize=(4 * (1 + len(names)), 3.5), layout='constrained', squeeze=False)
    value = lambda t: t.value if t.state == optuna.trial.TrialState.COMPLETE else (list(t.intermediate_values.values()) or [0.])[-1]
    for ax, key in zip(axs[0], ['trial'] + names):
        for state, colour, label in ((optuna.trial.TrialState.COMPLETE, 'tab:blue', 'complete'), (optuna.trial.TrialState.PRUNED, 'tab:grey', 'pruned')):
            sel = [t for t in trials if t.state == state and (key == 'trial' or key in t.params)]
            ax.scatter([t.number if key == 'trial' else t.params[key] for t in sel], [value(t) for t in sel], c=colour, label=label, s=18)
        if key != 'trial':
            ax.set_xscale('log')
            ax.xaxis.set_minor_formatter(plt.NullFormatter())          # the major ticks only: minor labels overlap
        ax.set_xlabel(key); ax.set_ylabel('validation FROC (pruned: last epoch)'); ax.grid(alpha=.3)
    axs[0][0].legend(fontsize=8)
    fig.suptitle(f'{study.study_name}: {len(trials)} trials')
    save_fig(fig, path)


HEARTBEAT_S = 60     # a running trial's heartbeat; one silent for twice that was killed (kill -9, a lost machine)


def search(data, out, trials: int = 20, timeout: float | None = None, storage: str | None = None, study_name: str = 'finetune',
           pretrained=None, head: str = 'direct', max_epochs: int = 20, label_fraction: float = 1., bs: int = 16,
           size: int | None = None, seed: int = 0, pruner=None, heartbeat_s: int = HEARTBEAT_S) -> dict:
    """Run (or resume) the study until it holds `trials` finished trials or `timeout` seconds pass; write
    trials.csv, trials.png and best_command.txt. Returns the best trial's number, value, params and command.
    A trial whose heartbeat (every `heartbeat_s`) stopped is failed and asked again with its settings, its
    run resumed in its own folder."""
    import optuna
    from optuna.storages import RDBStorage
    Retry = getattr(optuna.storages, 'RetryHeartbeatStaleTrialCallback', None) or optuna.storages.RetryFailedTrialCallback   # its name before 4.9
    from .files import atomic_write_text, check_out_folder
    from .finetuning import finetune
    from .log import log, quiet
    out = check_out_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{out / 'study.db'}"
    settled = lambda: warnings.catch_warnings(action='ignore', category=optuna.exceptions.ExperimentalWarning)   # stable since 2.8
    with settled():
        rdb = RDBStorage(storage, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                         **{'heartbeat_stale_trial_callback' if Retry.__name__.startswith('RetryHeartbeat') else 'failed_trial_callback':
                            Retry(max_retry=1)})
        study = optuna.create_study(storage=rdb, study_name=study_name, direction='maximize', load_if_exists=True,
                                    sampler=optuna.samplers.TPESampler(seed=seed),
                                    pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    base = dict(data=Path(data), pretrained=Path(pretrained) if pretrained else None, head=head, label_fraction=label_fraction,
                bs=bs, size=size, seed=seed)

    def objective(trial):
        frozen = trial.study.get_trials(deepcopy=False)[trial.number]
        with settled(): killed = Retry.retried_trial_number(frozen)      # the trial asked again: its run goes on in its folder
        run = out / 'trials' / f'{trial.number if killed is None else killed:03d}'
        with quiet():
            m = finetune(FinetuneConfig(out=run, resume=killed is not None, **base, **space(trial, pretrained is not None, head, max_epochs)),
                         cbs=[PruneOnValidFROC(trial)])
        return m['valid']['froc']['mean_0.5_4']

    finished = lambda: sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials)
    if finished(): log.info(f"resuming study {study_name!r} in {storage}: {finished()} trial(s) finished before")
    todo = max(0, trials - finished())
    if todo:
        with settled(): study.optimize(objective, n_trials=todo, timeout=timeout, catch=(FloatingPointError,))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete: raise RuntimeError(f"study {study_name!r}: no trial completed (all pruned or failed); see {out / 'trials'}")
    best = study.best_trial
    cmd = _command(data, base, best.params, str(Path(out) / 'best'))
    atomic_write_text(out / 'best_command.txt', cmd + '\n')
    atomic_write_text(out / 'trials.csv', study.trials_dataframe().to_csv(index=False))
    _plot(study, out / 'trials.png')
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    log.info(f"{len(complete)} complete, {pruned} pruned trial(s); best: trial {best.number}, validation FROC {best.value:.3f}\n{cmd}\n"
             f"wrote {out / 'best_command.txt'}, {out / 'trials.csv'}, {out / 'trials.png'}")
    return {'number': best.number, 'value': best.value, 'params': best.params, 'command': cmd, 'complete': len(complete), 'pruned': pruned}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='python -m lesion_fastai.search', description=__doc__.split('\n\n')[0],
                                 epilog=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(ap, SearchSettings)
    add_settings(ap, FinetuneConfig, names=FIXED)
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    study = from_args(SearchSettings, ap, args)
    fixed = from_args(FinetuneConfig, ap, args, out=study.out)     # checked as each trial's run checks them
    try: import optuna  # noqa: F401
    except ImportError: sys.exit("error: the search needs optuna: pip install -e '.[search]'")
    try:
        search(fixed.data, study.out, study.trials, study.timeout, study.storage, study.study_name, fixed.pretrained, fixed.head,
               study.max_epochs, fixed.label_fraction, fixed.bs, fixed.size, fixed.seed)
    except (FileNotFoundError, ValueError, RuntimeError) as e: sys.exit(f"error: {e}")


if __name__ == '__main__':
    main()
