"""The benchmarks' runner, their finished-run check and their settings, without training: the runner's
pretraining and fine-tuning are stand-ins that record what they were asked."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

import lesion_fastai.bench.grid as grid
from lesion_fastai.bench.common import finetune_config, pretraining
from lesion_fastai.config import SettingError, recorded


def _runs(tmp_path):
    "A grid whose student comes first, and two runs from one pretraining beside a run from another."
    data = tmp_path / 'data'
    cfg = lambda name, mode, ckpt=None, **changes: finetune_config(data, tmp_path / 'runs' / name, mode, .1, 0, 1, 2, ckpt, changes)
    masked, mae = (pretraining(tmp_path, data, 1, 2, {'context': 0, **p}) for p in ({}, {'pretext': 'mae'}))
    ckpt = lambda p: Path(p.out) / 'pretrained.pth'
    teacher = cfg('scratch', 'scratch')
    student = cfg('selftrain', 'selftrain', pseudo_labels=tmp_path / 'pseudo.csv')
    return [grid.Run(student, 'student', {'mode': 'selftrain'}, teacher=teacher, fp=.5),
            grid.Run(cfg('sandwich', 'sandwich', ckpt(masked)), 'sandwich', {'mode': 'sandwich'}, pretrain=masked),
            grid.Run(teacher, 'teacher', {'mode': 'scratch'}),
            grid.Run(cfg('full', 'full', ckpt(masked)), 'full', {'mode': 'full'}, pretrain=masked),
            grid.Run(cfg('full_mae', 'full', ckpt(mae)), 'full mae', {'mode': 'full [mae]'}, pretrain=mae)]


def test_the_runner_pretrains_once_per_pretraining_and_trains_a_student_after_its_teacher(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(grid, 'pretrain_once', lambda cfg: calls.append(('pretrain', cfg.out.name)))
    monkeypatch.setattr(grid, 'run_finetune', lambda cfg: calls.append(('run', cfg.out.name)) or {'run': cfg.out.name})
    monkeypatch.setattr(grid, 'ensure_pseudo_labels', lambda teacher, cfg, fp: calls.append(('pseudo', teacher.out.name, fp)) or cfg)
    runs = _runs(tmp_path)
    results = grid.run_grid(runs)
    assert calls == [('pretrain', 'pretrain'), ('pretrain', 'pretrain_pretextmae'),               # each once, before the runs
                     ('run', 'sandwich'), ('run', 'scratch'), ('pseudo', 'scratch', .5), ('run', 'selftrain'), ('run', 'full'),
                     ('run', 'full_mae')]
    assert [m['run'] for m in results] == [Path(r.cfg.out).name for r in runs]                     # in the grid's order


def test_the_runner_refuses_a_student_whose_teacher_is_not_in_the_grid(tmp_path):
    with pytest.raises(ValueError, match='is not a run of the grid'): grid.run_grid(_runs(tmp_path)[:2])


def _finished(cfg, **record):
    "A finished run of `cfg` in its folder, its recorded settings changed by `record` (None: the setting left out)."
    config = {**recorded(cfg), 'precision': 'fp32', **record}
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / 'metrics.json').write_text(json.dumps({'config': {k: v for k, v in config.items() if v is not None}}))


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path):
    cfg = finetune_config(tmp_path / 'data', tmp_path / 'b' / 'runs' / 'full', 'full', .1, 0, 1, 2, tmp_path / 'b' / 'pretrain' / 'p.pth',
                          {'precision': 'fp32'})
    elsewhere = str(tmp_path / 'a' / 'runs' / 'full')          # gathered from another folder: its paths compare relative to it
    _finished(cfg, out=elsewhere, pretrained=str(tmp_path / 'a' / 'pretrain' / 'p.pth'), freeze='none', lr_mult=None, precision=None,
              adapter_ratio=.25)    # the old name of full, a setting added since (its default), fp32 before bf16, sandwich-only settings
    assert grid.run_finetune(cfg)['config']['freeze'] == 'none'
    _finished(cfg, wd=.1, pretrained=str(tmp_path / 'b' / 'other.pth'))
    with pytest.raises(ValueError, match=r"metrics.json: a finished run with other settings \(pretrained: other.pth there, pretrain/p.pth "
                                         r"now, wd: 0.1 there, 0.01 now\); choose another --out or remove"):
        grid.run_finetune(cfg)
    _finished(cfg, precision='bf16')
    with pytest.raises(ValueError, match='precision: bf16 there, fp32 now'): grid.run_finetune(cfg)
    assert grid.run_finetune(cfg, any_precision=True)['config']['precision'] == 'bf16'


def test_a_control_run_from_the_checkpoints_own_weights_is_refused_saying_so(tmp_path):
    """A control run made when it took the untrained checkpoint's weights (seed 0's for every seed, or its
    seed's own checkpoint): refused, and the error says why."""
    cfg = finetune_config(tmp_path / 'data', tmp_path / 'runs' / 'full_untrained', 'full', .1, 1, 1, 2,
                          tmp_path / 'pretrain_epochs0' / 'pretrained.pth', {'precision': 'fp32', 'pretrained_init': 'scratch'})
    why = "scratch now: a control run from before the control took the weights scratch draws with its seed"
    _finished(cfg, pretrained_init=None)                       # recorded before the setting: the checkpoint's weights
    with pytest.raises(ValueError, match=why): grid.run_finetune(cfg)
    _finished(cfg, pretrained_init='weights', pretrained=str(tmp_path / 'pretrain_epochs0_seed1' / 'pretrained.pth'))
    with pytest.raises(ValueError, match=why): grid.run_finetune(cfg)
    _finished(cfg, pretrained_init='weights', wd=.1)           # another difference too: no such guess
    with pytest.raises(ValueError, match=r'wd: 0.1 there, 0.01 now\); choose'): grid.run_finetune(cfg)


