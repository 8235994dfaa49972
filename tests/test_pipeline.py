"""End-to-end contracts on tiny data: CLIs, export -> load_learner, resume, pretrain -> finetune, freezing."""
import json
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch
from fastai.learner import Learner, load_learner

from lesion_fastai.checkpoint import load_pretrained
from lesion_fastai.data import SliceSpec, detection_dls
from lesion_fastai.export import load_detector
from lesion_fastai.freeze import apply_freeze, freeze_callbacks, detector_splitter
from lesion_fastai.losses import DetectionLoss
from lesion_fastai.models.detector import Detector
from lesion_fastai.config import FinetuneConfig
from lesion_fastai.finetuning import finetune
from lesion_fastai.pretraining import corrupt

import finetune.__main__ as finetune_cli
import pretrain.__main__ as pretrain_cli

ENC = dict(stem_width=8, widths=(8, 16, 16, 16), depths=(1, 1, 1, 1))
METRIC_KEYS = {'froc', 'top1', 'mean_box_baseline'}
TOP1_KEYS = {'n', 'hit@0.5', 'mean_iou', 'centre_error_mm', 'centre_error_mm_mean', 'by_type'}


@pytest.fixture(scope='module')
def pretrained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('pretrain')
    pretrain_cli.main(['--data', str(tiny_data), '--out', str(out), '--epochs', '16', '--bs', '4', '--size', '32', '--lr', '1e-2',
                       '--context', '0'])
    return out


@pytest.mark.slow
def test_pretrain_writes_checkpoint_figure_and_beats_untrained(pretrained):
    ckpt = load_pretrained(pretrained / 'pretrained.pth')
    assert ckpt['config']['size'] == 32 and ckpt['config']['windows'] == 'soft' and ckpt['model_args']['encoder_args']['in_chans'] == 1
    assert (pretrained / 'reconstructions.png').stat().st_size > 0 and (pretrained / 'history.csv').exists()
    m = json.loads((pretrained / 'pretrain_metrics.json').read_text())
    assert m['valid_loss'] < .7 * m['valid_loss_untrained']



@pytest.mark.slow
def test_pretrain_patients_all_adds_the_test_patients_and_says_what_that_costs(tiny_data, tmp_path, caplog):
    from lesion_fastai.deeplesion import list_slices, read_dl_info
    df = read_dl_info(tiny_data / 'DL_info.csv')
    counts = {split: len(list_slices(tiny_data, set(df.patient[df.split == split]))) for split in ('train', 'test')}
    pretrain_cli.main(['--data', str(tiny_data), '--out', str(tmp_path / 'all'), '--epochs', '1', '--bs', '4', '--size', '32',
                       '--patients', 'all'])
    m = json.loads((tmp_path / 'all' / 'pretrain_metrics.json').read_text())
    assert m['train_slices'] == counts['train'] + counts['test'] and counts['test'] > 0
    assert any('--patients all' in r.getMessage() and 'not held out' in r.getMessage() for r in caplog.records if r.levelname == 'WARNING')

