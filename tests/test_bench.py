"""The benchmarks' plumbing on tiny settings (the real runs are benchmarks, not tests)."""
import json
from pathlib import Path

import numpy as np
import pytest

from lesion_fastai.bench.efficiency import EfficiencySettings, efficiency, efficiency_table, summarise, verdict_lines
from lesion_fastai.bench.select import SelectSettings, select
from lesion_fastai.bench.study import StudySettings, study
from lesion_fastai.config import FinetuneConfig
from lesion_fastai.finetuning import finetune


@pytest.mark.slow
def test_same_epoch_length_repeats_the_label_subset(tiny_data, tiny_records, tmp_path):
    n_train = sum(r.split == 'train' for r in tiny_records)
    m = finetune(FinetuneConfig(data=tiny_data, out=tmp_path, epochs=1, bs=2, size=32, label_fraction=.3,
                                same_epoch_length=True))
    assert m['train_slices'] < n_train
    assert m['slices_per_epoch'] == n_train          # every epoch as long as with all labels
    m = finetune(FinetuneConfig(data=tiny_data, out=tmp_path / 'b', epochs=1, bs=2, size=32, label_fraction=.3))
    assert m['slices_per_epoch'] == m['train_slices'] < n_train


@pytest.mark.slow
def test_efficiency_smoke_writes_table_plot_and_resumes(tiny_data, tmp_path):
    args = dict(out=tmp_path, data=tiny_data, patients=10, native=64, fractions=[.5, 1.], modes=['scratch', 'decoder-sandwich'],
                seeds=[0], epochs=1, pretrain_epochs=1, bs=2, pretexts=['masked', 'mae'])
    res = efficiency(EfficiencySettings(**args))                         # the data ships neighbours: every run sees two a side
    want = {(m, f) for m in ('scratch', 'decoder-sandwich [masked]', 'decoder-sandwich [mae]') for f in (.5, 1.)}
    assert {(r['mode'], r['fraction']) for r in res['rows']} == want
    assert (tmp_path / 'pretrain_context2' / 'pretrained.pth').exists() and (tmp_path / 'pretrain_context2_pretextmae' / 'pretrained.pth').exists()
    assert (tmp_path / 'data_efficiency.png').stat().st_size > 0
    table = (tmp_path / 'efficiency.md').read_text()
    assert table.count('| decoder-sandwich [mae] |') == 2 and 'mean box FROC / hit@0.5' in table and 'paired difference from scratch' in table
    assert 'best pretrained mode on validation' in table
    stamp = (tmp_path / 'runs' / 'scratch_1_seed0_context2' / 'metrics.json').stat().st_mtime
    efficiency(EfficiencySettings(**args))                               # finished runs are kept, not redone
    assert (tmp_path / 'runs' / 'scratch_1_seed0_context2' / 'metrics.json').stat().st_mtime == stamp
    assert json.loads((tmp_path / 'runs' / 'scratch_1_seed0_context2' / 'metrics.json').read_text())['config']['context'] == 2
    # report only: the finished runs, nothing trained (a cell that never ran is left out)
    rep = efficiency(EfficiencySettings(**{**args, 'fractions': [.5, 1., .2]}, report_only=True))
    assert {(r['mode'], r['fraction']) for r in rep['rows']} == want and not (tmp_path / 'runs' / 'scratch_0.2_seed0_context2').exists()


@pytest.mark.slow
def test_efficiency_runs_in_parallel_processes(tiny_data, tmp_path):
    res = efficiency(EfficiencySettings(out=tmp_path, data=tiny_data, patients=10, native=64, fractions=[1.], modes=['scratch', 'sandwich'],
                                        seeds=[0], epochs=1, pretrain_epochs=1, bs=2, pretexts=['mae'], jobs=2, context=0))
    assert [r['mode'] for r in res['rows']] == ['scratch', 'sandwich [mae]']
    assert (tmp_path / 'runs' / 'sandwich_1_seed0_mae' / 'metrics.json').exists()


def _fake_rows(mode, frocs, valid=.5):
    return [dict(mode=mode, fraction=.1, seed=s, train_slices=5, n_test=9, **{'froc': f, 'sens@4': .5, 'hit@0.5': .2 + .1 * s, 'mean_iou': .2,
                 'centre_error_mm': 3., 'valid_froc': valid, 'baseline_froc': .01, 'baseline_hit@0.5': 0., 'baseline_mean_iou': .05, 'time_s': 1.})
            for s, f in enumerate(frocs)]


