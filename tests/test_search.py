"""python -m lesion_fastai.search: an Optuna study of fine-tuning settings on tiny data."""
import shlex

import pytest

optuna = pytest.importorskip('optuna')

import finetune.__main__ as finetune_cli                    # noqa: E402
from lesion_fastai.search import main, search              # noqa: E402


class PruneSecond(optuna.pruners.BasePruner):
    "Prunes trial 1 at its first report: the pruning path, whatever the tiny models score."
    def prune(self, study, trial): return trial.number == 1


@pytest.mark.slow
def test_study_completes_prunes_resumes_from_storage_and_writes_the_command(tiny_data, tmp_path):
    kw = dict(max_epochs=2, bs=2, size=32, pruner=PruneSecond())
    res = search(tiny_data, tmp_path, trials=3, **kw)
    assert (res['complete'], res['pruned']) == (2, 1)
    pruned_history = (tmp_path / 'trials' / '001' / 'history.csv').read_text().strip().splitlines()
    assert len(pruned_history) == 2                                           # header + the one epoch it ran
    cmd = (tmp_path / 'best_command.txt').read_text().strip()
    assert cmd == res['command'] and cmd.startswith('python -m finetune --data')
    args = finetune_cli.parser().parse_args(shlex.split(cmd)[3:])                       # a command finetune accepts as it is
    assert args.lr == pytest.approx(res['params']['lr'], rel=1e-3) and args.epochs == res['params']['epochs']
    assert (tmp_path / 'trials.png').stat().st_size > 0 and len((tmp_path / 'trials.csv').read_text().splitlines()) == 4
    stamp = (tmp_path / 'trials' / '000' / 'metrics.json').stat().st_mtime
    res2 = search(tiny_data, tmp_path, trials=4, **kw)                         # the same storage: one more trial, none redone
    assert res2['complete'] + res2['pruned'] == 4 and (tmp_path / 'trials' / '000' / 'metrics.json').stat().st_mtime == stamp
    assert sorted(p.name for p in (tmp_path / 'trials').iterdir()) == ['000', '001', '002', '003']


def test_cli_checks_its_numbers(capsys):
    with pytest.raises(SystemExit): main(['--data', 'x', '--trials', '0'])
    assert '--trials must be at least 1' in capsys.readouterr().err


@pytest.mark.slow
def test_a_trial_killed_mid_run_is_asked_again_with_its_settings_in_its_own_folder(tiny_data, tmp_path):
    import time
    from optuna.storages import RDBStorage
    storage = RDBStorage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage, study_name='finetune', direction='maximize')
    settings = dict(lr=3e-3, wd=1e-2, epochs=1, map_weight=1.)
    study.enqueue_trial(settings)
    killed = study.ask()                                          # running, its process then killed: its heartbeat stops
    storage.record_heartbeat(killed._trial_id)
    time.sleep(3)
    res = search(tiny_data, tmp_path, trials=1, max_epochs=2, bs=2, size=32, heartbeat_s=1)
    assert res['complete'] == 1 and res['params'] == pytest.approx(settings)    # the killed trial's settings, asked again
    assert sorted(p.name for p in (tmp_path / 'trials').iterdir()) == ['000']   # in its own folder, not a new one
    states = [t.state.name for t in optuna.load_study(study_name='finetune', storage=f"sqlite:///{tmp_path / 'study.db'}").trials]
    assert states == ['FAIL', 'COMPLETE']
