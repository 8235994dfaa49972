"""The pretexts: context (only the key slice is masked, its neighbours stay whole, only the key slice is
scored) and mae (a high ratio of small patches, scored on the masked pixels only), and the decoder
sandwich fine-tuned from them."""
import json

import pytest
import torch
from torch import nn

from lesion_fastai.pretraining import ChannelLoss, MaskedCorruption, MaskedLoss, corrupt, key_channels
from lesion_fastai.checkpoint import load_pretrained
from lesion_fastai.data import n_channels
from lesion_fastai.deeplesion import read_dl_info
from lesion_fastai.config import FinetuneConfig
from lesion_fastai.finetuning import finetune

import pretrain.__main__ as pretrain_cli


def test_key_channels_follow_the_window_major_order():
    assert key_channels(n_channels('soft', 1), 1) == [0]
    assert key_channels(n_channels('soft,lung', 2), 2) == [0, 5]      # soft: k, k-1, k+1, k-2, k+2; then lung
    assert key_channels(n_channels('soft,lung', 0), 0) == [0, 1]


def test_corrupt_masks_only_the_given_channels():
    x = torch.rand(2, 6, 32, 32) * .8 + .1
    xc, m = corrupt(x, .5, 4, 0., torch.Generator().manual_seed(0), channels=[0, 3])
    masked = m[:, 0] > 0
    assert masked.any() and (~masked).any()
    for c in (0, 3):
        assert (xc[:, c][masked] == 0).all() and torch.equal(xc[:, c][~masked], x[:, c][~masked])
    for c in (1, 2, 4, 5): assert torch.equal(xc[:, c], x[:, c])          # the neighbours stay whole
    xa, ma = corrupt(x, .5, 4, 0., torch.Generator().manual_seed(0))       # default: every channel masked
    assert torch.equal(ma, m) and (xa[:, 1][masked] == 0).all()


def test_channel_loss_scores_only_its_channels():
    y = torch.rand(2, 3, 8, 8)
    loss = ChannelLoss(nn.L1Loss(), [0])
    off_neighbour = y.clone(); off_neighbour[:, 1:] += 1
    off_key = y.clone(); off_key[:, 0] += .5
    assert float(loss(off_neighbour, y)) == 0
    assert float(loss(off_key, y)) == pytest.approx(.5)


def test_context_pretext_needs_neighbour_slices(tiny_data, tmp_path):
    out = tmp_path / 'run'
    with pytest.raises(SystemExit, match=r'--pretext context .* needs --context 1 or more'):
        pretrain_cli.main(['--data', str(tiny_data), '--out', str(out), '--pretext', 'context', '--context', '0', '--size', '32'])
    assert not out.exists()


@pytest.mark.slow
def test_context_pretext_trains_beats_its_baselines_and_finetunes(tiny_data, tmp_path):
    out = tmp_path / 'pretrain'
    pretrain_cli.main(['--data', str(tiny_data), '--out', str(out), '--pretext', 'context', '--context', '1', '--epochs', '20',
                       '--bs', '4', '--size', '32', '--lr', '1e-2', '--mask-ratio', '.75'])
    m = json.loads((out / 'pretrain_metrics.json').read_text())
    assert m['config']['pretext'] == 'context' and m['config']['in_chans'] == 3
    # one neighbour shipped on each side: only the key slices have both neighbours of their own
    df = read_dl_info(tiny_data / 'DL_info.csv')
    assert m['train_slices'] == df[df.split == 'train'].file_name.nunique()
    assert m['valid_loss'] < .7 * m['valid_loss_untrained']
    assert m['valid_loss'] < m['valid_loss_copy_input']                # it fills the masked key patches
    assert 'valid_loss_neighbour_mean' in m and m['valid_loss_neighbour_mean'] > 0
    assert (out / 'reconstructions.png').stat().st_size > 0
    ckpt = load_pretrained(out / 'pretrained.pth')
    assert ckpt['model_args']['encoder_args']['in_chans'] == 3
    r = finetune(FinetuneConfig(data=tiny_data, out=tmp_path / 'ft', epochs=1, bs=2, pretrained=out / 'pretrained.pth',
                                freeze='sandwich'))
    assert r['config']['context'] == 1 and (tmp_path / 'ft' / 'export.pkl').exists()


