"""The one inference path and the one resolved config: `detect` gives what the model gives each item,
in order, whatever the batching; `resolve` fills every setting a run decides; `settings_diff` is the
one comparison of two runs' settings."""
import dataclasses

import numpy as np
import pytest
import torch

from lesion_fastai.config import FinetuneConfig, PretrainConfig, recorded, settings_diff
from lesion_fastai.data import CTSlice, SliceSpec
from lesion_fastai.heatmap import Decoding
from lesion_fastai.inference import detect
from lesion_fastai.models.detector import Detector

from tiny import TINY


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return Detector(dict(TINY, in_chans=1), decoding=Decoding(k=5, min_score=0.)).eval()


def test_detect_is_the_models_own_output_in_order_whatever_the_batch(model, tiny_records):
    spec, items = SliceSpec(size=32), tiny_records[:5]
    with torch.no_grad(): boxes, scores, _ = model.decoding(model(CTSlice(spec).batch(items).as_subclass(torch.Tensor)))
    order = np.argsort(-scores.numpy(), axis=1, kind='stable')
    for bs in (1, 2, 5):
        dets, extras = detect(model, spec, model.decoding, items, bs=bs)
        assert len(dets) == 5 and extras == [()] * 5
        assert np.allclose(dets.scores, np.take_along_axis(scores.numpy(), order, 1), atol=1e-6)
        assert np.allclose(dets.boxes, np.take_along_axis(boxes.numpy(), order[..., None], 1), atol=1e-6)
    paths = detect(model, spec, model.decoding, [r.image_path for r in items], bs=2)[0]     # a PNG path reads as its record does
    assert np.allclose(paths.scores, dets.scores, atol=1e-6)                                # (soft window: no DICOM window needed)


def test_detect_hands_back_what_a_reader_gives_beside_the_input(model, tiny_records):
    spec = SliceSpec(size=32)
    ct = CTSlice(spec)
    read = lambda r: (ct.encodes(r).as_subclass(torch.Tensor), r.width, r.file_name)
    dets, extras = detect(model, spec, model.decoding, tiny_records[:3], bs=2, read=read)
    assert extras == [(r.width, r.file_name) for r in tiny_records[:3]] and len(dets) == 3
    assert len(detect(model, spec, model.decoding, [])[0]) == 0


def test_resolve_fills_every_setting_the_run_decides(tiny_records, tiny_data, tmp_path):
    from lesion_fastai.finetuning import resolve
    from lesion_fastai.pretraining import resolve as resolve_pretraining
    cfg = resolve(FinetuneConfig(data=tiny_data, out=tmp_path), tiny_records, None)
    assert (cfg.windows, cfg.context, cfg.size, cfg.freeze, cfg.backbone) == ('soft', 2, tiny_records[0].width // 2, 'scratch', 'resnet')
    assert SliceSpec.of(cfg) == SliceSpec('soft', 2, tiny_records[0].width // 2)
    ckpt = {'config': {'windows': 'soft,lung', 'context': 1, 'size': 48}, 'model_args': {'encoder_args': {'backbone': 'resnet'}}}
    from_ckpt = resolve(FinetuneConfig(data=tiny_data, out=tmp_path, pretrained=tmp_path / 'p.pth'), tiny_records, ckpt)
    assert (from_ckpt.windows, from_ckpt.context, from_ckpt.size, from_ckpt.freeze) == ('soft,lung', 1, 48, 'sandwich')
    with pytest.raises(ValueError, match='--context 2 disagrees with the checkpoint'):
        resolve(FinetuneConfig(data=tiny_data, out=tmp_path, pretrained=tmp_path / 'p.pth', context=2), tiny_records, ckpt)
    pre = resolve_pretraining(PretrainConfig(data=tiny_data, out=tmp_path, pretext='mae'), tiny_records)
    assert (pre.mask_ratio, pre.noise_std, pre.patch, pre.context) == (.75, 0., max(2, round(pre.size / 32)), 2)
    assert None not in (recorded(cfg)[k] for k in ('windows', 'context', 'size', 'freeze', 'backbone'))


def test_settings_diff_names_what_differs_and_reads_old_records(tmp_path):
    now = recorded(FinetuneConfig(data=tmp_path, out=tmp_path / 'o', freeze='full'))
    assert settings_diff(now, dict(now)) == {}
    assert settings_diff({**now, 'bs': 8}, now) == {'bs': (8, 16)}
    assert settings_diff({**now, 'bs': 8}, now, ignore=('bs',)) == {}
    old = {k: v for k, v in now.items() if k != 'kappa'} | {'freeze': 'none'}       # a record before kappa, with freeze's old name
    assert settings_diff(old, now, cls=FinetuneConfig) == {} and 'freeze' in settings_diff(old, now)
    before = {k: v for k, v in now.items() if k != 'unfrozen_lr_div'}          # a record before the setting: its runs unfroze at lr/2
    assert settings_diff(before, now, cls=FinetuneConfig) == {}                     # ... and it did not unfreeze
    unfroze = {**now, 'freeze': 'sandwich', 'unfreeze_after': 5}
    assert settings_diff({k: v for k, v in unfroze.items() if k != 'unfrozen_lr_div'}, unfroze, cls=FinetuneConfig) == {'unfrozen_lr_div': (2., 1.)}
    assert settings_diff({k: v for k, v in unfroze.items() if k != 'unfrozen_lr_div'}, {**unfroze, 'unfrozen_lr_div': 2.}, cls=FinetuneConfig) == {}
    assert settings_diff({'code_channels': [64, 8, 4]}, {'code_channels': (64, 8, 4)}) == {}        # JSON's list is the tuple
    assert dataclasses.asdict(FinetuneConfig(data=tmp_path, out=tmp_path)).keys() == recorded(FinetuneConfig(data=tmp_path, out=tmp_path)).keys()


def test_predict_reads_a_deeplesion_png_with_its_rows_dicom_window_as_training_does(tiny_data, tmp_path):
    import shutil
    from lesion_fastai.deeplesion import read_dl_info, slice_records
    from lesion_fastai.predict import _SeriesSlice
    from lesion_fastai.scans import find_inputs
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    csv_path = data / 'DL_info.csv'
    lines = csv_path.read_text().splitlines()
    series = read_dl_info(csv_path).iloc[0].file_name.rsplit('_', 1)[0]
    lines = [l.replace('"-175, 275"', '"-1350, 150"') if l.startswith(series) else l for l in lines]   # a lung window, that series only
    csv_path.write_text('\n'.join(lines) + '\n')
    recs = [r for r in slice_records(read_dl_info(csv_path)) if r.file_name.startswith(series)]
    assert recs and all(r.dicom_window == (-1350., 150.) for r in recs)
    spec = SliceSpec('dicom', 1, 32)
    (s,), _, _ = find_inputs([data / 'Images_png' / series])
    read = _SeriesSlice(CTSlice(spec))
    for r in recs:                                                # a key slice: as training reads its record
        x, *_ = read((s, s.names.index(r.file_name)))
        assert torch.allclose(x, CTSlice(spec)(r).as_subclass(torch.Tensor))
    other = next(i for i, p in enumerate(s.files) if p.name not in {r.file_name.rsplit('_', 1)[1] for r in recs})
    x, *_ = read((s, other))                                      # another slice of the series: the series' window, not soft
    assert torch.allclose(x, CTSlice(spec).load(s.files[other], (-1350., 150.)).as_subclass(torch.Tensor))
    assert not torch.allclose(x, CTSlice(spec).load(s.files[other]).as_subclass(torch.Tensor))