def test_summary_averages_seeds_with_intervals_and_pairs_with_scratch():
    rows = _fake_rows('scratch', (.4, .6, .5))
    (s,) = summarise(rows)
    assert s['hit@0.5'] == pytest.approx(.3) and s['froc'] == pytest.approx(.5) and s['seeds'] == 3
    assert s['froc_ci'] == pytest.approx(4.303 * .1 / np.sqrt(3), rel=1e-3) and s['hit_ci'] == pytest.approx(4.303 * .1 / np.sqrt(3), rel=1e-3)
    assert '| 0.1 | 5 | scratch | 0.500 +- 0.248 |  |  | 0.500 | 0.300 +- 0.248 |' in efficiency_table([s])
    # a pretrained mode a steady 0.1 above scratch seed by seed: resolved, though its own interval overlaps scratch's
    rows += _fake_rows('sandwich [mae]', (.5, .7, .6), valid=.6) + _fake_rows('none [mae]', (.1, .9, .5), valid=.4)
    summary = summarise(rows)
    sand = next(s for s in summary if s['mode'] == 'sandwich [mae]')
    assert sand['diff'] == pytest.approx(.1) and sand['diff_ci'] == pytest.approx(0, abs=1e-9)
    (line,) = verdict_lines(summary)
    assert 'sandwich [mae]' in line and 'better than scratch' in line
    none = next(s for s in summary if s['mode'] == 'none [mae]')
    assert abs(none['diff']) <= none['diff_ci']                        # inside its interval: no difference
    two = [r for r in rows if r['seed'] < 2]                           # two equal differences: an interval of 0, yet not resolved
    (line,) = verdict_lines(summarise(two))
    assert 'fewer than the 3' in line and 'better than scratch' not in line


def test_a_pretrained_mode_is_paired_with_its_own_control_seed_by_seed():
    "`full [masked]` read against `full [untrained]` as well as against scratch; the control has no control."
    rows = (_fake_rows('scratch', (.4, .6, .5)) + _fake_rows('full [untrained]', (.2, .4, .3))
            + _fake_rows('full [masked]', (.3, .5, .4), valid=.6) + _fake_rows('sandwich [masked]', (.1, .2, .3)))
    summary = {s['mode']: s for s in summarise(rows)}
    full = summary['full [masked]']
    assert full['diff'] == pytest.approx(-.1) and full['diff_control'] == pytest.approx(.1) and full['diff_control_ci'] == pytest.approx(0, abs=1e-9)
    assert 'diff_control' not in summary['full [untrained]'] and 'diff_control' not in summary['sandwich [masked]']   # no sandwich control ran
    best = verdict_lines(list(summary.values()))[0]
    assert 'full [masked]' in best and 'worse than scratch' in best and 'from its control full [untrained] 0.100' in best
    assert best.endswith('better than the control')
    assert '| full [masked] | 0.400 +- ' in efficiency_table(list(summary.values())) and '| 0.100 +- 0.000 |' in efficiency_table([full])


@pytest.mark.slow
def test_study_runs_each_variant_and_refuses_a_finished_run_with_other_settings(tiny_data, tmp_path):
    args = dict(out=tmp_path, data=tiny_data, patients=10, native=64, epochs=1, pretrain_epochs=1, bs=2)
    variants = [('scratch', 'scratch', 1., {}), ('narrow sandwich', 'sandwich', .5, {'adapter_ratio': .25}),
                ('sandwich', 'sandwich', .5, {})]
    rows = study(StudySettings(**args), variants)['rows']
    assert [r['variant'] for r in rows] == ['scratch', 'narrow sandwich', 'sandwich']
    assert rows[1]['trainable'] < rows[2]['trainable'] and rows[1]['train_slices'] < rows[0]['train_slices']
    assert '| narrow sandwich |' in (tmp_path / 'study.md').read_text()
    study(StudySettings(**args), [('scratch', 'scratch', 1., {'adapter_ratio': .25})])   # transfer layers do not concern scratch
    with pytest.raises(ValueError, match=r'wd: 0.01 there, 0.1 now'):
        study(StudySettings(**args), [('scratch', 'scratch', 1., {'wd': .1})])


def test_loading_measures_every_path_and_builds_one_disk_cache_of_those_slices(tiny_data, tmp_path):
    from lesion_fastai.bench.speed import loading
    from lesion_fastai.deeplesion import list_slices
    paths = list_slices(tiny_data)[:4]
    res = loading(paths, 32, tmp_path / 'cache')
    assert set(res) == {'ours', 'skimage', 'ours_cached', 'disk_cache_build', 'ours_disk_cache'}
    assert all(np.isfinite(v) and v > 0 for v in res.values())
    (array,) = (tmp_path / 'cache').glob('slices_*.npy')
    index = __import__('json').loads(array.with_suffix('.json').read_text())['index']
    assert sorted(k.rsplit('|', 1)[0] for k in index) == sorted(map(str, paths)) and np.load(array).shape == (4, 1, 32, 32)


