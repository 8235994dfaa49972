"""The detector on tiny inputs: heads, maps, decoding, the Gaussian head, transfer layers, the autoencoder
whose encoder it shares."""
import pytest
import torch

from lesion_fastai.boxes import MIN_SIZE, params_to_boxes
from lesion_fastai.heatmap import detections
from lesion_fastai.losses import DetectionLoss
from lesion_fastai.models.autoencoder import create_autoencoder
from lesion_fastai.models.detector import Detector, TransferLayer, create_detector

from tiny import F_, TINY, Y, targets, valid_boxes


@pytest.mark.parametrize('head', ['direct', 'gaussian'])
@pytest.mark.parametrize('sandwich', [False, True])
@pytest.mark.parametrize('in_chans', [1, 3])
def test_detector_outputs_valid_maps_and_every_parameter_gets_a_gradient(head, sandwich, in_chans):
    torch.manual_seed(0)
    m = create_detector(in_chans, head, sandwich, **TINY)
    out = m(torch.rand(2, in_chans, 64, 64))
    heat, params = out[0], out[1]
    assert heat.shape == (2, 16, 16) and params.shape == (2, 256, 4) and len(out) == (4 if head == 'gaussian' else 2)
    assert valid_boxes(params_to_boxes(params)) and torch.isfinite(heat).all()
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
        assert torch.isfinite(b).all() and valid_boxes(b)
        assert ((b[..., 2:] - b[..., :2]) >= MIN_SIZE / 2 - 1e-7).all()     # positive size, also at the border

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
    y, f = targets([[box]] * 4)
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

@pytest.mark.parametrize('adapters', [{}, {'adapter_ratio': 1.}, {'adapter_stem': True}, {'adapter_gate': False, 'adapter_stem': True}])
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
    with torch.no_grad(): stem.stem_adapter.gate.fill_(.5)   # once trained, it changes the features
    x = torch.rand(2, 1, 64, 64)
    full.encoder.load_state_dict(stem.encoder.state_dict())
    full.eval(); stem.eval()
    assert not torch.allclose(stem.features(x)[0], full.features(x)[0])

def _first_step_change(ch: int, **kw) -> float:
    "RMS of what a transfer layer adds to its input after one Adam step (lr 1e-3) on a random linear loss."
    torch.manual_seed(0)
    layer, x, t = TransferLayer(ch, **kw), torch.randn(4, ch, 8, 8), torch.randn(4, ch, 8, 8)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    (layer(x) * t).mean().backward(); opt.step()
    with torch.no_grad(): return (layer(x) - x).pow(2).mean().sqrt().item()

def test_a_transfer_layers_first_step_does_not_grow_with_its_width():
    """The default transfer layer (gated) moves its output alike at 8 and 256 channels; the ungated
    layer's zero-initialised last convolution moves it in proportion to the fan-in (about 26 times more
    at 256 channels than at 8), which let a sandwich's deepest adapters outgrow the frozen features."""
    assert _first_step_change(256) < 2 * _first_step_change(8)
    assert _first_step_change(256, gate=False) > 10 * _first_step_change(8, gate=False)
    assert create_detector(1, sandwich=True, **TINY).adapters[0].gate.requires_grad    # the detector's default too

def test_a_safe_model_written_before_the_gate_loads_ungated(tmp_path):
    "A model.json without `adapter_gate` (written before it) rebuilds ungated transfer layers, and computes what was saved."
    import json
    from dataclasses import asdict
    from safetensors.torch import save_file
    from lesion_fastai.data import SliceSpec
    from lesion_fastai.export import SAFE_FORMAT, load_detector
    from lesion_fastai.heatmap import Decoding
    torch.manual_seed(0)
    old = create_detector(1, sandwich=True, adapter_gate=False, **TINY).eval()
    with torch.no_grad(): old.adapters[0].conv2.weight.normal_()       # trained: the layer changes the features
    settings = {k: v for k, v in old.init_args.items() if k != 'adapter_gate'}
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(tmp_path / 'model.safetensors'))
    (tmp_path / 'model.json').write_text(json.dumps({'format': SAFE_FORMAT, 'detector': settings, 'spec': asdict(SliceSpec(size=64)),
                                                     'decoding': asdict(Decoding())}))
    model, _, _ = load_detector(tmp_path / 'model.safetensors')
    assert not hasattr(model.adapters[0], 'gate')
    x = torch.rand(1, 1, 64, 64)
    assert torch.equal(model(x)[0], old(x)[0])

@pytest.mark.parametrize('size', [32, 64])
def test_autoencoder_shapes_and_encoder_moves_strictly(size):
    ae = create_autoencoder(3, **TINY)
    x = torch.rand(2, 3, size, size)
    y = ae(x)
    assert y.shape == x.shape and (y >= 0).all() and (y <= 1).all()
    loc = Detector(ae.encoder_args)
    loc.encoder.load_state_dict(ae.encoder.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(loc.encoder.state_dict().values(), ae.encoder.state_dict().values()))