def test_a_select_run_is_an_efficiency_run_of_the_same_folder_and_settings(tmp_path):
    "select's <folder>/select/<setting>/<run> compares its paths relative to <folder>, as efficiency's <folder>/runs/<run> does."
    cfg = finetune_config(tmp_path / 'data', tmp_path / 'b' / 'select' / 'lr' / 'full_1', 'full', .1, 0, 1, 2, tmp_path / 'b' / 'pretrain' / 'p.pth',
                          {'precision': 'fp32'})
    _finished(cfg, out=str(tmp_path / 'b' / 'runs' / 'full'))         # efficiency's finished run, linked into select's folder
    assert grid.run_finetune(cfg)['config']['pretrained'] == str(tmp_path / 'b' / 'pretrain' / 'p.pth')
    _finished(cfg, out=str(tmp_path / 'b' / 'runs' / 'full'), pretrained=str(tmp_path / 'b' / 'pretrain0' / 'p.pth'))
    with pytest.raises(ValueError, match=r'pretrained: pretrain0/p.pth there, pretrain/p.pth now'): grid.run_finetune(cfg)


def test_every_bench_flag_defaults_to_its_settings_field():
    import argparse
    import dataclasses
    from lesion_fastai.bench.budget import BudgetSettings
    from lesion_fastai.bench.efficiency import EfficiencySettings
    from lesion_fastai.bench.select import SelectSettings
    from lesion_fastai.bench.study import StudySettings
    from lesion_fastai.bench.common import add_bench_settings
    from lesion_fastai.config import from_args
    for cls, argv in ((EfficiencySettings, []), (StudySettings, []), (BudgetSettings, []), (SelectSettings, ['--setting', 'wd', '--values', '.01'])):
        ap = argparse.ArgumentParser()
        add_bench_settings(ap, cls, required=('setting', 'values') if cls is SelectSettings else ())
        parsed = from_args(cls, ap, ap.parse_args(argv))
        direct = cls(**({'setting': 'wd', 'values': (.01,)} if cls is SelectSettings else {}))
        assert dataclasses.asdict(parsed) == dataclasses.asdict(direct), cls.__name__


@pytest.mark.parametrize('cls, bad, message', [
    ('EfficiencySettings', {'jobs': 0}, '--jobs must be at least 1, got 0'),
    ('EfficiencySettings', {'precision': 'fp16'}, "--precision 'fp16': expected one of auto, fp32, bf16"),
    ('EfficiencySettings', {'modes': ('scratch', 'nope')}, "--modes unknown ['nope']"),
    ('EfficiencySettings', {'pretexts': ('context',), 'context': 0}, '--pretexts context needs --context 1 or more'),
    ('SelectSettings', {'setting': 'unfreeze_after', 'values': (2.5,)}, '--setting unfreeze_after takes whole numbers'),
    ('SelectSettings', {'setting': 'update_frozen_bn', 'values': (0., 2.)}, '--setting update_frozen_bn takes 0 or 1, off or on'),
    ('BudgetSettings', {'mode': 'scratch'}, "--mode 'scratch': expected one of full, encoder"),
])
def test_bench_settings_are_checked_where_they_are_made(cls, bad, message):
    import importlib
    module = importlib.import_module(f"lesion_fastai.bench.{cls.removesuffix('Settings').lower()}")
    with pytest.raises(SettingError, match=message.replace('[', r'\[').replace('(', r'\(')):
        getattr(module, cls)(**{**({'setting': 'wd', 'values': (1.,)} if cls == 'SelectSettings' else {}), **bad})


def test_quick_is_a_small_run_in_a_folder_of_its_own():
    from lesion_fastai.bench.common import data_folder, quick
    from lesion_fastai.bench.efficiency import EfficiencySettings
    s = quick(EfficiencySettings(quick=True), seeds=(0,), neighbours=2, fractions=(.1, 1.))
    assert (s.out, s.patients, s.native, s.epochs, s.pretrain_epochs, s.seeds) == (Path('runs/bench/efficiency_quick'), 40, 128, 2, 1, (0,))
    assert data_folder(s, s.neighbours) == Path('runs/bench/efficiency_quick/data_40p_128px')
    assert quick(EfficiencySettings(out=Path('x'))).out == Path('x') and data_folder(EfficiencySettings(), 10).name == 'data_250p_256px_10n'