@pytest.mark.slow
def test_select_compares_values_on_validation_only_over_paired_seeds(tiny_data, tmp_path):
    res = select(_select_settings(tmp_path, tiny_data, 'wd', [.01, .1], 'scratch', [1.], [0, 1]))
    assert [(r['value'], r['seed']) for r in res['rows']] == [(.01, 0), (.1, 0), (.01, 1), (.1, 1)]
    assert not any('test' in k for r in res['rows'] for k in r)                 # test figures never reach a choice
    first, second = res['summary']
    assert first['diff'] == 0 and first['seeds'] == second['seeds'] == 2
    by = {(r['value'], r['seed']): r['valid_froc'] for r in res['rows']}
    assert second['diff'] == pytest.approx(np.mean([by[.1, s] - by[.01, s] for s in (0, 1)]))
    assert res['best'] == max((.01, .1), key=lambda v: np.mean([by[v, s] for s in (0, 1)]))
    assert (tmp_path / 'select_wd.md').read_text().startswith('| wd | labels |') and res['verdict'].startswith(f"wd = {res['best']:g}")


def _select_settings(out, data, setting, values, mode, fractions, seeds, **more):
    return SelectSettings(out=out, data=data, patients=10, native=64, setting=setting, values=values, mode=mode, fractions=fractions,
                          seeds=seeds, epochs=1, pretrain_epochs=1, bs=2, **more)


def _recording_finetune(cfgs):
    "A stand-in for run_finetune that records each config and returns the same validation figures."
    valid = {'froc': {'mean_0.5_4': .5}, 'top1': {'mean_iou': .5, 'hit@0.5': .5, 'calibration': None}}
    return lambda cfg: cfgs.append(cfg) or {'valid': valid, 'train_slices': 3}


@pytest.mark.parametrize('mode, pretrains', [('carry', False), ('sandwich-ft', True)])
def test_select_pretrains_only_for_a_mode_that_starts_from_the_autoencoder(tiny_data, tmp_path, monkeypatch, mode, pretrains):
    import lesion_fastai.bench.grid as grid
    import lesion_fastai.bench.select as sel
    calls, cfgs = [], []
    monkeypatch.setattr(grid, 'pretrain_once', lambda cfg: calls.append(cfg))
    monkeypatch.setattr(grid, 'run_finetune', _recording_finetune(cfgs))
    setting, values = ('carry_weight', [.5, 1.]) if mode == 'carry' else ('unfreeze_after', [5., 2.])
    sel.select(_select_settings(tmp_path, tiny_data, setting, values, mode, [.1], [0]))
    assert bool(calls) == pretrains and [c.pretrained for c in cfgs] == [tmp_path / 'pretrain_context2' / 'pretrained.pth' if pretrains else None] * 2
    assert [getattr(c, setting) for c in cfgs] == values


def test_select_runs_a_mode_with_efficiencys_settings_for_it(tiny_data, tmp_path, monkeypatch):
    import lesion_fastai.bench.grid as grid
    import lesion_fastai.bench.select as sel
    from lesion_fastai.bench.common import UNFREEZE_AFTER
    cfgs = []
    monkeypatch.setattr(grid, 'pretrain_once', lambda cfg: None)
    monkeypatch.setattr(grid, 'run_finetune', _recording_finetune(cfgs))
    sel.select(_select_settings(tmp_path, tiny_data, 'lr_mult', [100., 10.], 'sandwich-ft', [.1], [0]))
    assert [(c.freeze, c.unfreeze_after, c.lr_mult) for c in cfgs] == [('sandwich', UNFREEZE_AFTER, 100.), ('sandwich', UNFREEZE_AFTER, 10.)]


