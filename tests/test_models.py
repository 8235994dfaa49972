"""Detector heads, transfer layers, autoencoder, losses and metrics on tiny inputs."""
import dataclasses

import numpy as np
import pytest
import torch
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from lesion_fastai.boxes import MIN_SIZE, params_to_boxes
from lesion_fastai.deeplesion import SliceRecord
from lesion_fastai.losses import BoxLoss, DetectionLoss
from lesion_fastai.metrics import evaluate_detections, mean_box, top1_metrics, Detections
from lesion_fastai.models.autoencoder import create_autoencoder
from lesion_fastai.heatmap import Decoding, detections
from lesion_fastai.models.detector import Detector, create_detector

TINY = dict(stem_width=8, widths=(8, 16, 16, 16), depths=(1, 1, 1, 1))


def _valid(boxes):  # [..., 4] in [0, 1]
    b = boxes.reshape(-1, 4)
    return bool(((b[:, 0] < b[:, 2]) & (b[:, 1] < b[:, 3]) & (b >= 0).all(1) & (b <= 1).all(1)).all())


def _targets(boxes_unit, slots=4):
    "PointBlock-layout targets ([B, 2M, 2] corners in [-1, 1]) and flags of lists of unit boxes."
    y = torch.zeros(len(boxes_unit), slots, 4)
    f = torch.zeros(len(boxes_unit), slots)
    for i, bs in enumerate(boxes_unit):
        for j, b in enumerate(bs): y[i, j], f[i, j] = torch.tensor(b, dtype=torch.float32), 1.
    return (y * 2 - 1).reshape(len(y), -1, 2), f


Y, F_ = _targets([[[.1, .1, .3, .25]], [[.5, .55, .6, .62], [.0, .0, .04, .04]]])


@pytest.mark.parametrize('head', ['direct', 'gaussian'])
@pytest.mark.parametrize('sandwich', [False, True])
@pytest.mark.parametrize('in_chans', [1, 3])
def test_detector_outputs_valid_maps_and_every_parameter_gets_a_gradient(head, sandwich, in_chans):
    torch.manual_seed(0)
    m = create_detector(in_chans, head, sandwich, **TINY)
    out = m(torch.rand(2, in_chans, 64, 64))
    heat, params = out[0], out[1]
    assert heat.shape == (2, 16, 16) and params.shape == (2, 256, 4) and len(out) == (4 if head == 'gaussian' else 2)
    assert _valid(params_to_boxes(params)) and torch.isfinite(heat).all()
    DetectionLoss('giou+l1')(out, Y, F_).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_stride_8_gives_a_coarser_map():
    assert create_detector(1, stride=8, **TINY)(torch.rand(1, 1, 64, 64))[0].shape == (1, 8, 8)
    with pytest.raises(ValueError, match='stride 2'): create_detector(1, stride=2, **TINY)


@pytest.mark.parametrize('head', ['direct', 'gaussian'])
@pytest.mark.parametrize('bias', [-30., 30.])
def test_boxes_valid_for_extreme_outputs(head, bias):
    m = create_detector(1, head, **TINY)
    with torch.no_grad(): m.head.box[-1].bias.fill_(bias); m.head.box[-1].weight.mul_(100)  # saturated sigmoids
    for mode in ('train', 'eval'):
        b = params_to_boxes(getattr(m, mode)()(torch.rand(2, 1, 32, 32))[1])
        assert torch.isfinite(b).all() and _valid(b)
        assert ((b[..., 2:] - b[..., :2]) >= MIN_SIZE / 2 - 1e-7).all()     # positive size, also at the border


