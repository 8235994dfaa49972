"""Localizer heads, transfer layers, autoencoder, losses and metrics on tiny inputs."""
import dataclasses

import numpy as np
import pytest
import torch
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from lesion_fastai.boxes import MIN_SIZE
from lesion_fastai.deeplesion import SliceRecord
from lesion_fastai.losses import BoxLoss
from lesion_fastai.metrics import evaluate, mean_box, mean_iou
from lesion_fastai.models.autoencoder import create_autoencoder
from lesion_fastai.models.localizer import Localizer, create_localizer

TINY = dict(stem_width=8, widths=(8, 16, 16, 16), depths=(1, 1, 1, 1))


def _valid(boxes):
    return bool(((boxes[:, 0] <= boxes[:, 2]) & (boxes[:, 1] <= boxes[:, 3]) & (boxes >= -1).all(1) & (boxes <= 1).all(1)).all())


@pytest.mark.parametrize('head', ['direct', 'gaussian'])
@pytest.mark.parametrize('sandwich', [False, True])
@pytest.mark.parametrize('in_chans', [1, 3])
def test_localizer_output_valid_and_every_parameter_gets_a_gradient(head, sandwich, in_chans):
    torch.manual_seed(0)
    m = create_localizer(in_chans, head, sandwich, **TINY)
    x = torch.rand(2, in_chans, 32, 32)
    out = m(x)
    assert out.shape == (2, 4) and torch.isfinite(out).all() and _valid(out)
    BoxLoss('giou+l1')(out, torch.tensor([[-.5, -.5, .2, .3], [0., .1, .5, .6]])).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize('head', ['direct', 'gaussian'])
@pytest.mark.parametrize('bias', [-30., 30.])
def test_boxes_valid_for_extreme_outputs(head, bias):
    m = create_localizer(1, head, **TINY)
    with torch.no_grad(): m.head.box[-1].bias.fill_(bias); m.head.box[-1].weight.mul_(100)  # saturated sigmoids
    for mode in ('train', 'eval'):
        out = getattr(m, mode)()(torch.rand(2, 1, 32, 32))
        assert torch.isfinite(out).all() and _valid(out)
        assert ((out[:, 2:] - out[:, :2]) / 2 >= MIN_SIZE / 2 - 1e-7).all()     # positive size, also at the border


@pytest.mark.parametrize('head', ['direct', 'gaussian'])
@pytest.mark.parametrize('term', ['ciou', 'diou', 'giou', 'l1', 'mse'])
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_smallest_boxes_give_finite_loss_and_gradients(head, term, mode):
    """Every box output driven to its smallest size and its centre pushed off the image (so clipping to
    the image would leave nothing), the Gaussian head's std huge: every loss term, the centre-map
    loss and the likelihood stay finite, and so do all gradients."""
    from types import SimpleNamespace
    from lesion_fastai.callbacks import CentreMapLoss
    torch.manual_seed(0)
    m = create_localizer(1, head, **TINY)
    with torch.no_grad():
        m.head.box[-1].weight.zero_(); m.head.box[-1].bias.copy_(torch.tensor([-40., -40., -40., -40.]))
        if head == 'gaussian': m.head.spread[-1].weight.zero_(); m.head.spread[-1].bias.fill_(60.)   # std = 3 in log size
    getattr(m, mode)()
    x = torch.rand(2, 1, 64, 64)
    y = torch.tensor([[[-1., -1.], [-.96, -.96]], [[.2, .3], [.25, .31]]])      # a lesion in the corner cell, a tiny one
    loss_func = BoxLoss(term)
    out = m(x)
    base = loss_func(out, y)
    learn = SimpleNamespace(model=m, yb=(y,), loss_func=loss_func, loss_grad=base, loss=base.detach())
    cb = CentreMapLoss(1., 1, nll_weight=1.)
    cb.learn = learn
    cb.after_loss()
    assert torch.isfinite(learn.loss_grad), learn.loss_grad
    learn.loss_grad.backward()
    for name, p in m.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_eval_box_is_the_best_scoring_positions_box():
    torch.manual_seed(0)
    m = create_localizer(1, 'direct', **TINY).eval()
    out = m(torch.rand(2, 1, 64, 64))
    best = m.head.last_scores.flatten(1).argmax(1)
    assert torch.allclose(out, m.head.last_boxes[torch.arange(2), best] * 2 - 1)


