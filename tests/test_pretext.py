"""The pretexts: context (only the key slice is masked, its neighbours stay whole, only the key slice is
scored), mae (a high ratio of small patches, scored on the masked pixels only) and genesis (Models
Genesis's transformations, every pixel scored), and the decoder sandwich fine-tuned from them."""
import json

import pytest
import torch
from torch import nn

from lesion_fastai.pretraining import ChannelLoss, MaskedCorruption, MaskedLoss, corrupt, corruption_of, key_channels
from lesion_fastai.checkpoint import load_pretrained
from lesion_fastai.data import n_channels
from lesion_fastai.deeplesion import read_dl_info
from lesion_fastai.config import FinetuneConfig, PretrainConfig
from lesion_fastai.genesis import genesis
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


def _genesis(x, seed=0, **rates):
    "Only the named transformations, each always applied."
    rates = {'nonlinear': 0, 'local': 0, 'paint': 0, 'outpaint': 0, **rates}
    return genesis(x, torch.Generator().manual_seed(seed), **rates)


def test_genesis_keeps_shape_and_range_scores_every_pixel_and_repeats_per_seed():
    x = torch.rand(4, 3, 32, 32)
    xc, mask = genesis(x, torch.Generator().manual_seed(0))
    assert xc.shape == x.shape and 0 <= float(xc.min()) and float(xc.max()) <= 1
    assert mask.shape == (4, 1, 32, 32) and bool((mask == 1).all())
    assert torch.equal(xc, genesis(x, torch.Generator().manual_seed(0))[0])
    assert not torch.equal(xc, genesis(x, torch.Generator().manual_seed(1))[0])


def test_genesis_intensity_curve_maps_each_image_by_one_curve():
    x = torch.rand(8, 2, 16, 16)
    xc, _ = _genesis(x, nonlinear=1)
    kinds = []
    for i in range(len(x)):
        v, order = x[i].reshape(-1).sort()
        y = xc[i].reshape(-1)[order]
        assert float((y - v).abs().max()) > .01                              # not the identity
        if bool((y.diff() >= -1e-6).all()): kinds.append('increasing')
        else:                                                                  # x values sorted only: black and white swap
            assert float(y[:8].mean()) > float(y[-8:].mean()); kinds.append('inverted')
    assert set(kinds) == {'increasing', 'inverted'}


def test_genesis_local_shuffling_moves_pixels_only_within_small_tiles():
    H = W = 40                                                              # tiles of 2 to 4 pixels a side
    code = (torch.arange(H * W, dtype=torch.float32) / (H * W)).reshape(H, W)
    x = code.expand(4, 2, H, W).clone()
    xc, _ = _genesis(x, local=1)
    assert torch.equal(xc[:, 0], xc[:, 1])
    for i in range(len(x)):
        assert torch.equal(xc[i, 0].reshape(-1).sort().values, code.reshape(-1))     # the same pixels
        origin = (xc[i, 0] * H * W).round().long()
        dy, dx = origin // W - torch.arange(H)[:, None], origin % W - torch.arange(W)
        assert (dy.abs() < 4).all() and (dx.abs() < 4).all()
        assert float((origin != torch.arange(H * W).reshape(H, W)).float().mean()) > .2
    assert not torch.equal(xc[0], xc[1])                                    # each image its own tiles


@pytest.mark.parametrize('outpaint', [1, 0])
def test_genesis_painting_keeps_part_of_the_slice_and_fills_the_rest_with_noise(outpaint):
    x = torch.full((4, 2, 32, 32), .5)
    xc, _ = _genesis(x, paint=1, outpaint=outpaint)
    kept = (xc == x).float().mean((1, 2, 3))
    assert torch.equal(xc[:, 0], xc[:, 1])
    if outpaint: assert (kept > (3 / 7) ** 2 * .9).all() and (kept < 1).all()   # at least one box of 3/7 of a side copied back
    else: assert (kept > .5).all() and (kept < 1).any()                       # boxes of at most 1/3 of a side filled


def test_genesis_transforms_every_channel_of_an_image_alike():
    x = torch.rand(8, 1, 32, 32).expand(8, 3, 32, 32)
    xc, _ = genesis(x, torch.Generator().manual_seed(0), nonlinear=1, local=1, paint=1, outpaint=.5)
    assert not torch.equal(xc, x)
    assert torch.equal(xc[:, 0], xc[:, 1]) and torch.equal(xc[:, 0], xc[:, 2])


def test_corruption_of_is_the_pretexts_corruption_with_the_same_draws(tmp_path):
    x = torch.rand(2, 6, 32, 32)
    mae = PretrainConfig(data=tmp_path, out=tmp_path, pretext='mae', mask_ratio=.75, patch=4, noise_std=0.)
    got = corruption_of(mae, [0, 3])(x, generator=torch.Generator().manual_seed(0))
    want = corrupt(x, .75, 4, 0., torch.Generator().manual_seed(0), channels=[0, 3])
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert corruption_of(PretrainConfig(data=tmp_path, out=tmp_path, pretext='genesis')) is genesis