@pytest.mark.parametrize('head', ['direct', 'gaussian'])
@pytest.mark.parametrize('term', ['ciou', 'diou', 'giou', 'l1', 'mse'])
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_smallest_boxes_give_finite_loss_and_gradients(head, term, mode):
    """Every box output driven to its smallest size, the Gaussian head's std huge, a lesion in the corner
    cell and a tiny one: every loss term, the heatmap loss, the neighbour sizes and the likelihood stay
    finite, and so do all gradients."""
    torch.manual_seed(0)
    m = create_detector(1, head, **TINY)
    with torch.no_grad():
        m.head.box[-1].weight.zero_(); m.head.box[-1].bias.fill_(-40.)
        if head == 'gaussian': m.head.spread[-1].weight.zero_(); m.head.spread[-1].bias.fill_(60.)   # std = 3 in log size
    getattr(m, mode)()
    y, f = _targets([[[0., 0., .02, .02]], [[.6, .65, .61, .655]]])
    loss = DetectionLoss(term, radius=1, nll_weight=1.)(m(torch.rand(2, 1, 64, 64)), y, f)
    assert torch.isfinite(loss), loss
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_detections_are_the_heatmap_peaks_and_their_boxes():
    torch.manual_seed(0)
    m = create_detector(1, 'direct', **TINY).eval()
    heat, params = m(torch.rand(2, 1, 64, 64))
    with torch.no_grad(): heat[:] = -10; heat[0, 3, 4], heat[0, 3, 5], heat[0, 10, 10] = 5., 4., 3.   # (3, 5) is no peak
    boxes, scores, sd = detections((heat, params), k=3)
    assert sd is None and boxes.shape == (2, 3, 4)
    assert torch.allclose(scores[0], torch.sigmoid(torch.tensor([5., 3., -10.])))
    assert torch.allclose(boxes[0, :2], params_to_boxes(params[0, [3 * 16 + 4, 10 * 16 + 10]]))
    _, kept, _ = detections((heat, params), k=3, min_score=.5)
    assert (kept[0] > 0).tolist() == [True, True, False]


def test_gaussian_head_samples_in_training_and_is_deterministic_in_eval():
    torch.manual_seed(0)
    m = create_detector(1, 'gaussian', kappa=.05, **TINY)
    x = torch.rand(2, 1, 32, 32)
    m.eval()
    a, b = m(x), m(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and torch.equal(a[1], a[2])       # params are the mean
    p = m.neck(m.features(x))
    expected = (.05 * torch.nn.functional.softplus(m.head.spread(p))).flatten(2).transpose(1, 2)
    assert torch.allclose(a[3], expected)                                                   # std = kappa * softplus
    m.head.kappa = .1
    assert torch.allclose(m(x)[3], 2 * expected)
    _, _, sd = detections(a, k=2)
    assert sd.shape == (2, 2, 4)
    m.head.kappa = .05
    m.train()
    for mod in m.modules():  # keep BatchNorm out of the comparison
        if isinstance(mod, torch.nn.BatchNorm2d): mod.eval()
    o1, o2 = m(x), m(x)
    assert not torch.equal(o1[1], o2[1]) and torch.equal(o1[2], o2[2])                    # samples around the same mean


def test_gaussian_std_grows_to_the_error_when_the_mean_is_persistently_off():
    """Only the std branch trains, against a lesion the fixed mean misses: with the likelihood term (and
    the sampled box's loss, as in training) the std at its centre cell grows from its start to the
    size of the error, per coordinate, so one std means something."""
    from lesion_fastai.boxes import box_params
    torch.manual_seed(0)
    m = create_detector(1, 'gaussian', **TINY)
    for name, p in m.named_parameters(): p.requires_grad_(name.startswith('head.spread'))
    m.train()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d): mod.eval()      # fixed features: only the std can move
    x = torch.rand(4, 1, 64, 64)
    box = [.05, .2, .25, .5]                                          # centre (.15, .35): cell (row 5, col 2) of the 16x16 map
    y, f = _targets([[box]] * 4)
    cell = 5 * 16 + 2
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-2)
    loss_func = DetectionLoss('giou+l1', radius=0, nll_weight=1.)
    for step in range(150):
        out = m(x)
        if step == 0: sd0 = out[3][:, cell].detach().clone()
        loss = loss_func(out, y, f)
        opt.zero_grad(); loss.backward(); opt.step()
    out = m(x)
    err = (box_params(torch.tensor([box])) - out[2][:, cell]).abs().mean(0).detach()
    sd = out[3][:, cell].detach().mean(0)
    far = err > 4 * sd0.mean(0)                                       # missed by far more than the start std
    assert far[2:].all() and (sd[far] > 4 * sd0.mean(0)[far]).all()   # there the std has grown
    assert ((sd / err > .6) & (sd / err < 1.6)).all(), (sd, err)      # to the size of the error, in every coordinate