def test_masked_loss_scores_only_the_masked_pixels():
    y = torch.rand(2, 2, 8, 8)
    mask = torch.zeros(2, 1, 8, 8); mask[..., :4, :] = 1
    off_visible, off_masked = y.clone(), y.clone()
    off_visible[..., 4:, :] += 1
    off_masked[..., :4, :] += .5
    assert float(MaskedLoss()(off_visible, y, mask)) == 0
    assert float(MaskedLoss()(off_masked, y, mask)) == pytest.approx(.5)
    assert float(MaskedLoss('mse')(off_masked, y, mask)) == pytest.approx(.25)


def test_masked_corruption_puts_the_mask_in_the_targets_for_the_masked_loss():
    class Learn: pass
    cb = MaskedCorruption(.75, 4, 0., masked_loss=True)
    cb.learn = Learn()
    x = torch.rand(2, 1, 32, 32) * .8 + .1
    cb.learn.xb, cb.learn.yb = (x,), ()
    cb.before_batch()
    (xc,), (y, mask) = cb.learn.xb, cb.learn.yb
    assert torch.equal(y, x) and mask.shape == (2, 1, 32, 32)
    assert .6 < float(mask.mean()) < .9 and (xc[mask.expand_as(xc) > 0] == 0).all()


@pytest.mark.slow
def test_mae_pretext_then_decoder_sandwich_loads_encoder_and_decoder(tiny_data, tmp_path):
    out = tmp_path / 'pretrain'
    pretrain_cli.main(['--data', str(tiny_data), '--out', str(out), '--pretext', 'mae', '--epochs', '8', '--bs', '4', '--size', '32',
                       '--lr', '1e-2', '--code-channels', '16,8,4,4'])
    m = json.loads((out / 'pretrain_metrics.json').read_text())
    c = m['config']
    assert (c['pretext'], c['mask_ratio'], c['noise_std'], c['patch'], c['code_channels']) == ('mae', .75, 0., 2, [16, 8, 4, 4])
    assert m['valid_loss'] < .7 * m['valid_loss_untrained'] and m['valid_loss'] < m['valid_loss_copy_input']
    ckpt = load_pretrained(out / 'pretrained.pth')
    r = finetune(FinetuneConfig(data=tiny_data, out=tmp_path / 'ft', epochs=1, bs=2, pretrained=out / 'pretrained.pth',
                                freeze='sandwich', sandwich='decoder'))
    assert r['config']['sandwich'] == 'decoder' and r['parameters']['frozen'] > 0
    from fastai.learner import load_learner
    model = load_learner(tmp_path / 'ft' / 'export.pkl').model
    for part in ('encoder', 'decoder'):
        own = getattr(model, part).state_dict()
        for k, v in ckpt[part].items(): assert torch.equal(own[k], v), (part, k)
    assert model.decoder_adapters is not None and model.adapters is None


@pytest.mark.slow
def test_pretrain_dedup_drops_repeated_training_slices_only(tiny_data, tmp_path, capsys):
    import shutil
    from lesion_fastai.deeplesion import read_dl_info
    from lesion_fastai.config import PretrainConfig
    from lesion_fastai.pretraining import pretrain
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    df = read_dl_info(data / 'DL_info.csv')
    train_series = sorted({f.rsplit('_', 1)[0] for f in df.file_name[df.split == 'train']})
    pngs = sorted((data / 'Images_png' / train_series[0]).glob('*.png'))
    shutil.copyfile(pngs[0], pngs[1])                            # one training slice repeats its neighbour
    plain = pretrain(PretrainConfig(data=data, out=tmp_path / 'a', epochs=1, bs=2, size=32, context=0))
    dedup = pretrain(PretrainConfig(data=data, out=tmp_path / 'b', epochs=1, bs=2, size=32, dedup=1e-6, context=0))
    assert dedup['train_slices'] == plain['train_slices'] - 1 and dedup['config']['dedup'] == 1e-6
    assert '--dedup 1e-06: dropped 1 training slice(s)' in capsys.readouterr().out
