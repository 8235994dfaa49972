"""The detector's loss terms against torchvision and hand counts, on tiny inputs."""
import numpy as np
import pytest
import torch
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from lesion_fastai.boxes import params_to_boxes
from lesion_fastai.heatmap import Decoding, detections
from lesion_fastai.losses import BoxLoss, DetectionLoss
from lesion_fastai.models.detector import create_detector

from tiny import TINY, targets


P = torch.tensor([[.25, .25, .6, .65], [.5, .55, .75, .8], [.05, .05, .1, .15]])

T = torch.tensor([[.3, .2, .55, .7], [.6, .5, .8, .75], [.75, .75, .95, .95]])

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
    y, f = targets([[[0., 0., .02, .02]], [[.6, .65, .61, .655]]])
    loss = DetectionLoss(term, radius=1, nll_weight=1.)(m(torch.rand(2, 1, 64, 64)), y, f)
    assert torch.isfinite(loss), loss
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name

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
    y, f = targets([[[.1, .1, .3, .3]], [[.9, .4, 1., .5], [.4, .4, .5, .45]]])     # the second slice's first centre: last column
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