@pytest.mark.slow
def test_finetune_cli_scratch_writes_metrics_results_and_export(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # a relative --out, as users type it
    out = tmp_path / 'run'
    finetune_cli.main(['--data', str(tiny_data), '--out', 'run', '--epochs', '1', '--bs', '2', '--size', '32'])
    m = json.loads((out / 'metrics.json').read_text())
    assert set(m) >= {'valid', 'test', 'mean_box', 'parameters', 'config', 'train_slices', 'time_s'}
    assert set(m['test']) >= METRIC_KEYS and set(m['test']['top1']) >= TOP1_KEYS and m['config']['freeze'] == 'scratch'
    assert set(m['test']['froc']['sensitivity']) == {'0.5', '1', '2', '4', '8', '16'} and m['config']['size'] == 32
    for f in ('results.png', 'froc.png', 'models/best.pth'): assert (out / f).stat().st_size > 0, f
    from test_report import CHROMIUM, shown_figures
    text = (out / 'report.html').read_text()
    assert 'this model, test' in text and text.count('<img src="data:image/png;base64,') == 4     # froc, training, results, errors
    if CHROMIUM: assert shown_figures(out / 'report.html') == '4 of 4'
    history = (out / 'history.csv').read_text().strip().splitlines()
    assert len(history) == 2 and history[0] == 'epoch,train_loss,valid_loss,froc,time'
    import csv
    for name, split in (('predictions.csv', 'test'), ('predictions_valid.csv', 'valid')):
        rows = list(csv.reader(open(out / name)))
        assert rows[0] == ['File_name', 'x1', 'y1', 'x2', 'y2', 'score']
        assert len(rows) - 1 == m[split]['froc']['predictions'] > 0
        assert all(r[0].endswith('.png') and 0 <= float(r[1]) <= float(r[3]) <= 64 and 0 < float(r[5]) <= 1 for r in rows[1:])


@pytest.fixture(scope='module', params=['points', 'bbox'])
def exported(request, tiny_data, tmp_path_factory):
    "A one-epoch Gaussian-head model at 32 px (the slices are 64 px) seeing one slice, exported, per target block."
    out = tmp_path_factory.mktemp(request.param)
    finetune(FinetuneConfig(data=tiny_data, out=out, epochs=1, bs=2, size=32, target=request.param, head='gaussian', context=0))
    return out


@pytest.mark.slow
def test_predict_returns_boxes_in_the_slice_files_pixels(exported, tiny_records, tmp_path):
    from lesion_fastai.deeplesion import load_hu, save_hu
    from lesion_fastai.heatmap import KEEP
    learn = load_learner(exported / 'export.pkl')
    rec = next(r for r in tiny_records if r.split == 'test')    # a 64 px slice; the model sees it at 32 px
    (boxes, scores), raw, _ = learn.predict(rec.image_path)
    corners = torch.as_tensor(boxes).reshape(-1, 4)             # every box: x1, y1, x2, y2 in the file's pixels
    assert corners.shape == (KEEP, 4) and scores.shape == (KEEP,) and (scores[:-1] >= scores[1:]).all()
    assert (corners[:, :2] < corners[:, 2:]).all() and torch.allclose(corners, (raw.reshape(-1, 4) + 1) / 2 * 64, atol=1e-4)
    # the same slice written at twice the size: the same model input, so the same boxes at twice the pixels
    big = tmp_path / 'Images_png' / '000001_01_01' / '001.png'
    save_hu(big, np.kron(load_hu(rec.image_path), np.ones((2, 2), np.float32)))
    (boxes2, scores2), _, _ = learn.predict(big)
    assert torch.allclose(scores2, scores, atol=1e-5)
    assert torch.allclose(torch.as_tensor(boxes2).reshape(-1, 4), 2 * corners, atol=1e-2) and corners.max() > 32


@pytest.mark.slow
def test_show_results_on_an_exported_learner(exported, tiny_data, tiny_records, capsys):
    import matplotlib.pyplot as plt
    from lesion_fastai.data import labelled_dl
    learn = load_learner(exported / 'export.pkl')
    dl = labelled_dl(learn, tiny_data)                          # test slices of the folder, with their boxes
    rec = dl.dataset.items[0]
    (_, scores), _, _ = learn.predict(rec)
    assert scores[2] > scores[3]
    threshold = float(scores[2] + scores[3]) / 2                # so that the three best boxes are drawn (halfway: batches of
                                                                # another size may round the scores a little differently)
    learn.show_results(dl=dl, max_n=2, min_score=threshold)
    ax = plt.gcf().axes[0]
    colours = [p.get_edgecolor()[:3] for p in ax.patches]
    n = len(rec.boxes)
    assert colours == [(0., 1., 0.)] * n + [(1., 1., 0.)] * int((scores >= threshold).sum())   # every lesion green, boxes yellow
    assert len(ax.texts) == int((scores >= threshold).sum())                                 # each box with its score
    x1, y1, x2, y2 = rec.boxes[0] * 32 / 64                     # drawn on the 32 px image the model saw
    truth = ax.patches[0]
    assert truth.get_xy() == pytest.approx((x1, y1), abs=1e-3) and truth.get_width() == pytest.approx(x2 - x1, abs=1e-3)
    plt.close('all')
    op = learn.model.decoding.operating_score                   # chosen on validation by finetune, stored in the export
    assert op is not None and 0 < op <= 1
    capsys.readouterr()
    learn.show_results(dl=dl, max_n=1)                          # the default threshold: the operating point
    yellow = [p for p in plt.gcf().axes[0].patches if p.get_edgecolor()[:3] == (1., 1., 0.)]
    drawn = max(1, int((scores[:5] >= op).sum()))               # the top box whatever it scores
    assert len(yellow) == drawn and (yellow[0].get_linestyle() == '--') == bool(scores[0] < op)
    assert f'{drawn} box(es) drawn at score >= {op:.3f}' in capsys.readouterr().out
    plt.close('all')
    learn2 = Learner(detection_dls(tiny_records, SliceSpec(size=32), bs=2, seed=0), learn.model, loss_func=learn.loss_func)
    learn2.show_results(max_n=2, min_score=0.)                  # and on a learner with its training data
    assert {p.get_edgecolor()[:3] for p in plt.gcf().axes[0].patches} == {(0., 1., 0.), (1., 1., 0.)}
    plt.close('all')


@pytest.mark.slow
def test_eval_cli_reports_what_finetune_reported_with_the_baseline_it_trained_with(tiny_data, tmp_path):
    """With half the labels, the mean box of the training subset is the baseline; --eval reads it from the
    export (the data's whole training split would give another)."""
    finetune(FinetuneConfig(data=tiny_data, out=tmp_path, epochs=1, bs=2, size=32, label_fraction=.5))
    finetune_cli.main(['--eval', str(tmp_path / 'export.pkl'), '--data', str(tiny_data), '--out', str(tmp_path / 'eval')])
    m, ref = (json.loads(p.read_text()) for p in (tmp_path / 'eval' / 'eval_metrics.json', tmp_path / 'metrics.json'))
    assert set(m['test']) >= METRIC_KEYS
    for f in ('eval_results.png', 'eval_froc.png', 'eval_predictions.csv', 'eval_report.html'): assert (tmp_path / 'eval' / f).exists(), f
    assert m['test']['froc'] == ref['test']['froc'] and m['test']['top1']['mean_iou'] == pytest.approx(ref['test']['top1']['mean_iou'])
    assert (tmp_path / 'eval' / 'eval_predictions.csv').read_text() == (tmp_path / 'predictions.csv').read_text()
    assert m['test']['mean_box_baseline'] == ref['test']['mean_box_baseline'] and m['mean_box_source'] == 'stored with the model'
    from lesion_fastai.deeplesion import load_data
    from lesion_fastai.metrics import mean_box
    assert not np.allclose(mean_box([r for r in load_data(tiny_data)[1] if r.split == 'train']), ref['mean_box'])


@pytest.mark.slow
def test_noisy_lesions_are_dropped_from_validation_and_test(tmp_path):
    """The generator marks lesions Possibly_noisy; fine-tuning scores validation and test on the others,
    and on the slices that keep at least one."""
    from lesion_fastai.deeplesion import read_dl_info
    from lesion_fastai.synthetic import generate
    generate(tmp_path / 'data', patients=10, size=64, seed=3, neighbours=1, noisy=.4)
    df = read_dl_info(tmp_path / 'data' / 'DL_info.csv')
    assert 0 < df.noisy.sum() < len(df)
    m = finetune(FinetuneConfig(data=tmp_path / 'data', out=tmp_path / 'run', epochs=1, bs=2, size=32))
    from lesion_fastai.fit import resolved_precision
    assert m['config']['precision'] == resolved_precision('auto') and m['config']['context'] == 2   # the defaults: auto, two neighbours
    for split, key in (('val', 'valid'), ('test', 'test')):
        sel = df[df.split == split]
        clean_slices = sel[~sel.noisy].file_name.nunique()
        assert clean_slices < sel.file_name.nunique() or split == 'val'
        assert m[key]['top1']['n'] == m[key]['froc']['slices'] == clean_slices, split
        assert m[key]['froc']['lesions'] == int((~sel.noisy).sum()), split


def _history(run):
    "history.csv rows without the time column."
    return [line.rsplit(',', 1)[0] for line in (run / 'history.csv').read_text().strip().splitlines()]


def _dead_pid():
    p = subprocess.Popen([sys.executable, '-c', 'pass'])
    p.wait()
    return p.pid


@pytest.mark.slow
def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    """Killed at the worst moment (epoch 2's history row written, its resume state not), then resumed:
    the same history, weights and metrics as the run that was never interrupted, with augmentation,
    shuffling and the Gaussian head's sampling all drawing random numbers."""
    from lesion_fastai.callbacks import ResumeState
    cfg = dict(data=tiny_data, bs=2, size=32, seed=1, epochs=3, head='gaussian')
    ref = finetune(FinetuneConfig(out=tmp_path / 'ref', **cfg))
    real = ResumeState.after_epoch

    def killed(self):
        if self.epoch == 1: raise KeyboardInterrupt
        real(self)
    monkeypatch.setattr(ResumeState, 'after_epoch', killed)
    run = tmp_path / 'run'
    with pytest.raises(KeyboardInterrupt): finetune(FinetuneConfig(out=run, **cfg))
    monkeypatch.undo()
    assert torch.load(run / 'last.pth', weights_only=False)['epoch'] == 0 and len(_history(run)) == 3   # header + 2 rows
    stale = run / f'.last.pth.{_dead_pid()}.tmp'
    stale.write_bytes(b'half a checkpoint')                    # what a kill during a save leaves
    m = finetune(FinetuneConfig(out=run, resume=True, **cfg))
    assert _history(run) == _history(tmp_path / 'ref') and len(_history(run)) == 4
    a, b = (torch.load(p / 'last.pth', weights_only=False)['model'] for p in (tmp_path / 'ref', run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert m['test'] == ref['test'] and m['valid'] == ref['valid']
    assert not stale.exists() and not list(run.rglob('.*.tmp'))


@pytest.mark.slow
def test_pretrain_then_finetune_loads_exactly_the_encoder(tiny_data, pretrained, tmp_path):
    ckpt = load_pretrained(pretrained / 'pretrained.pth')
    m = finetune(FinetuneConfig(data=tiny_data, out=tmp_path, epochs=1, bs=2, pretrained=pretrained / 'pretrained.pth',
                                freeze='encoder'))
    assert m['config']['size'] == 32 and m['config']['freeze'] == 'encoder'      # settings from the checkpoint
    model = load_learner(tmp_path / 'export.pkl').model
    for k, v in ckpt['encoder'].items(): assert torch.equal(model.encoder.state_dict()[k], v), k


def _learner(tiny_records, model, mode, update_bn=False, train_bn=False):
    dls = detection_dls(tiny_records, SliceSpec(size=32), bs=2, seed=0, augment=False)
    learn = Learner(dls, model, loss_func=DetectionLoss(), splitter=detector_splitter, train_bn=train_bn,
                    cbs=freeze_callbacks(mode, update_bn))
    apply_freeze(learn, mode)
    return learn


@pytest.mark.parametrize('mode', ['sandwich', 'encoder', 'full', 'none', 'scratch'])   # none: full's old name
def test_every_freeze_mode_trains_one_batch(tiny_records, mode):
    model = Detector(dict(ENC), sandwich=mode == 'sandwich')
    learn = _learner(tiny_records, model, mode)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learn.fit(1, 1e-2)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    enc_changed = {k for k in changed if k.startswith('encoder.')}
    assert any(k.startswith('head.') for k in changed)
    if mode in ('sandwich', 'encoder'): assert not enc_changed
    else: assert enc_changed


def test_sandwich_step_keeps_frozen_weights_and_bn_statistics(tiny_records):
    torch.manual_seed(0)
    model = Detector(dict(ENC), sandwich=True)
    learn = _learner(tiny_records, model, 'sandwich')
    enc0 = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    ad0 = {k: v.clone() for k, v in model.adapters.state_dict().items()}
    learn.fit(2, 1e-2)
    for k, v in model.encoder.state_dict().items(): assert torch.equal(v, enc0[k]), k   # weights and running stats
    assert any(not torch.equal(v, ad0[k]) for k, v in model.adapters.state_dict().items() if 'conv2' in k)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(('adapters.', 'neck.', 'head.')) for n in trainable)


def _decoder_sandwich(skips=False, stride=4, deepest=False, **kw):
    from lesion_fastai.models.autoencoder import create_autoencoder
    ae = create_autoencoder(1, **ENC, **kw)
    model = Detector(ae.encoder_args, sandwich='decoder', decoder_args={k: v for k, v in ae.model_args.items() if k != 'encoder_args'},
                     decoder_skips=skips, stride=stride, decoder_deepest=deepest)
    model.encoder.load_state_dict(ae.encoder.state_dict(), strict=True)
    model.decoder.load_state_dict(ae.decoder.state_dict(), strict=True)
    return ae, model


@pytest.mark.parametrize('codes', [(64, 8, 4), (64, 8, 4, 4)])
def test_untrained_decoder_sandwich_computes_the_pretrained_decoder_path(codes):
    "Transfer layers start as the identity: the neck reads exactly the autoencoder's decoder blocks, down to stride 4."
    torch.manual_seed(0)
    ae, model = _decoder_sandwich(code_channels=codes)
    ae.eval(); model.eval()
    x = torch.rand(2, 1, 64, 64)
    h = ae.encoder.stem(x)
    feats = []
    for stage in ae.encoder.stages: h = stage(h); feats.append(h)
    want = ae.decoder.features(feats)[:3][::-1]                      # strides 4, 8, 16
    got = model.features(x)
    assert [f.shape[-1] for f in got] == [16, 8, 4]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))