def test_output_batchnorm_is_optional_and_off_by_default():
    assert not isinstance(create_detector(1, **TINY).head.box[-1], torch.nn.BatchNorm2d)
    assert isinstance(create_detector(1, out_bn=True, **TINY).head.box[-1], torch.nn.BatchNorm2d)


@pytest.mark.parametrize('adapters', [{}, {'adapter_ratio': 1.}, {'adapter_stem': True}])
def test_untrained_sandwich_computes_the_encoder_features(adapters):
    torch.manual_seed(0)
    plain, sandwich = create_detector(1, sandwich=False, **TINY), create_detector(1, sandwich=True, **TINY, **adapters)
    sandwich.encoder.load_state_dict(plain.encoder.state_dict(), strict=True)
    x = torch.rand(2, 1, 64, 64)
    for mode in ('eval', 'train'):
        getattr(plain, mode)(); getattr(sandwich, mode)()
        assert torch.allclose(sandwich.features(x)[-1], plain.encoder(x), atol=1e-6)


def test_transfer_layer_options_change_what_trains():
    enc = dict(stem_width=16, widths=(32, 32, 64, 64), depths=(1, 1, 1, 1))
    n = lambda m: sum(p.numel() for p in m.parameters())
    full, narrow = create_detector(1, sandwich=True, **enc), create_detector(1, sandwich=True, adapter_ratio=.25, **enc)
    assert n(narrow.adapters) < .4 * n(full.adapters)
    assert full.stem_adapter is None
    stem = create_detector(1, sandwich=True, adapter_ratio=1., adapter_stem=True, **enc)
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
    loc = Detector(ae.encoder_args)
    loc.encoder.load_state_dict(ae.encoder.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(loc.encoder.state_dict().values(), ae.encoder.state_dict().values()))


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

P = torch.tensor([[.25, .25, .6, .65], [.5, .55, .75, .8], [.05, .05, .1, .15]])
T = torch.tensor([[.3, .2, .55, .7], [.6, .5, .8, .75], [.75, .75, .95, .95]])


@pytest.mark.parametrize('spec,fn', [('ciou', complete_box_iou_loss), ('diou', distance_box_iou_loss), ('giou', generalized_box_iou_loss)])
def test_iou_losses_equal_torchvision(spec, fn):
    assert torch.allclose(BoxLoss(spec)(P, T), fn(P, T, reduction='mean'))


def test_loss_sum_of_terms_and_l1_mse():
    total = complete_box_iou_loss(P, T, reduction='mean') + distance_box_iou_loss(P, T, reduction='mean') + \
        generalized_box_iou_loss(P, T, reduction='mean')
    assert torch.allclose(BoxLoss('ciou+diou+giou')(P, T), total)
    assert torch.allclose(BoxLoss('l1+mse')(P, T), (P - T).abs().mean() + ((P - T) ** 2).mean())
    assert float(BoxLoss('giou')(T, T)) == pytest.approx(0, abs=1e-5)
    assert float(BoxLoss('ciou')(P[:0], T[:0])) == 0                 # no lesion in the batch: nothing, not NaN
    with pytest.raises(ValueError, match="unknown term"): BoxLoss('iou+l3')


def test_heatmap_target_peaks_at_every_lesion_centre():
    from lesion_fastai.heatmap import TTF_ALPHA, heatmap_target
    boxes = torch.tensor([[[.1, .1, .35, .3], [.6, .6, .7, .9], [0., 0., 1., 1.]]])
    heat = heatmap_target(boxes, torch.tensor([[True, True, False]]), 16, 16)         # the padding slot adds nothing
    assert heat[0, 3, 3] == 1 and heat[0, 12, 10] == 1 and (heat == 1).sum() == 2     # centre cells (row, col)
    sx = .25 * 16 * TTF_ALPHA / 6                                                     # the first box's std in cells, along x
    assert float(heat[0, 3, 5]) == pytest.approx(np.exp(-4 / (2 * sx ** 2)), rel=1e-5)
    assert heat[0, 8, 0] < 1e-3