def test_gaussian_head_samples_in_training_and_is_deterministic_in_eval():
    torch.manual_seed(0)
    m = create_localizer(1, 'gaussian', kappa=.05, **TINY)
    x = torch.rand(2, 1, 32, 32)
    m.eval()
    a, b = m(x), m(x)
    assert torch.equal(a, b)
    # the std of the returned box is kappa * softplus(spread output) at the best-scoring position
    p, scores = m.head.map(m.features(x))
    expected = (.05 * torch.nn.functional.softplus(m.head.spread(p))).flatten(2).transpose(1, 2)[torch.arange(2), scores.argmax(1)]
    assert m.head.last_std.shape == (2, 4) and torch.allclose(m.head.last_std, expected)
    m.head.kappa = .1
    m(x)
    assert torch.allclose(m.head.last_std, 2 * expected)
    m.head.kappa = .05
    m.train()
    for mod in m.modules():  # keep BatchNorm out of the comparison
        if isinstance(mod, torch.nn.BatchNorm2d): mod.eval()
    assert not torch.equal(m(x), m(x))


def test_output_batchnorm_is_optional_and_off_by_default():
    assert not isinstance(create_localizer(1, **TINY).head.box[-1], torch.nn.BatchNorm2d)
    assert isinstance(create_localizer(1, out_bn=True, **TINY).head.box[-1], torch.nn.BatchNorm2d)


@pytest.mark.parametrize('adapters', [{}, {'adapter_ratio': 1.}, {'adapter_stem': True}])
def test_untrained_sandwich_computes_the_encoder_features(adapters):
    torch.manual_seed(0)
    plain, sandwich = create_localizer(1, sandwich=False, **TINY), create_localizer(1, sandwich=True, **TINY, **adapters)
    sandwich.encoder.load_state_dict(plain.encoder.state_dict(), strict=True)
    x = torch.rand(2, 1, 64, 64)
    for mode in ('eval', 'train'):
        getattr(plain, mode)(); getattr(sandwich, mode)()
        assert torch.allclose(sandwich.features(x)[-1], plain.encoder(x), atol=1e-6)


def test_transfer_layer_options_change_what_trains():
    enc = dict(stem_width=16, widths=(32, 32, 64, 64), depths=(1, 1, 1, 1))
    n = lambda m: sum(p.numel() for p in m.parameters())
    full, narrow = create_localizer(1, sandwich=True, **enc), create_localizer(1, sandwich=True, adapter_ratio=.25, **enc)
    assert n(narrow.adapters) < .4 * n(full.adapters)
    assert full.stem_adapter is None
    stem = create_localizer(1, sandwich=True, adapter_ratio=1., adapter_stem=True, **enc)
    assert stem.stem_adapter.conv2.out_channels == 16 and n(stem) == n(full) + n(stem.stem_adapter)
    with torch.no_grad(): stem.stem_adapter.conv2.weight.fill_(.01)   # once trained, it changes the features
    x = torch.rand(2, 1, 64, 64)
    full.encoder.load_state_dict(stem.encoder.state_dict())
    full.eval(); stem.eval()
    assert not torch.allclose(stem.features(x)[0], full.features(x)[0])


@pytest.mark.parametrize('size', [32, 64])
def test_autoencoder_shapes_and_encoder_moves_strictly(size):
    ae = create_autoencoder(3, **TINY)
    x = torch.rand(2, 3, size, size)
    y = ae(x)
    assert y.shape == x.shape and (y >= 0).all() and (y <= 1).all()
    loc = Localizer(ae.encoder_args)
    loc.encoder.load_state_dict(ae.encoder.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(loc.encoder.state_dict().values(), ae.encoder.state_dict().values()))