@pytest.mark.parametrize('pretext, folder', [('untrained', 'pretrain_context2_epochs0'), ('genesis', 'pretrain_context2_pretextgenesis')])
def test_select_fine_tunes_from_the_pretext_it_names_the_control_from_no_epochs(tiny_data, tmp_path, monkeypatch, pretext, folder):
    "--pretext untrained selects a mode's setting on the control: the checkpoint of no epochs, never the trained one of pretrain_context2."
    import lesion_fastai.bench.grid as grid
    import lesion_fastai.bench.select as sel
    made, cfgs = [], []
    monkeypatch.setattr(grid, 'pretrain_once', lambda cfg: made.append(cfg))
    monkeypatch.setattr(grid, 'run_finetune', _recording_finetune(cfgs))
    sel.select(_select_settings(tmp_path, tiny_data, 'unfrozen_lr_div', [2., 1.], 'sandwich-ft', [.1], [0], pretext=pretext))
    assert [c.pretrained for c in cfgs] == [tmp_path / folder / 'pretrained.pth'] * 2 and [c.unfrozen_lr_div for c in cfgs] == [2., 1.]
    assert (made[0].epochs == 0) == (pretext == 'untrained') and all(c.out.name.endswith(f'_{pretext}') for c in cfgs)
    # the control's runs take the weights scratch draws with their seed, the checkpoint only its architecture
    assert {c.pretrained_init for c in cfgs} == {'scratch' if pretext == 'untrained' else 'weights'}


def test_select_of_a_pretext_setting_fine_tunes_each_value_from_its_own_pretraining(tiny_data, tmp_path, monkeypatch):
    "--setting genesis_paint: one pretraining per value, each with that rate; the fine-tunes alike but for their checkpoint."
    import lesion_fastai.bench.grid as grid
    import lesion_fastai.bench.select as sel
    from lesion_fastai.config import SettingError
    made, cfgs = [], []
    monkeypatch.setattr(grid, 'pretrain_once', lambda cfg: made.append(cfg))
    monkeypatch.setattr(grid, 'run_finetune', _recording_finetune(cfgs))
    sel.select(_select_settings(tmp_path, tiny_data, 'genesis_paint', [.9, 0.], 'full', [.1], [0, 1], pretext='genesis'))
    assert [(c.pretext, c.genesis_paint, c.genesis_outpaint) for c in made] == [('genesis', None, None), ('genesis', 0., None)]
    assert made[0].out == tmp_path / 'pretrain_context2_pretextgenesis'           # the official rate: efficiency's pretraining
    assert [c.pretrained.parent for c in cfgs] == [Path(c.out) for c in made] * 2 and made[0].out != made[1].out
    assert [c.out.name for c in cfgs[:2]] == ['full_0.9_0.1_seed0_genesis', 'full_0_0.1_seed0_genesis']
    for setting, mode, pretext, why in [('genesis_paint', 'full', 'masked', 'a setting of --pretext genesis, not of --pretext masked'),
                                        ('mask_ratio', 'full', 'genesis', 'not of --pretext genesis'),
                                        ('genesis_paint', 'scratch', 'genesis', 'starts from no pretraining'),
                                        ('genesis_paint', 'full', 'genesis', r'--genesis-paint must be in \[0, 1\], got 1.5')]:
        with pytest.raises(SettingError, match=why):
            _select_settings(tmp_path, tiny_data, setting, [.5, 1.5] if '1.5' in why else [.5], mode, [.1], [0], pretext=pretext)


@pytest.mark.parametrize('setting, values', [('pseudo_fp', [.5, 2.]), ('pseudo_weight', [.5, 1.])])
def test_select_self_trains_from_efficiencys_scratch_teacher_at_each_threshold(tiny_data, tmp_path, monkeypatch, setting, values):
    import lesion_fastai.bench.grid as grid
    import lesion_fastai.bench.select as sel
    from lesion_fastai.bench.common import pseudo_csv, teacher_config
    from lesion_fastai.config import DEFAULT_CONTEXT, SettingError
    cfgs, made = [], []
    monkeypatch.setattr(grid, 'run_finetune', _recording_finetune(cfgs))
    monkeypatch.setattr(grid, 'ensure_pseudo_labels', lambda teacher, cfg, fp: made.append((teacher.out, cfg.pseudo_labels, fp)) or cfg)
    sel.select(_select_settings(tmp_path, tiny_data, setting, values, 'selftrain', [.5], [0, 1], pseudo_fp=4.))
    teachers = [teacher_config(tmp_path, tiny_data, .5, s, 1, 2, DEFAULT_CONTEXT) for s in (0, 1)]    # the data ships neighbours
    assert [c for c in cfgs if c.pseudo_labels is None] == teachers and teachers[0].out == tmp_path / 'runs' / 'scratch_0.5_seed0_context2'
    students = [c for c in cfgs if c.pseudo_labels is not None]
    fps = values if setting == 'pseudo_fp' else [4.] * 2
    assert made == [(teachers[s].out, pseudo_csv(tmp_path, .5, s, DEFAULT_CONTEXT, fp), fp) for s in (0, 1) for fp in fps]
    assert [c.pseudo_weight for c in students] == (values * 2 if setting == 'pseudo_weight' else [.5] * 4)
    assert all(c.pretrained is None and c.freeze == 'scratch' and c.context == DEFAULT_CONTEXT for c in students)
    with pytest.raises(SettingError, match='a setting of the modes selftrain, selftrain-ae, not of carry'):
        _select_settings(tmp_path, tiny_data, 'pseudo_fp', [.5], 'carry', [.5], [0])


