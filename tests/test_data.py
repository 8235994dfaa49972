"""DataBlocks: batches, splits, half resolution, and boxes that stay on the lesion under augmentation."""
import numpy as np
import pytest
import torch
from fastai.vision.all import Flip, Pipeline, Rotate, TensorBBox, TensorPoint

from lesion_fastai.data import (BoxTidy, CTSlice, SliceSpec, TensorBoxCorners, TensorCT, TensorScore, autoencoder_dls,
                                detection_dls, downsample, select_patients)
from lesion_fastai.deeplesion import WINDOWS, list_slices, load_hu, save_hu, window


@pytest.mark.parametrize('target,yshape', [('points', (2, 8, 2)), ('bbox', (2, 4, 4))])
@pytest.mark.parametrize('windows,context,channels', [('soft', 0, 1), ('soft,lung', 1, 6)])
def test_batch_shapes_and_dtypes(tiny_records, target, yshape, windows, context, channels):
    dls = detection_dls(tiny_records, SliceSpec(windows, context, 32), target=target, bs=2, seed=0)
    x, y, flags = dls.one_batch()
    assert isinstance(x, TensorCT) and x.shape == (2, channels, 32, 32) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert y.shape == yshape and y.dtype == torch.float32 and y.abs().max() <= 1      # 4 slots: the most of any slice, at least 4
    assert isinstance(flags, TensorScore) and flags.shape == (2, 4) and set(flags.unique().tolist()) <= {0., 1.}
    b = y.reshape(2, 4, 4)
    assert (b[..., 0] <= b[..., 2]).all() and (b[..., 1] <= b[..., 3]).all()


@pytest.mark.parametrize('target', ['points', 'bbox'])
def test_every_lesion_of_a_slice_is_a_target_and_padding_is_flagged(tiny_records, target):
    train = [r for r in tiny_records if r.split == 'train']
    dls = detection_dls(tiny_records, SliceSpec(size=32), target=target, bs=len(train), seed=0, augment=False, shuffle=False)
    x, y, flags = dls.one_batch()
    boxes = (y.reshape(len(y), -1, 4).as_subclass(torch.Tensor) + 1) * 16                # pixels of the 32 px input
    assert any(len(r.boxes) > 1 for r in train)
    for r, b, f in zip(dls.train_ds.items, boxes, flags):
        n = len(r.boxes)
        assert f.tolist() == [1.] * n + [0.] * (4 - n)
        assert torch.allclose(b[:n], torch.tensor(r.boxes / 2), atol=1e-4)          # every lesion, in order, at half size


def test_split_by_patient_never_random(tiny_records):
    dls = detection_dls(tiny_records, SliceSpec(size=32), bs=2, seed=0)
    train = {r.patient for r in dls.train_ds.items}
    valid = {r.patient for r in dls.valid_ds.items}
    assert train and valid and not (train & valid)
    assert all(r.split == 'train' for r in dls.train_ds.items) and all(r.split == 'val' for r in dls.valid_ds.items)


def test_label_fraction_is_per_patient_and_seeded(tiny_records):
    train = [r for r in tiny_records if r.split == 'train']
    patients = {r.patient for r in train}
    sub = select_patients(train, .3, seed=1)
    kept = {r.patient for r in sub}
    assert len(kept) == max(1, round(.3 * len(patients)))
    assert sub == [r for r in train if r.patient in kept]      # whole patients
    assert sub == select_patients(train, .3, seed=1)
    with pytest.raises(ValueError, match='label fraction'): select_patients(train, 0)