def test_gaussian_std_grows_to_the_error_when_the_mean_is_persistently_off():
    """Only the std branch trains, against a target the fixed mean misses: with the likelihood term (and
    the sampled box's loss, as in training) the std at the target grows from its start to the size of
    the error, per coordinate, so one std means something."""
    from types import SimpleNamespace
    from lesion_fastai.boxes import box_params
    from lesion_fastai.callbacks import CentreMapLoss
    torch.manual_seed(0)
    m = create_localizer(1, 'gaussian', **TINY)
    for name, p in m.named_parameters(): p.requires_grad_(name.startswith('head.spread'))
    m.train()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d): mod.eval()      # fixed features: only the std can move
    x = torch.rand(4, 1, 64, 64)
    y = torch.tensor([[[-.9, -.8], [-.5, -.2]]] * 4)                 # centre (.15, .25) in cell (row 2, col 1) of the 8x8 map
    cell = 2 * 8 + 1
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-2)
    cb = CentreMapLoss(1., 0, nll_weight=1.)
    for step in range(150):
        out = m(x)
        if step == 0: sd0 = m.head.last_sd[:, cell].detach().clone()
        base = BoxLoss('giou+l1')(out, y)
        cb.learn = SimpleNamespace(model=m, yb=(y,), loss_func=BoxLoss('giou+l1'), loss_grad=base, loss=base.detach())
        cb.after_loss()
        opt.zero_grad(); cb.learn.loss_grad.backward(); opt.step()
    m(x)
    err = (box_params((y.reshape(4, 4) + 1) / 2) - m.head.last_params[:, cell]).abs().mean(0)
    sd = m.head.last_sd[:, cell].detach().mean(0)
    far = err > 4 * sd0.mean(0)                                       # the sizes: missed by far more than the start std
    assert far[2:].all() and (sd[far] > 4 * sd0.mean(0)[far]).all()   # there the std has grown
    assert ((sd / err > .6) & (sd / err < 1.6)).all(), (sd, err)      # to the size of the error, in every coordinate


def test_nll_is_lowest_when_the_std_covers_the_error():
    from lesion_fastai.losses import gaussian_nll
    mean, target = torch.zeros(8, 4), torch.full((8, 4), .2)
    nll = lambda sd: float(gaussian_nll(mean, torch.full((8, 4), sd), target))
    assert nll(.2) < nll(.02) and nll(.2) < nll(.1) and nll(.2) < nll(.4) and nll(.2) < nll(2.)
    assert nll(.2) == pytest.approx(np.log(.2) + .5 + .5 * np.log(2 * np.pi))
    mean.requires_grad_(True)
    sd = torch.full((8, 4), .1, requires_grad=True)
    gaussian_nll(mean, sd, target).backward()
    assert mean.grad is None and (sd.grad < 0).all()                  # it sets the std only (up, here); the box loss moves the mean


# --- losses -------------------------------------------------------------------------------------------------

P = torch.tensor([[-.5, -.5, .2, .3], [0., .1, .5, .6], [-.9, -.9, -.8, -.7]])
T = torch.tensor([[-.4, -.6, .1, .4], [.2, .0, .6, .5], [.5, .5, .9, .9]])


@pytest.mark.parametrize('spec,fn', [('ciou', complete_box_iou_loss), ('diou', distance_box_iou_loss), ('giou', generalized_box_iou_loss)])
def test_iou_losses_equal_torchvision(spec, fn):
    expect = fn((P + 1) / 2, (T + 1) / 2, reduction='mean')
    assert torch.allclose(BoxLoss(spec)(P, T), expect)
    assert torch.allclose(BoxLoss(spec)(P, T.view(3, 2, 2)), expect)       # PointBlock target layout
    assert torch.allclose(BoxLoss(spec)(P, T.view(3, 1, 4)), expect)       # BBoxBlock target layout