def test_select_of_rounds_makes_each_values_student_the_next_values_teacher(tiny_data, tmp_path, monkeypatch):
    import lesion_fastai.bench.common as common
    import lesion_fastai.bench.grid as grid
    import lesion_fastai.bench.select as sel
    from lesion_fastai.config import DEFAULT_CONTEXT
    cfgs, made = [], []
    monkeypatch.setattr(grid, 'run_finetune', _recording_finetune(cfgs))
    monkeypatch.setattr(grid, 'ensure_pseudo_labels', lambda teacher, cfg, fp: made.append((teacher.out, cfg.pseudo_labels)) or cfg)
    res = sel.select(_select_settings(tmp_path, tiny_data, 'rounds', [1, 2], 'selftrain', [.5], [0], pseudo_fp=.5))
    teacher, one, again, two = cfgs
    assert one == again and one.out == tmp_path / 'select' / 'rounds' / 'selftrain_1_0.5_seed0'    # round 1's student, reused
    round1 = common.pseudo_csv(tmp_path, .5, 0, DEFAULT_CONTEXT, .5)
    assert made == [(teacher.out, round1), (teacher.out, round1), (one.out, one.out / 'pseudo_labels_fp0.5.csv')]
    assert one.pseudo_labels == round1 and two.pseudo_labels == one.out / 'pseudo_labels_fp0.5.csv'
    assert two.out.name == 'selftrain_2_0.5_seed0' and [r['value'] for r in res['rows']] == [1, 2]


def test_select_refuses_a_teacher_setting_without_a_selftrain_mode(capsys):
    from lesion_fastai.bench.__main__ import main
    with pytest.raises(SystemExit):
        main(['select', '--setting', 'pseudo_fp', '--values', '0.5,1', '--mode', 'carry', '--data', 'nowhere'])
    assert 'pseudo_fp is a setting of the modes selftrain, selftrain-ae, not of carry' in capsys.readouterr().err


def test_mean_ci_is_students_t_interval():
    from lesion_fastai.stats import mean_ci
    m, h = mean_ci([1., 2., 3.])
    assert m == 2 and h == pytest.approx(4.303 * 1 / np.sqrt(3), rel=1e-3)          # t(0.975, 2 df) = 4.303
    assert mean_ci(np.arange(40.))[1] == pytest.approx(2.023 * np.arange(40.).std(ddof=1) / np.sqrt(40), rel=1e-3)   # 39 df
    assert np.isnan(mean_ci([5.])[1]) and mean_ci([5.])[0] == 5


@pytest.mark.slow
def test_gpu_check_measures_every_path_on_the_cpu_and_refuses_cuda_without_a_gpu(tmp_path):
    import json
    import torch
    from lesion_fastai.bench.__main__ import main
    from lesion_fastai.bench.speed import gpu_check
    res = gpu_check(tmp_path, device='cpu', size=64, bs=2, steps=1, workers=1, patients=4)
    assert set(res['train_images_per_s']) == {'ours_fp32', 'legacy_fp32'} and min(res['train_images_per_s'].values()) > 0
    assert set(res['loading_slices_per_s']) == {'disk_cache_build', '0_workers', '1_workers'} and min(res['loading_slices_per_s'].values()) > 0
    assert res['inference_slices_per_s'] > 0 and res['end_to_end_images_per_s'] > 0 and res['slices'] == len(list(tmp_path.rglob('*.png')))
    assert res['loader_keeps_up'] == (res['loading_slices_per_s']['1_workers'] >= res['train_images_per_s']['ours_fp32'])
    assert json.loads((tmp_path / 'gpu.json').read_text())['slices'] == res['slices'] and '| loading keeps up' in (tmp_path / 'gpu.md').read_text()
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match='no CUDA GPU here'): main(['gpu', '--out', str(tmp_path / 'cuda')])
        assert not (tmp_path / 'cuda').exists()