def test_half_resolution_is_area_average(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.integers(-300, 300, size=(64, 64)).astype(np.float32)
    save_hu(tmp_path / 'Images_png' / '000001_01_01' / '005.png', hu)
    t = CTSlice(SliceSpec('soft', 0, 32))(tmp_path / 'Images_png' / '000001_01_01' / '005.png')
    expect = window(hu, *WINDOWS['soft']).reshape(32, 2, 32, 2).mean((1, 3))
    assert t.shape == (1, 32, 32) and np.allclose(t[0].numpy(), expect, atol=1e-6)
    x = torch.arange(16.).view(1, 4, 4)
    assert torch.equal(downsample(x, 2), torch.tensor([[[2.5, 4.5], [10.5, 12.5]]]))


def test_context_channels_put_key_slice_first(tiny_records):
    r = tiny_records[0]
    t = CTSlice(SliceSpec('soft', 1, 64))(r)
    assert t.shape == (3, 64, 64)
    assert torch.allclose(t[0], torch.from_numpy(window(load_hu(r.image_path), *WINDOWS['soft'])))


def test_every_channel_of_a_multi_window_multi_context_input(tmp_path):
    """Channels are window-major; within a window the key slice, then k-1, k+1, k-2, k+2. Each slice of the
    series has its own constant HU, so every channel tells which slice and window it came from."""
    series = tmp_path / 'Images_png' / '000001_01_01'
    hu = {k: 10. * (k - 10) for k in range(8, 13)}                 # slice 8: -20 HU ... slice 12: +20 HU
    for k, v in hu.items(): save_hu(series / f'{k:03d}.png', np.full((8, 8), v, np.float32))
    wins = [(-100., 100.), (-20., 20.)]
    t = CTSlice(SliceSpec('-100:100,-20:20', 2, 4))(series / '010.png')
    order = [10, 9, 11, 8, 12]
    expect = [window(np.array(hu[k]), *w) for w in wins for k in order]
    assert t.shape == (10, 4, 4)
    assert [round(float(c.mean()), 4) for c in t] == [round(float(e), 4) for e in expect]
    assert t.orig_size == (8, 8)


@pytest.mark.parametrize('name', ['slice.png', 'scan_0007.png', '005.png'])
def test_a_slice_without_neighbours_on_disk_repeats_the_key_slice_with_one_warning(tmp_path, name):
    "A slice not named like DeepLesion's, or alone in its folder: every neighbour channel is the key slice, warned once."
    hu = np.random.default_rng(0).integers(-300, 300, size=(16, 16)).astype(np.float32)
    for d in ('a', 'b'): save_hu(tmp_path / d / name, hu)
    load = CTSlice(SliceSpec('soft', 2, 8))
    with pytest.warns(UserWarning, match=r"neighbour channels \(--context 2\) repeat the key slice") as w:
        t = load(tmp_path / 'a' / name)
        load(tmp_path / 'b' / name)                               # a second such slice: no second warning
    assert len(w) == 1 and str(tmp_path / 'a' / name) in str(w[0].message)
    assert t.shape == (5, 8, 8) and all(torch.equal(t[0], c) for c in t)
    assert torch.equal(t, load.from_hu([hu] * 5))


def test_a_slice_with_its_neighbours_is_read_without_a_warning(tmp_path):
    import warnings
    for k in (4, 5, 6): save_hu(tmp_path / f'{k:03d}.png', np.full((8, 8), 10. * k, np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        t = CTSlice(SliceSpec('soft', 1, 8))(tmp_path / '005.png')
    assert not torch.equal(t[1], t[0])


def _lesion_image(size=64):
    yy, xx = np.mgrid[0:size, 0:size]
    mask = ((xx - 20.5) / 9) ** 2 + ((yy - 40.5) / 5) ** 2 <= 1
    ys, xs = np.nonzero(mask)
    box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # pixel edges
    return torch.from_numpy(mask.astype(np.float32)), box


@pytest.mark.parametrize('kind', ['points', 'bbox'])
@pytest.mark.parametrize('seed', range(4))
def test_flip_and_rotation_keep_box_on_lesion(kind, seed):
    torch.manual_seed(seed)
    img, (x1, y1, x2, y2) = _lesion_image()
    x = TensorCT(img[None, None].repeat(2, 1, 1, 1))
    if kind == 'points':
        y = TensorPoint(torch.tensor([[[x1, y1], [x2, y1], [x2, y2], [x1, y2]]] * 2, dtype=torch.float32) / 32 - 1)
    else:
        y = TensorBBox(torch.tensor([[[x1, y1, x2, y2]]] * 2, dtype=torch.float32) / 32 - 1)
    pipe = Pipeline([Flip(p=1.), Rotate(max_deg=10, p=1.), BoxTidy()], split_idx=0)
    xt, yt, ft = pipe((x, y, TensorScore(torch.ones(2, 1))))
    assert isinstance(yt, TensorBoxCorners if kind == 'points' else TensorBBox) and ft.tolist() == [[1.], [1.]]
    for i in range(2):
        bx1, by1, bx2, by2 = ((yt[i].reshape(4) + 1) * 32).tolist()
        assert bx1 < bx2 and by1 < by2
        ys, xs = np.nonzero(xt[i, 0].numpy() > .5)
        assert len(xs) > 100
        assert (xs + .5 >= bx1 - 1).all() and (xs + .5 <= bx2 + 1).all()
        assert (ys + .5 >= by1 - 1).all() and (ys + .5 <= by2 + 1).all()
        assert xs.mean() > 32  # it was flipped: the lesion moved to the right half


def test_box_tidy_sorts_clips_and_drops_boxes_pushed_out():
    x = TensorCT(torch.zeros(1, 1, 4, 4))
    y = TensorBBox(torch.tensor([[[.5, .9, -.2, 1.05], [1.2, .1, 1.6, .3], [0., 0., .1, .1]]]))    # crosses the edge; outside
    _, yt, ft = BoxTidy()((x, y, TensorScore(torch.tensor([[1., 1., 0.]]))))
    assert torch.allclose(yt[0, 0], torch.tensor([-.2, .9, .5, 1.]))               # sorted, clipped to the image
    assert ft.tolist() == [[1., 0., 0.]]                                            # its centre left the image: dropped
    p = TensorPoint(torch.tensor([[[.3, -1.2], [-.4, -1.2], [-.4, .6], [.3, .6]]]))               # one box's four corners
    _, out, f = BoxTidy()((x, p, TensorScore(torch.ones(1, 1))))
    assert isinstance(out, TensorBoxCorners) and torch.allclose(out, torch.tensor([[[-.4, -1.], [.3, .6]]])) and f.tolist() == [[1.]]


def test_show_batch_draws_every_lesion(tiny_records):
    import matplotlib.pyplot as plt
    multi = [r for r in tiny_records if r.split == 'train' and len(r.boxes) > 1][:1]
    recs = multi + [r for r in tiny_records if r.split == 'val']
    dls = detection_dls(recs, SliceSpec(size=32), bs=1, seed=0, augment=False)
    dls.show_batch(max_n=1)
    ax = plt.gcf().axes[0]
    assert ax.images[0].get_cmap().name == 'bone' and len(ax.patches) == len(multi[0].boxes) > 1
    assert {p.get_edgecolor()[:3] for p in ax.patches} == {(0., 1., 0.)}
    plt.close('all')


def test_autoencoder_batches_every_slice_of_given_patients(tiny_data, tiny_records):
    train_p = {r.patient for r in tiny_records if r.split == 'train'}
    val_p = {r.patient for r in tiny_records if r.split == 'val'}
    paths = list_slices(tiny_data, train_p | val_p)
    dls = autoencoder_dls(paths, val_p, SliceSpec(size=32), bs=2, seed=0)
    assert len(dls.train_ds) + len(dls.valid_ds) == len(paths)
    (x,) = dls.one_batch()
    assert isinstance(x, TensorCT) and x.shape == (2, 1, 32, 32)


@pytest.mark.parametrize('target', ['points', 'bbox'])
@pytest.mark.parametrize('kind', ['memory', 'disk', 'none'])
def test_slice_dl_batches_are_the_per_item_pipelines_batches_value_for_value(tiny_records, tmp_path, target, kind):
    """SliceDL stacks the slices from the cache in one read and keeps each item's targets: the batches
    (types, metadata and values) are those fastai's per-item pipeline makes from the same records."""
    from fastai.data.core import TfmdDL
    from lesion_fastai.cache import prepare_slices
    from lesion_fastai.data import SliceDL
    spec = SliceSpec('soft,lung', 2, 32)
    cache = prepare_slices(kind, tiny_records, spec, folder=tmp_path)
    dls = detection_dls(tiny_records, spec, target=target, bs=3, seed=0, cache=cache, augment=False)
    for dl in (dls.valid, dls.test_dl(tiny_records[:5], with_labels=True), dls.test_dl(tiny_records[:5])):
        assert isinstance(dl, SliceDL) and dl._slice_transform() is not None
        order = list(range(len(dl.dataset)))
        for _ in range(2):                                       # the second time from the kept targets
            fast, slow = list(dl.create_batches(order)), list(TfmdDL.create_batches(dl, order))
            assert len(fast) == len(slow) > 0
            for f, s in zip(fast, slow):
                assert len(f) == len(s)
                for a, b in zip(f, s):
                    assert type(a) is type(b) and torch.equal(a, b)
                    assert getattr(a, 'img_size', None) == getattr(b, 'img_size', None) and getattr(a, 'orig_size', None) == getattr(b, 'orig_size', None)


def test_autoencoder_batches_come_from_the_batch_path_too(tiny_data, tiny_records):
    from fastai.data.core import TfmdDL
    val_p = {r.patient for r in tiny_records if r.split == 'val'}
    paths = list_slices(tiny_data, {r.patient for r in tiny_records if r.split == 'train'} | val_p)
    dls = autoencoder_dls(paths, val_p, SliceSpec('soft', 1, 32), bs=2, seed=0)
    dl = dls.valid
    order = list(range(len(dl.dataset)))
    fast, slow = list(dl.create_batches(order)), list(TfmdDL.create_batches(dl, order))
    assert all(len(f) == len(s) == 1 and torch.equal(f[0], s[0]) and type(f[0]) is type(s[0]) for f, s in zip(fast, slow))