def test_loss_sum_of_terms_and_l1_mse():
    p, t = (P + 1) / 2, (T + 1) / 2
    total = complete_box_iou_loss(p, t, reduction='mean') + distance_box_iou_loss(p, t, reduction='mean') + \
        generalized_box_iou_loss(p, t, reduction='mean')
    assert torch.allclose(BoxLoss('ciou+diou+giou')(P, T), total)
    assert torch.allclose(BoxLoss('l1+mse')(P, T), (p - t).abs().mean() + ((p - t) ** 2).mean())
    assert float(BoxLoss('giou')(T, T)) == pytest.approx(0, abs=1e-5)
    with pytest.raises(ValueError, match="unknown term"): BoxLoss('iou+l3')


# --- metrics ------------------------------------------------------------------------------------------------

def _record(boxes, types=(-1,), spacing=(.5, .5), size=100, noisy=()):
    return SliceRecord(image_path='x.png', split='test', patient=1, width=size, height=size, spacing_mm=spacing,
                       dicom_window=(-175, 275), boxes=np.array(boxes, np.float32), lesion_types=tuple(types), noisy=tuple(noisy))


def test_mean_iou_metric_hand_computed():
    pred = torch.tensor([[-1., -1., 0., 0.], [-1., -1., 0., 0.]])    # unit boxes (0,0,.5,.5)
    targ = torch.tensor([[-1., -1., 0., 0.], [-.5, -1., .5, 0.]])    # same; shifted by half: IoU 1/3
    assert float(mean_iou(pred, targ)) == pytest.approx((1 + 1 / 3) / 2)


def test_evaluate_matches_any_lesion_on_the_slice():
    two = _record([[10, 10, 30, 30], [60, 60, 80, 80]], types=(4, 6))
    one = _record([[20, 20, 40, 40]], types=(4,), spacing=(1., 2.))
    pred = np.array([[.6, .6, .8, .8],        # exactly the second lesion of the two-lesion slice
                     [.25, .2, .45, .4]])     # shifted 5 px in x from the lesion: IoU 15*20/(2*400-300) = 0.6
    m = evaluate(pred, [two, one])
    assert m['n'] == 2 and m['hit@0.5'] == 1.
    assert m['mean_iou'] == pytest.approx((1 + .6) / 2)
    assert m['centre_error_mm_mean'] == pytest.approx((0 + 5 * 1.) / 2)
    assert m['by_type']['6_kidney']['mean_iou'] == pytest.approx(1) and m['by_type']['4_liver']['hit@0.5'] == 1


def test_a_box_overlapping_no_lesion_is_scored_against_the_nearest_one():
    two = _record([[10, 10, 20, 20], [70, 70, 80, 80]], types=(4, 6), spacing=(1., 1.))
    m = evaluate(np.array([[.55, .55, .65, .65]]), [two])            # centre (60, 60): nearest is the kidney lesion at (75, 75)
    assert m['mean_iou'] == 0 and m['centre_error_mm'] == pytest.approx(np.hypot(15, 15))
    assert list(m['by_type']) == ['6_kidney']


def test_calibration_counts_target_coordinates_within_one_and_two_std():
    rec = _record([[40, 40, 60, 60]])                                  # unit centre (.5, .5), sides .2
    pred = np.array([[.42, .42, .62, .62]])                            # centre off by .02, sides exact
    cal = lambda sd: evaluate(pred, [rec], pred_std=np.array([sd]))['calibration']
    c = cal([.03, .015, .1, .1])                                       # cx within 1 std, cy within 2, sizes exact
    assert c['within_1std'] == pytest.approx(3 / 4) and c['within_2std'] == 1.
    assert c['per_coordinate']['cy']['within_1std'] == 0 and c['per_coordinate']['cy']['median_abs_error'] == pytest.approx(.02)
    assert cal([.005, .005, .1, .1])['within_2std'] == pytest.approx(2 / 4)
    assert c['found']['n'] == 1 and c['found']['within_1std'] == c['within_1std']      # IoU 0.68: the box found its lesion
    far = evaluate(np.array([[.0, .0, .1, .1]]), [rec], pred_std=np.array([[.03, .03, .1, .1]]))['calibration']
    assert far['found'] == {'n': 0} and far['within_1std'] == 0