def test_decoder_sandwich_step_keeps_frozen_encoder_decoder_and_bn_statistics(tiny_records):
    torch.manual_seed(0)
    _, model = _decoder_sandwich()
    learn = _learner(tiny_records, model, 'sandwich')
    frozen0 = {k: v.clone() for k, v in [*model.encoder.state_dict().items(), *model.decoder.state_dict().items()]}
    ad0 = {k: v.clone() for k, v in model.decoder_adapters.state_dict().items()}
    learn.fit(2, 1e-2)
    frozen = dict([*model.encoder.state_dict().items(), *model.decoder.state_dict().items()])
    assert any('running_mean' in k for k in frozen)
    for k, v in frozen.items(): assert torch.equal(v, frozen0[k]), k       # weights and running statistics
    assert any(not torch.equal(v, ad0[k]) for k, v in model.decoder_adapters.state_dict().items() if 'conv2' in k)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(('decoder_adapters.', 'neck.', 'head.')) for n in trainable)


@pytest.mark.parametrize('stride', [4, 8])
def test_decoder_skips_give_the_head_what_the_codes_drop(stride):
    """With the codes silenced (their projections zero) the decoder blocks see nothing of the slice: without
    skips every slice gives the neck the same features, with them they follow the slice, through the encoder
    stage at each block's stride (at stride 8 the blocks start one stage deeper)."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64)
    for skips in (False, True):
        _, model = _decoder_sandwich(skips, stride)
        for code in model.decoder.codes: torch.nn.init.zeros_(code[0].weight)
        feats = model.eval().features(x)
        assert [f.shape[-1] for f in feats] == [64 // stride // 2 ** i for i in range(len(feats))] and feats[-1].shape[-1] == 4
        same = all(torch.allclose(f[0], f[1]) for f in feats)
        assert same != skips, f"skips {skips}: the two slices give {'the same' if same else 'different'} features"


def test_decoder_deepest_gives_the_pyramid_the_stage_every_other_mode_reads(tiny_records):
    """With `decoder_deepest` the neck reads the encoder's deepest stage (stride 32) after the decoder's blocks,
    unchanged, and its lateral trains; the blocks' features stay what they were."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64)
    _, plain = _decoder_sandwich(True)
    _, model = _decoder_sandwich(True, deepest=True)
    model.load_state_dict(plain.state_dict(), strict=False)
    feats, before = model.eval().features(x), plain.eval().features(x)
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2] and len(model.neck.laterals) == len(plain.neck.laterals) + 1
    assert all(torch.equal(a, b) for a, b in zip(feats, before))
    h = model.encoder.stem(x)
    for stage in model.encoder.stages: h = stage(h)
    assert torch.equal(feats[-1], h)
    deepest0 = model.neck.laterals[-1].weight.clone()
    _learner(tiny_records, model, 'sandwich').fit(1, 1e-2)
    assert not torch.equal(model.neck.laterals[-1].weight, deepest0)
    with pytest.raises(ValueError, match="deepest stage to the decoder sandwich's pyramid"):
        Detector(model.encoder_args, sandwich='encoder', decoder_deepest=True)