def test_focal_loss_hand_computed():
    from lesion_fastai.heatmap import focal_loss
    target = torch.tensor([[[1., .5], [0., 0.]]])
    logits = torch.tensor([[[0., 0.], [0., 2.]]])
    p = torch.sigmoid(logits)[0]
    expect = -(np.log(.5) * .5 ** 2 + (1 - .5) ** 4 * .5 ** 2 * np.log(.5) + 0 + p[1, 0] ** 2 * torch.log(1 - p[1, 0])
               + p[1, 1] ** 2 * torch.log(1 - p[1, 1])) / 1                           # one centre
    assert float(focal_loss(logits, target)) == pytest.approx(float(expect), rel=1e-5)


@pytest.mark.parametrize('radius', [0, 1])
def test_detection_loss_adds_heatmap_box_and_neighbour_size_terms(radius):
    from lesion_fastai.boxes import box_params
    from lesion_fastai.heatmap import focal_loss, heatmap_target
    torch.manual_seed(0)
    m = create_detector(1, 'direct', **TINY)
    y, f = _targets([[[.1, .1, .3, .3]], [[.9, .4, 1., .5], [.4, .4, .5, .45]]])     # the second slice's first centre: last column
    out = m(torch.rand(2, 1, 64, 64))
    heat, params = out
    box = BoxLoss('giou')
    boxes = torch.tensor([[.1, .1, .3, .3], [.9, .4, 1., .5], [.4, .4, .5, .45]])
    centres = [(0, 3, 3), (1, 7, 15), (1, 6, 7)]                                     # (slice, row, col) on the 16x16 map
    cells = [params[b, r * 16 + c] for b, r, c in centres]
    valid = torch.tensor([[True, False, False, False], [True, True, False, False]])
    expected = focal_loss(heat, heatmap_target((y.reshape(2, 4, 4) + 1) / 2, valid, 16, 16)) + box(params_to_boxes(torch.stack(cells)), boxes)
    if radius:
        sized, targs = [], []
        for (b, r, c), t in zip(centres, boxes):
            for dr, dc in [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]:
                if not (0 <= r + dr < 16 and 0 <= c + dc < 16): continue           # the second lesion has 5 neighbours
                p = params[b, (r + dr) * 16 + c + dc]
                sized.append(torch.cat([box_params(t[None])[0, :2], p[2:]])); targs.append(t)
        assert len(sized) == 21
        expected = expected + box(params_to_boxes(torch.stack(sized)), torch.stack(targs))
    assert torch.allclose(DetectionLoss('giou', radius=radius)(out, y, f), expected)


@pytest.mark.parametrize('target', ['points', 'bbox'])
def test_detection_loss_decodes_boxes_in_the_targets_layout_with_scores(target):
    from fastai.vision.all import TensorBBox, TensorPoint
    from lesion_fastai.data import TensorScore
    torch.manual_seed(0)
    out = create_detector(1, **TINY).eval()(torch.rand(2, 1, 64, 64))
    boxes, scores = DetectionLoss(target=target, decoding=Decoding(k=5)).decodes(out)
    ref_boxes, ref_scores, _ = detections(out, 5)
    assert isinstance(scores, TensorScore) and torch.equal(scores.as_subclass(torch.Tensor), ref_scores)
    assert isinstance(boxes, TensorPoint if target == 'points' else TensorBBox) and boxes.shape == ((2, 10, 2) if target == 'points' else (2, 5, 4))
    assert torch.allclose((boxes.as_subclass(torch.Tensor).reshape(2, 5, 4) + 1) / 2, ref_boxes)


# --- metrics ------------------------------------------------------------------------------------------------

def _record(boxes, types=(-1,), spacing=(.5, .5), size=100, noisy=()):
    return SliceRecord(image_path='x.png', split='test', patient=1, width=size, height=size, spacing_mm=spacing,
                       dicom_window=(-175, 275), boxes=np.array(boxes, np.float32), lesion_types=tuple(types), noisy=tuple(noisy),
                       file_name='000001_01_01_001.png')


