"""bench probe: the AUC, the linear probe, the cells it reads and the stage statistics, on tiny inputs."""
import numpy as np
import pytest
import torch

from lesion_fastai.bench.probe import auc, probe_auc, probe_cells, stage_statistics
from lesion_fastai.data import SliceSpec
from lesion_fastai.models.resnet import ResNetEncoder

ENC = dict(stem_width=8, widths=(8, 16, 16, 16), depths=(1, 1, 1, 1))


def test_auc_is_the_chance_a_positive_outscores_a_negative():
    assert auc([.1, .4, .35, .8], [0, 0, 1, 1]) == pytest.approx(.75)
    assert auc([1, 1], [0, 1]) == .5 and auc([2, 1], [1, 0]) == 1. and np.isnan(auc([1, 2], [1, 1]))


def test_the_probe_finds_a_feature_that_carries_the_label_and_not_one_that_does_not():
    rng = np.random.default_rng(0)
    y = lambda n: (rng.random(n) < .2).astype(int)          # a fifth positive, as lesion cells among negatives
    yt, yv = y(400), y(400)
    noise = lambda n: rng.normal(size=(n, 8))
    informative = lambda y: np.concatenate([noise(len(y)), y[:, None] + .3 * rng.normal(size=(len(y), 1))], 1)
    assert probe_auc((informative(yt), yt), (informative(yv), yv)) > .95
    assert abs(probe_auc((noise(400), yt), (noise(400), yv)) - .5) < .1


def test_probe_cells_take_the_lesion_centre_cell_and_cells_away_from_lesions_at_every_stage(tiny_records):
    enc = ResNetEncoder(**ENC).eval()
    recs = [r for r in tiny_records if r.split == 'val']
    cells = probe_cells(enc, recs, SliceSpec('soft', 0, 64), negatives=3)
    assert [x.shape[1] for x, _ in cells] == [8, 8, 16, 16, 16] and all(len(x) == len(y) for x, y in cells)
    lesions = sum(len(r.boxes) for r in recs)
    pos = [int(y.sum()) for _, y in cells]
    neg = [int((1 - y).sum()) for _, y in cells]          # a coarse stage's cell may hold a lesion centre: fewer negatives
    assert 0 < pos[-1] <= pos[0] <= lesions and 0 < neg[-1] <= neg[0] <= 3 * len(recs)


def test_stage_statistics_read_the_weights_and_the_batchnorm_state():
    enc = ResNetEncoder(**ENC)
    fresh = stage_statistics(enc)
    assert [s['stage'] for s in fresh] == ['stem', 'stage 1', 'stage 2', 'stage 3', 'stage 4']
    assert all(s['bn_mean_abs'] == 0 and s['bn_var'] == 1 for s in fresh) and fresh[0]['bn_gamma'] == 1
    assert all(0 < s['bn_gamma'] < 1 for s in fresh[1:])   # each block's last BatchNorm starts at zero: the block starts as the identity
    with torch.no_grad():
        enc.stages[1][0].convs[0][0].weight.mul_(3)
    enc.train(); enc(torch.randn(2, 1, 32, 32) * 5 + 2)
    after = stage_statistics(enc)
    assert after[2]['conv_rms'] > fresh[2]['conv_rms'] and after[1]['conv_rms'] == fresh[1]['conv_rms']
    assert all(a['bn_mean_abs'] > 0 and a['bn_var'] != 1 for a in after)