def test_genesis_rates_reach_the_pretexts_corruption(tmp_path, capsys):
    "--genesis-* set the pretext's rates, each its own: the corruption is genesis's at those rates; none of them on, the slice as it was."
    x, g = torch.rand(4, 3, 32, 32), lambda: torch.Generator().manual_seed(0)
    rates = dict(local=.3, nonlinear=.6, paint=1., outpaint=.2)
    cfg = PretrainConfig(data=tmp_path, out=tmp_path, pretext='genesis', **{f'genesis_{k}': v for k, v in rates.items()})
    assert torch.equal(corruption_of(cfg)(x, generator=g())[0], genesis(x, g(), **rates)[0])
    assert not torch.equal(genesis(x, g(), **rates)[0], genesis(x, g(), **{**rates, 'outpaint': .8})[0])   # each rate tells
    off = PretrainConfig(data=tmp_path, out=tmp_path, pretext='genesis', genesis_local=0, genesis_nonlinear=0, genesis_paint=0)
    assert torch.equal(corruption_of(off)(x, generator=g())[0], x)
    with pytest.raises(SystemExit):
        pretrain_cli.main(['--data', str(tmp_path), '--out', str(tmp_path), '--pretext', 'genesis', '--genesis-paint', '1.5'])
    assert '--genesis-paint must be in [0, 1], got 1.5' in capsys.readouterr().err


def test_genesis_pretext_pretrains_and_records_its_pretext(tiny_data, tmp_path):
    out = tmp_path / 'pretrain'
    pretrain_cli.main(['--data', str(tiny_data), '--out', str(out), '--pretext', 'genesis', '--epochs', '1', '--bs', '4',
                       '--size', '32', '--context', '0', '--genesis-paint', '0.5'])
    c = load_pretrained(out / 'pretrained.pth')['config']
    assert c['pretext'] == 'genesis' and (c['mask_ratio'], c['patch'], c['noise_std']) == (None, None, None)
    assert [c[f'genesis_{k}'] for k in ('local', 'nonlinear', 'paint', 'outpaint')] == [.5, .9, .5, .8]     # the rates it used
    from lesion_fastai.bench.lesions import lesion_reconstruction_of
    assert lesion_reconstruction_of(out / 'pretrained.pth', tiny_data)['corrupted']['lesions'] > 0          # the probe reads its pretext
    m = json.loads((out / 'pretrain_metrics.json').read_text())
    assert 0 < m['valid_loss_copy_input'] < 1 and (out / 'reconstructions.png').stat().st_size > 0


def test_a_pretraining_recorded_before_the_genesis_rates_counts_as_the_official_ones():
    "A genesis record without the rates was made at Models Genesis's; a masked one with none: neither is named as changed."
    from lesion_fastai.config import settings_diff
    official = {f'genesis_{k}': v for k, v in [('local', .5), ('nonlinear', .9), ('paint', .9), ('outpaint', .8)]}
    assert settings_diff({'pretext': 'genesis'}, {'pretext': 'genesis', **official}, cls=PretrainConfig) == {}
    assert settings_diff({'pretext': 'masked'}, {'pretext': 'masked', 'genesis_paint': None}, cls=PretrainConfig) == {}
    assert settings_diff({'pretext': 'genesis'}, {'pretext': 'genesis', 'genesis_paint': 0.}, cls=PretrainConfig) == {'genesis_paint': (.9, 0.)}


def test_resolve_fills_each_pretexts_defaults_and_keeps_what_is_given(tiny_data, tiny_records, tmp_path):
    "What a pretraining records for a setting left unset is its pretext's default, the one `bench select` reads as the default value."
    from lesion_fastai.config import pretext_defaults
    from lesion_fastai.pretraining import resolve
    cfg = lambda **kw: resolve(PretrainConfig(data=tiny_data, out=tmp_path, **kw), tiny_records)
    mae, masked = cfg(pretext='mae'), cfg(pretext='masked', noise_std=.2)
    assert (mae.mask_ratio, mae.noise_std, mae.patch) == (.75, 0., max(2, round(mae.size / 32)))
    assert (masked.mask_ratio, masked.noise_std, masked.patch) == (.5, .2, max(2, round(masked.size / 16)))
    rates = cfg(pretext='genesis', genesis_paint=.3)
    assert (rates.genesis_local, rates.genesis_paint, rates.mask_ratio, rates.patch) == (.5, .3, None, None)
    assert pretext_defaults('genesis')['genesis_outpaint'] == rates.genesis_outpaint == .8 and pretext_defaults('mae')['mask_ratio'] == .75
    given = cfg(pretext='masked', mask_ratio=.3, patch=5, genesis_paint=.3)      # what is given stays, a rate of another pretext unused
    assert (given.mask_ratio, given.patch, given.noise_std, given.genesis_paint, given.genesis_local) == (.3, 5, .05, .3, None)