@pytest.mark.slow
def test_runs_gathered_from_another_folder_and_precision_report_but_do_not_resume(tiny_data, tmp_path):
    import json
    import shutil
    from lesion_fastai.bench.common import tag
    from lesion_fastai.fit import resolved_precision
    args = dict(data=tiny_data, patients=10, native=64, fractions=[1.], modes=['scratch', 'sandwich'], seeds=[0], epochs=1,
                pretrain_epochs=1, bs=2, pretexts=['masked'], context=0)
    here = resolved_precision('auto')
    other = 'fp32' if here == 'bf16' else 'bf16'
    first = efficiency(EfficiencySettings(out=tmp_path / 'a', **args))
    for part in ('runs', 'pretrain'): shutil.copytree(tmp_path / 'a' / part, tmp_path / 'b' / part)
    # the runs and checkpoint paths recorded under a/ compare relative to their folder: b/ reports them
    gathered = efficiency(EfficiencySettings(out=tmp_path / 'b', report_only=True, **args))
    assert [(r['mode'], r['froc'], r['precision']) for r in gathered['rows']] == [(r['mode'], r['froc'], here) for r in first['rows']]
    # a run that trained in the other precision (on a GPU, say): reported beside the others and labelled, never resumed as this machine's
    run = tmp_path / 'b' / 'runs' / 'scratch_1_seed0' / 'metrics.json'
    m = json.loads(run.read_text()); m['config']['precision'] = other; run.write_text(json.dumps(m))
    efficiency(EfficiencySettings(out=tmp_path / 'b', report_only=True, **args))
    assert f'| 1 {other} |' in (tmp_path / 'b' / 'efficiency.md').read_text() and f'| 1 {here} |' in (tmp_path / 'b' / 'efficiency.md').read_text()
    with pytest.raises(ValueError, match=f'precision: {other} there, {here} now'): efficiency(EfficiencySettings(out=tmp_path / 'b', **args))
    assert tag({'code_channels': (64, 8, 4, 4), 'pretext': 'mae'}) == '_code64-8-4-4_pretextmae'


def test_efficiency_cli_names_bad_code_channels(capsys):
    from lesion_fastai.bench.__main__ import main
    for bad, why in (('64,x,4', "'64,x,4' is not integers joined by commas"), ('64,8', '--code-channels must be 3 or 4')):
        with pytest.raises(SystemExit): main(['efficiency', '--code-channels', bad])
        assert why in capsys.readouterr().err


@pytest.mark.slow
def test_imagenet_mode_needs_weights_and_then_transfers_them(tiny_data, tmp_path, capsys):
    timm = pytest.importorskip('timm')
    import torch
    args = dict(data=tiny_data, patients=10, native=64, fractions=[1.], modes=['scratch', 'imagenet'], seeds=[0], epochs=1,
                pretrain_epochs=1, bs=2, backbone='resnet10t', context=0)
    res = efficiency(EfficiencySettings(out=tmp_path / 'none', **args))
    assert [r['mode'] for r in res['rows']] == ['scratch'] and 'mode imagenet skipped' in capsys.readouterr().out
    torch.save(timm.create_model('resnet10t', pretrained=False).state_dict(), tmp_path / 'w.pth')
    res = efficiency(EfficiencySettings(out=tmp_path / 'w', backbone_weights=tmp_path / 'w.pth', **args))
    assert [r['mode'] for r in res['rows']] == ['scratch', 'imagenet']
    import json
    m = json.loads((tmp_path / 'w' / 'runs' / 'imagenet_1_seed0_resnet10t' / 'metrics.json').read_text())
    assert m['config']['freeze'] == 'full' and m['config']['backbone'] == 'resnet10t' and m['config']['pretrained'] is None
    assert not (tmp_path / 'w' / 'pretrain_backboneresnet10t').exists()          # nothing needed the autoencoder


def test_scale_builds_and_reads_each_count_and_extrapolates(tmp_path):
    from lesion_fastai.bench.scale import DEEPLESION_SLICES, scale
    res = scale(tmp_path, counts=(20, 40), native=64, size=32, workers=1)
    assert [r['slices'] for r in res['rows']] == [20, 40] and all(r['build_per_s'] > 0 and r['read_per_s'] > 0 for r in res['rows'])
    assert res['count_ratio'] == 2 and res['deeplesion_build_h'] == pytest.approx(DEEPLESION_SLICES / res['rows'][-1]['build_per_s'] / 3600)
    assert res['rows'][1]['cache_mb'] > res['rows'][0]['cache_mb'] and not list(tmp_path.glob('cache_*'))   # built fresh, then removed
    assert '930,000 slices' in (tmp_path / 'scale.md').read_text()