def test_the_control_is_an_untrained_pretraining_of_its_own_and_reported_as_the_control(tmp_path):
    "--pretexts untrained: `pretrain --epochs 0` in its own folder, its runs named and reported as the control, never the best pretrained mode."
    from lesion_fastai.bench.efficiency import EfficiencySettings, efficiency_grid, verdict_lines
    s = EfficiencySettings(out=tmp_path, fractions=(.1,), seeds=(0,), modes=('scratch', 'full'), pretexts=('masked', 'untrained'), context=0)
    runs = efficiency_grid(s, tmp_path / 'data')
    control = [r for r in runs if r.row['mode'] == 'full [untrained]']
    assert len(control) == 1 and control[0].pretrain.epochs == 0 and Path(control[0].pretrain.out).name == 'pretrain_epochs0'
    assert {r.pretrain.epochs for r in runs if r.pretrain and r not in control} == {s.pretrain_epochs}
    assert Path(control[0].cfg.pretrained).parent == Path(control[0].pretrain.out) and control[0].cfg.out.name.endswith('_untrained')
    # the control's weights are the ones scratch draws with its seed: the checkpoint gives the architecture, one for every seed
    runs = efficiency_grid(replace(s, seeds=(0, 1)), tmp_path / 'data')
    inits = {(r.row['mode'], r.cfg.seed): r.cfg.pretrained_init for r in runs if r.row['mode'] != 'scratch'}
    assert inits == {('full [untrained]', 0): 'scratch', ('full [untrained]', 1): 'scratch', ('full [masked]', 0): 'weights', ('full [masked]', 1): 'weights'}
    assert len({Path(r.pretrain.out) for r in runs if r.row['mode'] == 'full [untrained]'}) == 1
    cell = lambda mode, valid: dict(fraction=.1, mode=mode, valid_froc=valid, valid_ci=float('nan'), froc=.2, froc_ci=float('nan'),
                                    diff=0., diff_ci=float('nan'), pairs=1)
    lines = verdict_lines([cell('full [masked]', .1), cell('full [untrained]', .3), cell('full-scale [masked]', .4)])
    assert lines[0].startswith('labels 0.1: best pretrained mode on validation is full [masked]')     # not the better controls
    assert lines[2].startswith("labels 0.1: scale-only control (fresh weights with the pretrained weights' scale): full-scale [masked]")
    assert lines[1].startswith('labels 0.1: control (the untrained checkpoint, which should tie scratch): full [untrained]')
    with pytest.raises(SettingError, match='untrained'): EfficiencySettings(out=tmp_path, pretexts=('untrainedd',))


def test_the_transfer_modes_start_full_from_the_scale_or_the_first_stages_of_the_checkpoint(tmp_path):
    from lesion_fastai.bench.efficiency import EfficiencySettings, efficiency_grid
    s = EfficiencySettings(out=tmp_path, fractions=(.1,), seeds=(0,), modes=('full', 'full-scale', 'full-k0', 'full-k2'), context=0)
    runs = {r.row['mode']: r.cfg for r in efficiency_grid(s, tmp_path / 'data')}
    assert {m: (c.freeze, c.pretrained_init, c.transfer_stages) for m, c in runs.items()} == {
        'full [masked]': ('full', 'weights', None), 'full-scale [masked]': ('full', 'scale', None),
        'full-k0 [masked]': ('full', 'weights', 0), 'full-k2 [masked]': ('full', 'weights', 2)}
    assert len({c.pretrained for c in runs.values()}) == 1 and len({c.out for c in runs.values()}) == 4


def test_a_finished_pretraining_is_reused_only_with_the_same_settings(tmp_path, monkeypatch):
    "A sandwich run from before the gate is an ungated run; a pretraining of other epochs is an error, not a checkpoint reused."
    cfg = finetune_config(tmp_path / 'data', tmp_path / 'runs' / 'sandwich', 'sandwich', .1, 0, 1, 2, tmp_path / 'p.pth', {'precision': 'fp32'})
    _finished(cfg, adapter_gate=None)
    with pytest.raises(ValueError, match='adapter_gate: False there, True now'): grid.run_finetune(cfg)
    assert grid.run_finetune(replace(cfg, adapter_gate=False))
    pre = pretraining(tmp_path, tmp_path / 'data', 3, 2, {'context': 0, 'precision': 'fp32'})
    monkeypatch.setattr('lesion_fastai.pretraining.pretrain', lambda c: pytest.fail('a finished pretraining trained again'))
    Path(pre.out).mkdir(parents=True)
    (Path(pre.out) / 'pretrained.pth').write_bytes(b'')
    (Path(pre.out) / 'pretrain_metrics.json').write_text(json.dumps({'config': {**recorded(pre), 'in_chans': 1, 'train_slices': 4}}))
    assert grid.pretrain_once(pre) == Path(pre.out) / 'pretrained.pth'
    with pytest.raises(ValueError, match=r'pretrain_metrics.json: a finished pretraining with other settings \(epochs: 3 there, 10 now\); '
                                         r'ask for its settings \(--pretrain-epochs 3'):
        grid.pretrain_once(replace(pre, epochs=10))