def test_top1_matches_any_lesion_on_the_slice():
    two = _record([[10, 10, 30, 30], [60, 60, 80, 80]], types=(4, 6))
    one = _record([[20, 20, 40, 40]], types=(4,), spacing=(1., 2.))
    pred = np.array([[.6, .6, .8, .8],        # exactly the second lesion of the two-lesion slice
                     [.25, .2, .45, .4]])     # shifted 5 px in x from the lesion: IoU 15*20/(2*400-300) = 0.6
    m = top1_metrics(pred, [two, one])
    assert m['n'] == 2 and m['hit@0.5'] == 1.
    assert m['mean_iou'] == pytest.approx((1 + .6) / 2)
    assert m['centre_error_mm_mean'] == pytest.approx((0 + 5 * 1.) / 2)
    assert m['by_type']['6_kidney']['mean_iou'] == pytest.approx(1) and m['by_type']['4_liver']['hit@0.5'] == 1


def test_a_box_overlapping_no_lesion_is_scored_against_the_nearest_one():
    two = _record([[10, 10, 20, 20], [70, 70, 80, 80]], types=(4, 6), spacing=(1., 1.))
    m = top1_metrics(np.array([[.55, .55, .65, .65]]), [two])        # centre (60, 60): nearest is the kidney lesion at (75, 75)
    assert m['mean_iou'] == 0 and m['centre_error_mm'] == pytest.approx(np.hypot(15, 15))
    assert list(m['by_type']) == ['6_kidney']


def test_calibration_counts_target_coordinates_within_one_and_two_std():
    rec = _record([[40, 40, 60, 60]])                                  # unit centre (.5, .5), sides .2
    pred = np.array([[.42, .42, .62, .62]])                            # centre off by .02, sides exact
    cal = lambda sd: top1_metrics(pred, [rec], pred_std=np.array([sd]))['calibration']
    c = cal([.03, .015, .1, .1])                                       # cx within 1 std, cy within 2, sizes exact
    assert c['within_1std'] == pytest.approx(3 / 4) and c['within_2std'] == 1.
    assert c['per_coordinate']['cy']['within_1std'] == 0 and c['per_coordinate']['cy']['median_abs_error'] == pytest.approx(.02)
    assert cal([.005, .005, .1, .1])['within_2std'] == pytest.approx(2 / 4)
    assert c['found']['n'] == 1 and c['found']['within_1std'] == c['within_1std']      # IoU 0.68: the box found its lesion
    far = top1_metrics(np.array([[.0, .0, .1, .1]]), [rec], pred_std=np.array([[.03, .03, .1, .1]]))['calibration']
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
    assert [r.split for r in evaluation_records([mixed, val], 'val')] == ['val']


def test_evaluate_detections_scores_froc_top_box_and_the_mean_box_detector():
    recs = [_record([[10, 10, 29, 29]]), _record([[50, 50, 69, 69], [10, 60, 29, 79]], types=(-1, -1))]
    base = mean_box(recs)                                              # over all three lesions
    assert np.allclose(base, np.array([70, 120, 127, 177]) / 3 / 100)
    boxes = np.array([[[.1, .1, .29, .29], [.6, .6, .7, .7]],          # a hit, then a false positive
                      [[.8, .8, .9, .9], [.5, .5, .69, .69]]])         # a false positive scoring highest, then a hit
    dets = Detections(boxes, np.array([[.9, .2], [.1, .8]]))
    assert np.allclose(dets.scores, [[.9, .2], [.8, .1]]) and np.allclose(dets.boxes[1, 0], [.5, .5, .69, .69])   # best first
    m = evaluate_detections(dets, recs, base)
    assert m['froc']['lesions'] == 3 and m['froc']['slices'] == 2 and m['froc']['max_sensitivity'] == pytest.approx(2 / 3)
    assert m['froc']['sensitivity']['0.5'] == pytest.approx(2 / 3) and m['top1']['hit@0.5'] == 1
    b = m['mean_box_baseline']
    assert b['froc']['predictions'] == 2 and b['froc']['max_fp_per_slice'] == 1 and b['top1']['n'] == 2
    with pytest.raises(ValueError, match='3 detection sets for 2 slices'): evaluate_detections(Detections(np.zeros((3, 1, 4)), np.zeros((3, 1))), recs)
