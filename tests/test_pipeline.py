"""End-to-end contracts on tiny data: CLIs, export -> load_learner, resume, pretrain -> finetune, freezing."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from fastai.learner import Learner, load_learner

from lesion_fastai.checkpoint import load_pretrained
from lesion_fastai.data import localization_dls
from lesion_fastai.freeze import apply_freeze, freeze_callbacks, localizer_splitter
from lesion_fastai.losses import BoxLoss
from lesion_fastai.models.localizer import Localizer
from lesion_fastai.train import FinetuneConfig, finetune

import finetune.__main__ as finetune_cli
import pretrain.__main__ as pretrain_cli

ENC = dict(stem_width=8, widths=(8, 16, 16, 16), depths=(1, 1, 1, 1))
METRIC_KEYS = {'n', 'hit@0.5', 'mean_iou', 'centre_error_mm', 'centre_error_mm_mean', 'by_type', 'mean_box_baseline'}


@pytest.fixture(scope='module')
def pretrained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('pretrain')
    pretrain_cli.main(['--data', str(tiny_data), '--out', str(out), '--epochs', '8', '--bs', '4', '--size', '32', '--lr', '1e-2'])
    return out


def test_pretrain_writes_checkpoint_figure_and_beats_untrained(pretrained):
    ckpt = load_pretrained(pretrained / 'pretrained.pth')
    assert ckpt['config']['size'] == 32 and ckpt['config']['windows'] == 'soft' and ckpt['model_args']['encoder_args']['in_chans'] == 1
    assert (pretrained / 'reconstructions.png').stat().st_size > 0 and (pretrained / 'history.csv').exists()
    m = json.loads((pretrained / 'pretrain_metrics.json').read_text())
    assert m['valid_loss'] < .7 * m['valid_loss_untrained']


def test_finetune_cli_scratch_writes_metrics_results_and_export(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # a relative --out, as users type it
    out = tmp_path / 'run'
    finetune_cli.main(['--data', str(tiny_data), '--out', 'run', '--epochs', '1', '--bs', '2', '--size', '32'])
    m = json.loads((out / 'metrics.json').read_text())
    assert set(m) >= {'valid', 'test', 'mean_box', 'parameters', 'config', 'train_slices', 'time_s'}
    assert set(m['test']) >= METRIC_KEYS and m['config']['freeze'] == 'scratch' and m['config']['size'] == 32
    assert (out / 'results.png').stat().st_size > 0 and (out / 'models' / 'best.pth').exists()
    assert len((out / 'history.csv').read_text().strip().splitlines()) == 2


@pytest.mark.parametrize('target', ['points', 'bbox'])
def test_export_load_learner_predict_round_trip(tiny_data, tiny_records, tmp_path, target):
    out = tmp_path / target
    finetune(FinetuneConfig(data=tiny_data, out=out, epochs=1, bs=2, size=32, target=target, head='gaussian', quiet=True))
    learn = load_learner(out / 'export.pkl')
    rec = next(r for r in tiny_records if r.split == 'test')
    dec, raw, _ = learn.predict(rec.image_path)            # a new slice, by path
    assert raw.shape == (4,) and (raw[:2] <= raw[2:]).all()
    pts = torch.as_tensor(dec).reshape(-1, 2)
    assert pts.shape == (2, 2) and (pts >= 0).all() and (pts <= 32).all()   # pixels of the 32 px input
    import matplotlib.pyplot as plt
    learn2 = Learner(localization_dls(tiny_records, size=32, bs=2, target=target, seed=0), learn.model, loss_func=BoxLoss())
    learn2.show_results(max_n=2)
    ax = plt.gcf().axes[0]
    assert [p.get_edgecolor()[:3] for p in ax.patches] == [(0., 1., 0.), (1., 1., 0.)]   # truth green, prediction yellow
    plt.close('all')


def test_eval_cli_on_saved_model(tiny_data, tmp_path):
    finetune(FinetuneConfig(data=tiny_data, out=tmp_path, epochs=1, bs=2, size=32, quiet=True))
    finetune_cli.main(['--eval', str(tmp_path / 'export.pkl'), '--data', str(tiny_data)])
    m = json.loads((tmp_path / 'eval_metrics.json').read_text())
    assert set(m['test']) >= METRIC_KEYS
    assert m['test']['mean_iou'] == pytest.approx(json.loads((tmp_path / 'metrics.json').read_text())['test']['mean_iou'])


def test_resume_continues_where_it_stopped(tiny_data, tmp_path):
    cfg = dict(data=tiny_data, bs=2, size=32, seed=1, augment=False, quiet=True, cache='none')
    finetune(FinetuneConfig(out=tmp_path / 'a', epochs=3, **cfg))
    finetune(FinetuneConfig(out=tmp_path / 'b', epochs=2, **cfg))          # "interrupted" after 2 of 3 epochs
    state = torch.load(tmp_path / 'b' / 'last.pth', weights_only=False)
    assert state['epoch'] == 1
    m = finetune(FinetuneConfig(out=tmp_path / 'b', epochs=3, resume=True, **cfg))
    assert len((tmp_path / 'b' / 'history.csv').read_text().strip().splitlines()) == 4   # header + 3 epochs
    assert torch.load(tmp_path / 'b' / 'last.pth', weights_only=False)['epoch'] == 2
    assert np.isfinite(m['test']['mean_iou'])


def test_pretrain_then_finetune_loads_exactly_the_encoder(tiny_data, pretrained, tmp_path):
    ckpt = load_pretrained(pretrained / 'pretrained.pth')
    m = finetune(FinetuneConfig(data=tiny_data, out=tmp_path, epochs=1, bs=2, pretrained=pretrained / 'pretrained.pth',
                                freeze='encoder', quiet=True))
    assert m['config']['size'] == 32 and m['config']['freeze'] == 'encoder'      # settings from the checkpoint
    model = load_learner(tmp_path / 'export.pkl').model
    for k, v in ckpt['encoder'].items(): assert torch.equal(model.encoder.state_dict()[k], v), k


def _learner(tiny_records, model, mode, update_bn=False):
    dls = localization_dls(tiny_records, size=32, bs=2, seed=0, augment=False)
    learn = Learner(dls, model, loss_func=BoxLoss(), splitter=localizer_splitter, train_bn=False, cbs=freeze_callbacks(mode, update_bn))
    apply_freeze(learn, mode)
    return learn


@pytest.mark.parametrize('mode', ['sandwich', 'encoder', 'none', 'scratch'])
def test_every_freeze_mode_trains_one_batch(tiny_records, mode):
    model = Localizer(dict(ENC), sandwich=mode == 'sandwich')
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
    model = Localizer(dict(ENC), sandwich=True)
    learn = _learner(tiny_records, model, 'sandwich')
    enc0 = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    ad0 = {k: v.clone() for k, v in model.adapters.state_dict().items()}
    learn.fit(2, 1e-2)
    for k, v in model.encoder.state_dict().items(): assert torch.equal(v, enc0[k]), k   # weights and running stats
    assert any(not torch.equal(v, ad0[k]) for k, v in model.adapters.state_dict().items() if 'conv2' in k)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(('adapters.', 'head.')) for n in trainable)


def test_update_frozen_bn_flag_lets_statistics_adapt(tiny_records):
    model = Localizer(dict(ENC), sandwich=True)
    learn = _learner(tiny_records, model, 'sandwich', update_bn=True)
    mean0 = model.encoder.stem[0][1].running_mean.clone()
    w0 = model.encoder.stem[0][1].weight.clone()
    learn.fit(1, 1e-2)
    assert not torch.equal(model.encoder.stem[0][1].running_mean, mean0)
    assert torch.equal(model.encoder.stem[0][1].weight, w0)


def test_mismatched_checkpoint_errors_name_the_mismatch(tiny_data, pretrained, tmp_path):
    with pytest.raises(ValueError, match='--windows soft,lung disagrees with the checkpoint'):
        finetune(FinetuneConfig(data=tiny_data, out=tmp_path, pretrained=pretrained / 'pretrained.pth', windows='soft,lung'))
    ckpt = load_pretrained(pretrained / 'pretrained.pth')
    from lesion_fastai.checkpoint import load_encoder
    with pytest.raises(ValueError, match=r'in_chans: checkpoint 1 vs model 3'):
        load_encoder(Localizer(dict(ckpt['model_args']['encoder_args'], in_chans=3)).encoder, ckpt)
    bad = dict(ckpt, encoder={k: v[..., :1] if v.ndim == 4 else v for k, v in ckpt['encoder'].items()})
    with pytest.raises(ValueError, match=r'shapes .*stem'):
        load_encoder(Localizer(dict(ckpt['model_args']['encoder_args'])).encoder, bad)
    torch.save({'weights': 1}, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match='not a lesion_fastai pretrained checkpoint'): load_pretrained(tmp_path / 'other.pth')


def test_cli_errors_are_clear(tmp_path, tiny_data):
    run = lambda *a: subprocess.run([sys.executable, '-m', 'finetune', *a], capture_output=True, text=True)
    r = run('--data', str(tmp_path / 'missing'), '--out', str(tmp_path / 'o'))
    assert r.returncode != 0 and 'no such folder' in r.stderr
    r = run('--data', str(tiny_data), '--head', 'cubic')
    assert r.returncode == 2 and "invalid choice: 'cubic'" in r.stderr
    r = run('--data', str(tiny_data), '--label-fraction', '0')
    assert r.returncode == 2 and '--label-fraction must be in (0, 1]' in r.stderr
    r = run('--data', str(tiny_data), '--freeze', 'sandwich', '--out', str(tmp_path / 'o'))
    assert r.returncode == 1 and '--freeze sandwich needs --pretrained' in r.stderr
    r = run('--data', str(tiny_data), '--loss', 'iou', '--out', str(tmp_path / 'o'))
    assert r.returncode == 1 and 'unknown term' in r.stderr
    for mod in ('finetune', 'pretrain'):
        h = subprocess.run([sys.executable, '-m', mod, '--help'], capture_output=True, text=True)
        assert h.returncode == 0 and '--resume' in h.stdout and '--seed' in h.stdout


def test_autoencoder_inpaints_masked_regions_from_context(pretrained, tiny_data):
    """Masked patches are zeros in the input: a model that copies its input would return ~0 there.
    The trained autoencoder fills them with something far closer to the clean slice."""
    from lesion_fastai.callbacks import corrupt
    from lesion_fastai.data import CTSlice
    from lesion_fastai.deeplesion import list_slices
    from lesion_fastai.models.autoencoder import Autoencoder
    ckpt = load_pretrained(pretrained / 'pretrained.pth')
    ae = Autoencoder(ckpt['model_args']['encoder_args'], ckpt['model_args']['code_channels'], ckpt['model_args']['decoder_widths'])
    ae.encoder.load_state_dict(ckpt['encoder']); ae.decoder.load_state_dict(ckpt['decoder'])
    x = torch.stack([CTSlice('soft', 0, 32)(p) for p in list_slices(tiny_data)[:8]]).as_subclass(torch.Tensor)
    xc, mask = corrupt(x, .5, 4, .05, torch.Generator().manual_seed(0))
    with torch.no_grad(): y = ae.eval()(xc)
    m = mask.expand_as(x).bool()
    err_out, err_copy = (y - x).abs()[m].mean(), (xc - x).abs()[m].mean()
    assert err_out < .6 * err_copy