def test_loader_rates_measure_each_cache_and_worker_count_with_and_without_augmentation(tiny_data, tmp_path):
    from lesion_fastai.bench.speed import loader_rates
    from lesion_fastai.data import SliceSpec
    rows = loader_rates(tiny_data, SliceSpec('soft', 1, 32), 2, tmp_path / 'cache', workers=(0,), epochs=1)
    assert [(r['cache'], r['workers'], r['augment']) for r in rows] == [('memory', 0, False), ('memory', 0, True), ('disk', 0, False), ('disk', 0, True)]
    assert all(np.isfinite(r['slices_per_s']) and r['slices_per_s'] > 0 for r in rows)
    assert len(list((tmp_path / 'cache').glob('slices_*.npy'))) == 1


@pytest.mark.slow
def test_precision_rates_train_both_precisions_in_one_fresh_process():
    from lesion_fastai.bench.speed import precision_rates
    res = precision_rates(32, 3, 2, steps=1, rounds=1)
    assert set(res) == {'fp32', 'bf16'} and all(v > 0 for v in res.values())


@pytest.mark.slow
def test_efficiency_runs_the_fine_tune_schedule_carried_labels_and_self_training_and_reports_each(tiny_data, tmp_path):
    modes = ['scratch', 'sandwich-ft', 'carry', 'selftrain', 'selftrain-ae']
    res = efficiency(EfficiencySettings(out=tmp_path, data=tiny_data, patients=10, native=64, fractions=[.5], modes=modes, seeds=[0],
                                        epochs=2, pretrain_epochs=1, bs=2, context=1, unfreeze_after=1, carry_weight=.5, pseudo_fp=8., rounds=2))
    assert [r['mode'] for r in res['rows']] == ['scratch', 'sandwich-ft [masked]', 'carry', 'selftrain', 'selftrain-ae [masked]']
    run = lambda name: json.loads((tmp_path / 'runs' / f'{name}_0.5_seed0_context1' / 'metrics.json').read_text())
    assert run('sandwich-ft')['config']['unfreeze_after'] == 1 and run('carry')['config']['carry_weight'] == .5
    first = run('selftrain-ae')                 # round 1: the scratch teacher's pseudo-labels, one file for both students
    assert first['config']['freeze'] == 'full' and first['config']['pseudo_labels'].endswith('pseudo/0.5_seed0_context1_fp8.csv')
    assert (tmp_path / 'pseudo' / '0.5_seed0_context1_fp8.csv').exists() and run('selftrain')['config']['pseudo_labels'] == first['config']['pseudo_labels']
    for mode in ('selftrain', 'selftrain-ae'):  # round 2: round 1's student teaches, its pseudo-labels in its folder
        folder = tmp_path / 'runs' / f'{mode}_0.5_seed0_context1'
        second = json.loads((folder.with_name(folder.name + '_rounds2') / 'metrics.json').read_text())
        assert second['config']['pseudo_labels'].endswith(f'{folder.name}/pseudo_labels_fp8.csv') and (folder / 'pseudo_labels_fp8.csv').exists()
    verdict = (tmp_path / 'efficiency.md').read_text()
    for what in ('best pretrained mode on validation', 'labels carried to neighbour slices', 'self-training from scratch',
                 'self-training from the autoencoder'): assert what in verdict
    with pytest.raises(ValueError, match='add scratch to --modes'):
        EfficiencySettings(out=tmp_path / 'x', data=tiny_data, modes=['selftrain'], seeds=[0], fractions=[.5], epochs=1, bs=2, context=1)


def test_a_neighbour_view_keeps_the_labels_and_only_the_slices_near_key_slices(tiny_data, tmp_path):
    from lesion_fastai.bench.budget import neighbour_view
    from lesion_fastai.deeplesion import list_slices, read_dl_info
    view = neighbour_view(tiny_data, tmp_path / 'view', 0)
    df = read_dl_info(tiny_data / 'DL_info.csv')
    assert (view / 'DL_info.csv').read_bytes() == (tiny_data / 'DL_info.csv').read_bytes()
    assert sorted(str(p.relative_to(view)) for p in list_slices(view)) == sorted(str(Path(p).relative_to(tiny_data)) for p in df.image_path.unique())
    assert df.file_name.nunique() < len(list_slices(tiny_data))                  # the neighbour slices are gone