def test_noisy_lesions_and_then_empty_slices_are_dropped_for_evaluation():
    from lesion_fastai.deeplesion import evaluation_records
    mixed = _record([[10, 10, 30, 30], [60, 60, 80, 80]], types=(4, 6), noisy=(True, False))
    only_noisy = _record([[10, 10, 30, 30]], noisy=(True,))
    clean = _record([[20, 20, 40, 40]])
    val = dataclasses.replace(clean, split='val')
    kept = evaluation_records([mixed, only_noisy, clean, val], 'test')
    assert len(kept) == 2 and kept[1] is clean
    assert kept[0].boxes.tolist() == [[60, 60, 80, 80]] and kept[0].lesion_types == (6,) and kept[0].noisy == (False,)
    assert np.array_equal(kept[0].target, [60, 60, 80, 80])
    assert [r.split for r in evaluation_records([mixed, val], 'val')] == ['val']


def test_evaluate_reports_mean_box_baseline():
    recs = [_record([[10, 10, 30, 30]]), _record([[50, 50, 70, 70]])]
    base = mean_box(recs)
    assert np.allclose(base, [.3, .3, .5, .5])
    m = evaluate(np.array([[.1, .1, .3, .3], [.5, .5, .7, .7]]), recs, base)
    assert m['hit@0.5'] == 1 and m['mean_box_baseline']['hit@0.5'] == 0 and m['mean_box_baseline']['n'] == 2
    with pytest.raises(ValueError, match='3 predictions for 2 slices'): evaluate(np.zeros((3, 4)), recs)


@pytest.mark.parametrize('radius', [0, 1])
def test_centre_map_loss_adds_ce_box_loss_and_neighbour_sizes(radius):
    from types import SimpleNamespace
    from lesion_fastai.callbacks import CentreMapLoss
    torch.manual_seed(0)
    m = create_localizer(1, 'direct', **TINY)
    # PointBlock layout; the second centre sits in the last column, so its neighbourhood is cut there
    x, y = torch.rand(2, 1, 64, 64), torch.tensor([[[-.9, -.9], [-.6, -.6]], [[.8, .1], [1., .3]]])
    pred = m(x)
    box_loss = BoxLoss('giou')
    base = box_loss(pred, y)
    learn = SimpleNamespace(model=m, yb=(y,), loss_func=box_loss, loss_grad=base, loss=base.detach())
    cb = CentreMapLoss(1., radius=radius)
    cb.learn = learn
    cb.after_loss()
    # centre cells on the 8x8 map: (-.75 -> unit .125 -> col 1, row 1) and (x .9 -> .95 -> col 7, y .2 -> .6 -> row 4)
    centres = [(1, 1), (4, 7)]
    cells = torch.tensor([r * 8 + c for r, c in centres])
    ce = torch.nn.functional.cross_entropy(m.head.last_scores.flatten(1), cells)
    expected = base + ce + box_loss(m.head.last_boxes[torch.arange(2), cells] * 2 - 1, y)
    if radius:
        sized, targs = [], []
        for i, (row, col) in enumerate(centres):
            t = (y[i].flatten() + 1) / 2
            for dr, dc in [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]:
                if not (0 <= row + dr < 8 and 0 <= col + dc < 8): continue    # the second centre has 5 neighbours
                b = m.head.last_boxes[i, (row + dr) * 8 + col + dc]
                cx, cy, bw, bh = (t[0] + t[2]) / 2, (t[1] + t[3]) / 2, b[2] - b[0], b[3] - b[1]
                sized.append(torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]))
                targs.append(t)
        assert len(sized) == 13
        expected = expected + box_loss(torch.stack(sized) * 2 - 1, torch.stack(targs) * 2 - 1)
    assert torch.allclose(learn.loss_grad, expected)
    learn.loss_grad.backward()
    assert m.head.map.score.weight.grad.abs().sum() > 0


def test_autoencoder_code_is_a_real_bottleneck():
    ae = create_autoencoder(1)
    assert ae.code_size(128) == 64 * 4 * 4 + 8 * 8 * 8 + 4 * 16 * 16 < 128 * 128 / 4
    assert ae.code_size(256) < 256 * 256 / 4