def test_decoder_skips_train_with_the_transfer_layers_and_need_the_decoder_sandwich(tiny_records, tiny_data, control, tmp_path):
    torch.manual_seed(0)
    _, model = _decoder_sandwich(True)
    skips0 = {k: v.clone() for k, v in model.decoder_skips.state_dict().items()}
    learn = _learner(tiny_records, model, 'sandwich')
    learn.fit(2, 1e-2)
    assert all(not torch.equal(v, skips0[k]) for k, v in model.decoder_skips.state_dict().items())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith('decoder_skips.')} and all(
        n.startswith(('decoder_adapters.', 'decoder_skips.', 'neck.', 'head.')) for n in trainable)
    with pytest.raises(ValueError, match="decoder skips join the decoder sandwich's blocks"):
        Detector(model.encoder_args, sandwich='encoder', decoder_skips=True)
    run = tmp_path / 'skips'
    for skips in (True, False):                       # the default, and 3FabRec's decoder alone (with the deepest stage)
        finetune(FinetuneConfig(data=tiny_data, out=run / str(skips), pretrained=control, freeze='sandwich', sandwich='decoder',
                                decoder_skips=skips, decoder_deepest=not skips, epochs=1, bs=2))
        saved, _, _ = load_detector(run / str(skips) / 'model.safetensors')   # the shared form rebuilds the skips around its weights
        assert (saved.decoder_skips is not None) == skips and len(saved.neck.laterals) == 3 + (not skips)
    finetune(FinetuneConfig(data=tiny_data, out=run / 'encoder', pretrained=control, freeze='sandwich', epochs=1, bs=2))
    assert load_detector(run / 'encoder' / 'model.safetensors')[0].decoder_skips is None


@pytest.mark.slow
def test_lesion_probe_tells_a_model_that_keeps_lesions_from_one_that_blurs_them(tiny_records, pretrained, tiny_data):
    from lesion_fastai.bench.lesions import lesion_reconstruction, lesion_reconstruction_of
    recs = [r for r in tiny_records if r.split == 'val']
    clean = partial(corrupt, mask_ratio=0., patch=4, noise_std=0.)
    keep = lesion_reconstruction(torch.nn.Identity(), recs, SliceSpec('soft', 0, 64), clean)['clean']
    assert keep['l1_slice'] == keep['l1_lesion'] == keep['l1_ring'] == 0 and keep['contrast_kept_median'] == pytest.approx(1)
    assert keep['lesions_with_contrast'] > 0
    blur = lesion_reconstruction(torch.nn.AvgPool2d(9, 1, 4, count_include_pad=False), recs, SliceSpec('soft', 0, 64), clean)['clean']
    assert blur['contrast_kept_median'] < .9 and blur['l1_lesion'] > 0
    r = lesion_reconstruction_of(pretrained / 'pretrained.pth', tiny_data)
    assert set(r) == {'clean', 'corrupted'} and all(np.isfinite(v['l1_lesion']) and v['lesions'] > 0 for v in r.values())