@pytest.mark.slow
def test_budget_curve_pretrains_each_cell_and_compares_with_scratch_on_the_same_seeds(tiny_data, tmp_path):
    from lesion_fastai.bench.budget import BudgetSettings, budget
    res = budget(BudgetSettings(out=tmp_path, data=tiny_data, neighbours=(0, 1), pretrain_epochs=(0, 1, 2), fraction=.5, seeds=(0, 1),
                                epochs=1, bs=2))
    cells = [(s['neighbours'], s['pretrain_epochs'], s['control']) for s in res['summary']]
    assert cells == [(1, 0, False), (1, 1, False), (1, 2, False), (0, 2, False), (1, 0, True)]   # fewer neighbours: the middle epochs
    assert all(s['seeds'] == 2 for s in res['summary'])
    assert (tmp_path / 'pretrain_0n_2e' / 'pretrained.pth').exists() and (tmp_path / 'pretraining_budget.png').stat().st_size > 0
    control = json.loads((tmp_path / 'runs' / 'full_0.5_seed0_untrained' / 'metrics.json').read_text())['config']
    assert control['pretrained_init'] == 'scratch' and control['pretrained'].endswith('pretrain_0e/pretrained.pth')
    table = (tmp_path / 'budget.md').read_text()
    assert '| 1 | 0 (scratch) |' in table and '| 1 | 0 (the control: an untrained checkpoint) |' in table


def test_budget_pretrains_every_cell_with_its_pretext_and_keeps_scratch_and_the_control_shared(tmp_path):
    from lesion_fastai.bench.budget import BudgetSettings, budget_grid
    def grid(pretext):
        s = BudgetSettings(out=tmp_path, neighbours=(2,), pretrain_epochs=(0, 3), seeds=(0,), mode='sandwich-ft', pretext=pretext)
        return {(r.row['pretrain_epochs'], r.row['control']): r for r in budget_grid(s, tmp_path, 0, [(2, 0), (2, 3)], {2: tmp_path})}
    masked, genesis = grid('masked'), grid('genesis')
    assert genesis[3, False].pretrain.pretext == 'genesis' and masked[3, False].pretrain.pretext == 'masked'
    assert genesis[3, False].cfg.pretrained == genesis[3, False].pretrain.out / 'pretrained.pth' != masked[3, False].cfg.pretrained
    assert genesis[3, False].cfg.out != masked[3, False].cfg.out                     # one OUT holds both curves
    for cell in ((0, False), (0, True)):                                              # scratch and the control: one run for every pretext
        assert genesis[cell].cfg == masked[cell].cfg
    assert genesis[0, True].pretrain.epochs == 0


def test_budget_reads_each_pretrained_cell_against_scratch_and_the_control_by_seed(tmp_path):
    from lesion_fastai.bench.budget import BudgetSettings, _report
    s = BudgetSettings(out=tmp_path, neighbours=(2,), pretrain_epochs=(0, 3), seeds=(0, 1, 2))
    row = lambda e, seed, v, control=False: dict(neighbours=2, pretrain_epochs=e, seed=seed, control=control, valid_froc=v, test_froc=v, train_slices=9)
    rows = ([row(0, k, v) for k, v in enumerate((.2, .4, .3))] + [row(3, k, v) for k, v in enumerate((.3, .5, .4))]
            + [row(0, k, v, True) for k, v in enumerate((.1, .1, .4))])
    summary = {(x['pretrain_epochs'], x['control']): x for x in _report(s, tmp_path, [(2, 0), (2, 3)], rows)['summary']}
    assert summary[3, False]['valid_diff'] == pytest.approx(.1) and summary[3, False]['valid_diff_ci'] == pytest.approx(0, abs=1e-9)
    assert summary[3, False]['valid_control_diff'] == pytest.approx((.2 + .4 + 0) / 3)
    assert summary[3, False]['valid_control_diff_ci'] == pytest.approx(4.3027 * .2 / 3 ** .5, rel=1e-4)   # t(2) x sd of .2, .4, 0: paired by seed
    assert summary[0, True]['valid_diff'] == pytest.approx((-.1 - .3 + .1) / 3) and np.isnan(summary[0, True]['valid_control_diff'])
    assert np.isnan(summary[0, False]['valid_diff'])
    no_control = _report(s, tmp_path, [(2, 0), (2, 3)], [r for r in rows if not r['control']])['summary']
    assert len(no_control) == 2 and all(np.isnan(x['valid_control_diff']) for x in no_control)


def test_select_gives_an_int_setting_whole_numbers():
    from lesion_fastai.bench.select import setting_values
    values = setting_values('unfreeze_after', [5., 2.])
    assert values == [5, 2] and all(type(v) is int for v in values)        # fit_one_cycle counts epochs in ints
    assert setting_values('unfreeze_after', [2.5]) is None and setting_values('wd', [.01, .1]) == [.01, .1]


def test_select_gives_a_switch_false_and_true():
    from lesion_fastai.bench.select import setting_values
    values = setting_values('update_frozen_bn', [0., 1.])
    assert values == [False, True] and all(type(v) is bool for v in values)  # a run records the switch as the config's type
    assert setting_values('update_frozen_bn', [2.]) is None