def test_update_frozen_bn_flag_lets_statistics_adapt(tiny_records):
    model = Detector(dict(ENC), sandwich=True)
    learn = _learner(tiny_records, model, 'sandwich', update_bn=True)
    mean0 = model.encoder.stem[0][1].running_mean.clone()
    w0 = model.encoder.stem[0][1].weight.clone()
    learn.fit(1, 1e-2)
    assert not torch.equal(model.encoder.stem[0][1].running_mean, mean0)
    assert torch.equal(model.encoder.stem[0][1].weight, w0)


def test_train_frozen_bn_trains_the_frozen_batchnorm_and_nothing_else_frozen(tiny_records, tiny_data, control, tmp_path):
    "fastai's train_bn: the frozen encoder's BatchNorm weights and statistics change, its convolutions do not."
    torch.manual_seed(0)
    model = Detector(dict(ENC), sandwich=True)
    learn = _learner(tiny_records, model, 'sandwich', train_bn=True)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    learn.fit(1, 1e-2)
    bn = model.encoder.stem[0][1]
    assert not torch.equal(bn.weight, before['stem.0.1.weight']) and not torch.equal(bn.running_mean, before['stem.0.1.running_mean'])
    convs = [n for n, m in model.encoder.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(torch.equal(model.encoder.state_dict()[f'{n}.weight'], before[f'{n}.weight']) for n in convs)
    finetune(FinetuneConfig(data=tiny_data, out=tmp_path / 'run', pretrained=control, freeze='encoder', train_frozen_bn=True, epochs=1, bs=2))
    saved = load_detector(tmp_path / 'run' / 'model.safetensors')[0]
    bn_params = sum(p.numel() for m in saved.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    fresh = sum(p.numel() for n, p in saved.named_parameters() if not n.startswith('encoder.'))
    assert json.loads((tmp_path / 'run' / 'metrics.json').read_text())['parameters']['trainable'] == fresh + bn_params


@pytest.mark.slow
def test_mismatched_checkpoint_errors_name_the_mismatch(tiny_data, pretrained, tmp_path):
    with pytest.raises(ValueError, match='--windows soft,lung disagrees with the checkpoint'):
        finetune(FinetuneConfig(data=tiny_data, out=tmp_path, pretrained=pretrained / 'pretrained.pth', windows='soft,lung'))
    ckpt = load_pretrained(pretrained / 'pretrained.pth')
    from lesion_fastai.checkpoint import load_encoder
    with pytest.raises(ValueError, match=r'in_chans: checkpoint 1 vs model 3'):
        load_encoder(Detector(dict(ckpt['model_args']['encoder_args'], in_chans=3)).encoder, ckpt)
    bad = dict(ckpt, encoder={k: v[..., :1] if v.ndim == 4 else v for k, v in ckpt['encoder'].items()})
    with pytest.raises(ValueError, match=r'shapes .*stem'):
        load_encoder(Detector(dict(ckpt['model_args']['encoder_args'])).encoder, bad)
    torch.save({'weights': 1}, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match='not a lesion_fastai pretrained checkpoint'): load_pretrained(tmp_path / 'other.pth')


def test_cli_errors_are_clear(tmp_path, tiny_data, capsys):
    def run(main, *a):
        "A command run in this process: (exit code or the error line it exits with, what argparse printed to stderr)."
        with pytest.raises(SystemExit) as e: main([str(v) for v in a])
        printed = capsys.readouterr()
        run.out = printed.out
        return e.value.code, printed.err
    code, _ = run(finetune_cli.main, '--data', tmp_path / 'missing', '--out', tmp_path / 'o')
    assert code == f"error: --data {tmp_path / 'missing'}: no such folder"
    code, err = run(finetune_cli.main, '--data', tiny_data, '--head', 'cubic')
    assert code == 2 and "invalid choice: 'cubic'" in err
    code, err = run(finetune_cli.main, '--data', tiny_data, '--label-fraction', '0')
    assert code == 2 and '--label-fraction must be in (0, 1], got 0' in err
    code, err = run(finetune_cli.main, '--data', tiny_data, '--loss', 'iou', '--out', tmp_path / 'o')
    assert code == 2 and 'unknown term' in err                 # a value the flag does not allow: argparse's usage error
    code, _ = run(finetune_cli.main, '--data', tiny_data, '--freeze', 'sandwich', '--out', tmp_path / 'o')
    assert '--freeze sandwich needs --pretrained' in code      # settings that cannot go together: the run's error
    code, _ = run(finetune_cli.main, '--data', tiny_data, '--sandwich', 'decoder', '--out', tmp_path / 'o')
    assert '--sandwich decoder' in code and 'needs --freeze sandwich' in code
    for main in (finetune_cli.main, pretrain_cli.main):
        code, _ = run(main, '--help')
        assert code == 0 and '--resume' in run.out and '--seed' in run.out
    assert not (tmp_path / 'o').exists()
    # the real process: exit status 1, one line on stderr, no torch.jit deprecation warning from importing fastai
    r = subprocess.run([sys.executable, '-m', 'finetune', '--data', str(tmp_path / 'missing')], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == f"error: --data {tmp_path / 'missing'}: no such folder"


@pytest.mark.slow
def test_autoencoder_inpaints_masked_regions_from_context(pretrained, tiny_data):
    """Masked patches are zeros in the input: a model that copies its input would return ~0 there, and
    filling them with the slice's mean is the other fill that needs no context. The trained autoencoder
    fills them closer to the clean slice than either, by a margin; an untrained one misses both by far."""
    from lesion_fastai.pretraining import corrupt
    from lesion_fastai.data import CTSlice, SliceSpec
    from lesion_fastai.deeplesion import list_slices
    from lesion_fastai.models.autoencoder import Autoencoder
    ckpt = load_pretrained(pretrained / 'pretrained.pth')
    ae = Autoencoder(ckpt['model_args']['encoder_args'], ckpt['model_args']['code_channels'], ckpt['model_args']['decoder_widths'])
    ae.encoder.load_state_dict(ckpt['encoder']); ae.decoder.load_state_dict(ckpt['decoder'])
    x = torch.stack([CTSlice(SliceSpec('soft', 0, 32))(p) for p in list_slices(tiny_data)[:8]]).as_subclass(torch.Tensor)
    xc, mask = corrupt(x, .5, 4, .05, torch.Generator().manual_seed(0))
    with torch.no_grad(): y = ae.eval()(xc)
    m = mask.expand_as(x).bool()
    mean_fill = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    err_out, err_copy, err_mean = (y - x).abs()[m].mean(), (xc - x).abs()[m].mean(), (mean_fill - x).abs()[m].mean()
    assert err_out < .8 * err_copy and err_out < .8 * err_mean


class _Record(__import__('fastai.callback.core', fromlist=['Callback']).Callback):
    "After every training batch: the largest learning rate of each parameter group; after every epoch: the encoder's weights."
    order = 99
    def before_fit(self): self.__dict__.setdefault('lrs', []); self.__dict__.setdefault('encoders', [])
    def after_batch(self):
        if self.training: self.lrs.append([h['lr'] for h in self.opt.hypers])
    def after_epoch(self): self.encoders.append({k: v.clone() for k, v in self.learn.model.encoder.state_dict().items()})


@pytest.mark.slow
@pytest.mark.parametrize('div', [None, 2.])     # the default: the unfrozen epochs at lr, the rate scratch trains at; fastai's lr/2
def test_unfreeze_after_trains_frozen_then_every_layer_at_discriminative_rates_in_one_history(tiny_data, pretrained, tmp_path, div):
    "fastai's fine_tune recipe: K frozen epochs, then the pretrained layers at lr/D/lr_mult and the rest at lr/D (D 1 unless asked)."
    rec = _Record()
    cfg = dict(data=tiny_data, epochs=3, bs=2, pretrained=pretrained / 'pretrained.pth', freeze='sandwich', unfreeze_after=1, lr=1e-2, lr_mult=20,
               **({'unfrozen_lr_div': div} if div else {}))
    m = finetune(FinetuneConfig(out=tmp_path / 'run', **cfg), cbs=[rec])
    rate = 1e-2 / (div or 1)
    ckpt = load_pretrained(pretrained / 'pretrained.pth')
    first, *later = rec.encoders
    assert all(torch.equal(first[k], v) for k, v in ckpt['encoder'].items())          # epoch 0: frozen, running statistics too
    assert any(not torch.equal(later[-1][k], v) for k, v in ckpt['encoder'].items() if k.endswith('weight'))   # then it trains
    steps = len(rec.lrs) // 3
    frozen, unfrozen = np.array(rec.lrs[:steps]), np.array(rec.lrs[steps:])
    assert .8e-2 < frozen.max() <= 1e-2 * 1.001 and frozen[0, 1] < frozen[-1, 1]       # the first cycle rises to lr at its end...
    assert unfrozen[:, 1].max() == pytest.approx(rate, rel=.05) and unfrozen[:, 0].max() == pytest.approx(rate / 20, rel=.05)
    assert [int(r.split(',')[0]) for r in (tmp_path / 'run' / 'history.csv').read_text().splitlines()[1:]] == [0, 1, 2]
    assert m['parameters']['frozen'] > 0 and m['config']['unfreeze_after'] == 1
    with pytest.raises(ValueError, match='--unfreeze-after unfreezes what'):
        finetune(FinetuneConfig(data=tiny_data, out=tmp_path / 'x', epochs=3, unfreeze_after=1))
    with pytest.raises(ValueError, match='leaves no epoch'): finetune(FinetuneConfig(out=tmp_path / 'y', **{**cfg, 'unfreeze_after': 3}))
    with pytest.raises(ValueError, match='--unfrozen-lr-div 3 is the rate once --unfreeze-after K unfreezes'):
        finetune(FinetuneConfig(out=tmp_path / 'z', **{**cfg, 'unfreeze_after': 0, 'unfrozen_lr_div': 3.}))


@pytest.mark.slow
@pytest.mark.parametrize('killed_after', [0, 1])            # in the frozen fit, and in the unfrozen one
def test_a_fine_tune_schedule_killed_in_either_fit_resumes_to_the_uninterrupted_run(tiny_data, pretrained, tmp_path, monkeypatch, killed_after):
    from lesion_fastai.callbacks import ResumeState
    cfg = dict(data=tiny_data, epochs=4, bs=2, seed=1, pretrained=pretrained / 'pretrained.pth', freeze='sandwich', unfreeze_after=2,
               head='gaussian')
    ref = finetune(FinetuneConfig(out=tmp_path / 'ref', **cfg))
    real = ResumeState.after_epoch

    def killed(self):
        real(self)
        if self.offset + self.epoch == killed_after + (1 if killed_after else 0): raise KeyboardInterrupt
    monkeypatch.setattr(ResumeState, 'after_epoch', killed)
    run = tmp_path / 'run'
    with pytest.raises(KeyboardInterrupt): finetune(FinetuneConfig(out=run, **cfg))
    monkeypatch.undo()
    m = finetune(FinetuneConfig(out=run, resume=True, **cfg))
    assert _history(run) == _history(tmp_path / 'ref') and len(_history(run)) == 5
    a, b = (torch.load(p / 'last.pth', weights_only=False)['model'] for p in (tmp_path / 'ref', run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert m['test'] == ref['test'] and m['valid'] == ref['valid']


@pytest.mark.slow
def test_the_safe_model_loads_without_unpickling_and_predicts_and_evaluates_as_the_export(tiny_data, tmp_path, monkeypatch):
    import pickle
    from lesion_fastai.predict import predict
    finetune(FinetuneConfig(data=tiny_data, out=tmp_path / 'run', epochs=1, bs=2, size=32, head='gaussian', context=1))
    run = tmp_path / 'run'
    settings = json.loads((run / 'model.json').read_text())
    assert settings['spec'] == {'windows': 'soft', 'context': 1, 'size': 32} and settings['detector']['head'] == 'gaussian'
    assert settings['decoding']['operating_score'] == json.loads((run / 'metrics.json').read_text())['valid']['operating_point']['score']

    def no_unpickling(*a, **k): raise AssertionError('unpickled')
    folder = sorted((tiny_data / 'Images_png').iterdir())[0]
    with monkeypatch.context() as m:                          # the safe path reads tensors and JSON, nothing else: load, predict, --eval
        m.setattr(pickle, 'load', no_unpickling); m.setattr(pickle, 'loads', no_unpickling); m.setattr(torch, 'load', no_unpickling)
        model, spec, _ = load_detector(run / 'model.safetensors')
        predict(run / 'model.safetensors', [folder], tmp_path / 'p_safe')
        finetune_cli.main(['--eval', str(run / 'model.json'), '--data', str(tiny_data), '--out', str(tmp_path / 'e_safe')])
    ref = load_learner(run / 'export.pkl').model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    predict(run / 'export.pkl', [folder], tmp_path / 'p_pkl')
    assert (tmp_path / 'p_safe' / 'predictions.csv').read_text() == (tmp_path / 'p_pkl' / 'predictions.csv').read_text()
    finetune_cli.main(['--eval', str(run / 'export.pkl'), '--data', str(tiny_data), '--out', str(tmp_path / 'e_pkl')])
    a, b = (json.loads((tmp_path / d / 'eval_metrics.json').read_text()) for d in ('e_safe', 'e_pkl'))
    assert a['test']['froc'] == b['test']['froc'] and a['mean_box_source'] == b['mean_box_source'] == 'stored with the model'


def test_pretrain_with_no_epochs_writes_the_untrained_control_checkpoint(tiny_data, tmp_path):
    "`--epochs 0`: the untrained autoencoder's checkpoint, the same path a pretrained start takes with nothing learned."
    import torch
    out = tmp_path / 'control'
    pretrain_cli.main(['--data', str(tiny_data), '--out', str(out), '--epochs', '0', '--bs', '4', '--size', '32', '--context', '0'])
    m = json.loads((out / 'pretrain_metrics.json').read_text())
    assert m['valid_loss'] == pytest.approx(m['valid_loss_untrained'], rel=1e-5) and m['config']['epochs'] == 0 and not (out / 'history.csv').exists()
    ckpt = load_pretrained(out / 'pretrained.pth')
    again = tmp_path / 'again'                     # the same seed, the same untrained weights: a control is reproducible
    pretrain_cli.main(['--data', str(tiny_data), '--out', str(again), '--epochs', '0', '--bs', '4', '--size', '32', '--context', '0'])
    other = load_pretrained(again / 'pretrained.pth')
    assert all(torch.equal(v, other['encoder'][k]) for k, v in ckpt['encoder'].items())
    with pytest.raises(SystemExit): pretrain_cli.main(['--data', str(tiny_data), '--out', str(tmp_path / 'x'), '--epochs', '-1'])


@pytest.fixture(scope='module')
def control(tiny_data, tmp_path_factory):
    "The untrained autoencoder's checkpoint (`pretrain --epochs 0`), the control of a pretrained start."
    out = tmp_path_factory.mktemp('control')
    pretrain_cli.main(['--data', str(tiny_data), '--out', str(out), '--epochs', '0', '--bs', '4', '--size', '32', '--context', '0'])
    return out / 'pretrained.pth'


def test_full_fine_tuning_trains_the_pretrained_layers_at_the_rate_scratch_trains_them(tiny_data, control, tmp_path):
    """`--freeze full` takes scratch's path: every layer at one rate. A fixed lr/10 for the encoder (the old
    default) cost the untrained control half of scratch's FROC; --lr-mult M asks for lr/M."""
    cfg = dict(data=tiny_data, epochs=1, bs=2, pretrained=control, freeze='full', lr=1e-2)
    one, split = _Record(), _Record()
    finetune(FinetuneConfig(out=tmp_path / 'one', **cfg), cbs=[one])
    lrs = np.array(one.lrs)
    assert lrs.shape[1] == 2 and np.allclose(lrs[:, 0], lrs[:, 1]) and 1e-3 < lrs.max() <= 1e-2 * 1.001
    finetune(FinetuneConfig(out=tmp_path / 'split', lr_mult=10, **cfg), cbs=[split])
    lrs = np.array(split.lrs)
    assert np.allclose(lrs[:, 0] * 10, lrs[:, 1])


def _encoder_checkpoint(seed=1):
    "An encoder of ENC with weights that are not a fresh model's, as a checkpoint dict `load_encoder` reads."
    torch.manual_seed(seed)
    src = Detector(dict(ENC)).encoder
    with torch.no_grad():
        for v in src.state_dict().values():
            if v.is_floating_point(): v.add_(torch.randn_like(v) * .3 + .1)
    return {'model_args': {'encoder_args': src.encoder_args}, 'encoder': src.state_dict()}


def test_transfer_stages_loads_the_stem_and_first_stages_and_leaves_the_later_ones_fresh():
    from lesion_fastai.checkpoint import load_encoder
    ckpt = _encoder_checkpoint()
    enc = Detector(dict(ENC)).encoder
    fresh = {k: v.clone() for k, v in enc.state_dict().items()}
    load_encoder(enc, ckpt, stages=1)
    for k, v in enc.state_dict().items():
        loaded = k.startswith(('stem', 'stages.0.'))
        assert torch.equal(v, ckpt['encoder'][k] if loaded else fresh[k]), k
    assert any(k.startswith('stages.3.') for k in fresh)
    with pytest.raises(ValueError, match='--transfer-stages 5: the encoder has 4 stages'):
        load_encoder(Detector(dict(ENC)).encoder, ckpt, stages=5)


def test_scale_init_draws_each_tensor_afresh_with_the_pretrained_mean_and_std():
    from lesion_fastai.checkpoint import load_encoder
    ckpt = _encoder_checkpoint()
    enc, again = Detector(dict(ENC)).encoder, Detector(dict(ENC)).encoder
    fresh_buffers = {k: v.clone() for k, v in enc.named_buffers()}
    load_encoder(enc, ckpt, init='scale', seed=4); load_encoder(again, ckpt, init='scale', seed=4)
    for k, v in enc.named_parameters():
        w = ckpt['encoder'][k]
        assert not torch.equal(v, w) and torch.equal(v, dict(again.named_parameters())[k]), k
        if w.numel() >= 500:                                    # within 5 standard errors of the pretrained mean and std
            se = w.std().item() / w.numel() ** .5
            assert abs(v.mean().item() - w.mean().item()) < 5 * se and abs(v.std().item() / w.std().item() - 1) < 5 / (2 * w.numel()) ** .5, k
    assert all(torch.equal(v, fresh_buffers[k]) for k, v in enc.named_buffers())    # BatchNorm statistics are learned too: fresh


class _Start(__import__('fastai.callback.core', fromlist=['Callback']).Callback):
    "The encoder's weights as the fit begins."
    def before_fit(self): self.encoder = {k: v.clone() for k, v in self.learn.model.encoder.state_dict().items()}


def test_finetune_reads_transfer_stages_and_pretrained_init_and_refuses_them_without_a_full_pretrained_start(tiny_data, control, tmp_path):
    cfg = dict(data=tiny_data, epochs=1, bs=2, freeze='full')
    start = _Start()
    finetune(FinetuneConfig(out=tmp_path / 'k0', pretrained=control, transfer_stages=0, **cfg), cbs=[start])
    sd = load_pretrained(control)['encoder']
    assert all(torch.equal(start.encoder[k], sd[k]) for k in sd if k.startswith('stem'))
    assert not all(torch.equal(start.encoder[k], sd[k]) for k in sd if k.startswith('stages.0.') and k.endswith('weight'))
    finetune(FinetuneConfig(out=tmp_path / 'scale', pretrained=control, pretrained_init='scale', **cfg), cbs=[start])
    assert not torch.equal(start.encoder['stem.0.0.weight'], sd['stem.0.0.weight'])
    with pytest.raises(ValueError, match='--transfer-stages .* needs --pretrained CHECKPOINT and --freeze full$'):
        finetune(FinetuneConfig(out=tmp_path / 'a', transfer_stages=1, **dict(cfg, freeze='scratch')))
    with pytest.raises(ValueError, match='not sandwich'):
        finetune(FinetuneConfig(out=tmp_path / 'b', **dict(cfg, freeze='sandwich'), pretrained=control, transfer_stages=1))
    with pytest.raises(ValueError, match='--pretrained-init scale .* needs --pretrained'):
        finetune(FinetuneConfig(out=tmp_path / 'c', pretrained_init='scale', **dict(cfg, freeze='scratch')))


class _End(__import__('fastai.callback.core', fromlist=['Callback']).Callback):
    "Every weight and statistic of the model as the fit ends."
    def after_fit(self): self.state = {k: v.clone() for k, v in self.learn.model.state_dict().items()}


def test_the_control_with_scratchs_draw_is_scratch_itself_through_the_full_path(tiny_data, control, tmp_path):
    """`--pretrained-init scratch` keeps the draw a scratch run makes with the same seed, so `--freeze full`
    from it trains exactly the model scratch trains: the path adds nothing (rate, BatchNorm, weight decay),
    and a frozen mode's control differs from scratch in its path alone. From the checkpoint's own draw
    (`weights`, the control before) the run is another model."""
    cfg = dict(data=tiny_data, epochs=1, bs=2, context=0, size=32)
    scratch, same, other = _End(), _End(), _End()
    finetune(FinetuneConfig(out=tmp_path / 'scratch', freeze='scratch', **cfg), cbs=[scratch])
    finetune(FinetuneConfig(out=tmp_path / 'same', freeze='full', pretrained=control, pretrained_init='scratch', **cfg), cbs=[same])
    finetune(FinetuneConfig(out=tmp_path / 'other', freeze='full', pretrained=control, **cfg), cbs=[other])
    assert scratch.state.keys() == same.state.keys()
    assert all(torch.equal(v, same.state[k]) for k, v in scratch.state.items())
    assert not torch.equal(scratch.state['encoder.stem.0.0.weight'], other.state['encoder.stem.0.0.weight'])
    with pytest.raises(ValueError, match="--pretrained-init scratch takes --pretrained's architecture: it needs --pretrained"):
        finetune(FinetuneConfig(out=tmp_path / 'c', pretrained_init='scratch', freeze='scratch', **cfg))


@pytest.mark.slow
def test_bench_probe_tables_each_stage_of_an_autoencoder_checkpoint_and_of_a_detector(tiny_data, control, tmp_path):
    from lesion_fastai.bench.__main__ import main as bench
    finetune(FinetuneConfig(data=tiny_data, out=tmp_path / 'run', epochs=1, bs=2, pretrained=control, freeze='full'))
    table = bench(['probe', '--models', str(control), str(tmp_path / 'run'), '--data', str(tiny_data), '--train-slices', '8',
                   '--out', str(tmp_path / 'probe.md')])
    rows = [r.split(' | ') for r in table.splitlines()[2:]]
    assert (tmp_path / 'probe.md').read_text().strip() == table and len(rows) == 10
    assert [r[1] for r in rows[:5]] == ['stem', 'stage 1', 'stage 2', 'stage 3', 'stage 4']
    aucs = [float(r[2].split()[0]) for r in rows]          # nan where a 32 px slice's coarsest cell holds every lesion: no negatives
    assert all(0 <= a <= 1 for a in aucs[:3] + aucs[5:8]) and all(np.isnan(a) or 0 <= a <= 1 for a in aucs)
    assert all(r[5] == '0.000' and r[6] == '1.000 |' for r in rows[:5])          # the untrained control: BatchNorm never saw a slice
    assert any(r[5] != '0.000' for r in rows[5:])                                # the detector's statistics are the data's
