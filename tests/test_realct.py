"""Real CT through the whole pipeline: 58 16-bit slices of three LIDC-IDRI chest series with 16 nodule rows, in
DeepLesion's layout (../shared/realct). Reading, DICOM windows, neighbour slices, pretrain, finetune, predict and
show_results on real scans; far too small to say anything about accuracy."""
import csv
import json
import math

import pytest
import torch
from fastai.learner import load_learner

from conftest import REAL_CT

pytestmark = pytest.mark.slow       # every test here trains, or reads a model trained for it


@pytest.fixture(scope='module')
def real_ct():
    if not (REAL_CT / 'DL_info.csv').exists(): pytest.skip(f"real CT slices not found at {REAL_CT} (../shared/realct beside the project)")
    return REAL_CT


@pytest.fixture(scope='module')
def trained(real_ct, tmp_path_factory):
    "Two epochs at 64 px with the rows' own DICOM windows and one neighbour slice on each side."
    from lesion_fastai.config import FinetuneConfig
    from lesion_fastai.finetuning import finetune
    out = tmp_path_factory.mktemp('realct_finetune')
    finetune(FinetuneConfig(data=real_ct, out=out, epochs=2, bs=2, size=64, windows='dicom', context=1))
    return out


def test_real_slices_read_as_hu_with_their_rows(real_ct):
    from lesion_fastai.deeplesion import list_slices, load_data, load_hu
    df, records = load_data(real_ct)
    assert (len(df), len(records), len(list_slices(real_ct))) == (16, 13, 58)           # rows, key slices, PNGs
    assert dict(df.groupby('split', observed=True).patient.first()) == {'train': 900001, 'val': 900002, 'test': 900003}
    hu = load_hu(records[0].image_path)
    assert hu.shape == (512, 512) and hu.min() < -900 and hu.max() > 300        # air and bone of a real chest
    assert len({r.dicom_window for r in records}) > 1                            # each series its own window


def test_dicom_windows_come_from_each_rows_dicom_windows(real_ct):
    from lesion_fastai.data import CTSlice, SliceSpec, downsample
    from lesion_fastai.deeplesion import load_data, load_hu, window
    _, records = load_data(real_ct)
    load = CTSlice(SliceSpec('dicom', 0, 64))
    for r in (records[0], records[-1]):
        expect = downsample(torch.from_numpy(window(load_hu(r.image_path), *r.dicom_window))[None], 64)
        assert torch.allclose(load(r), expect, atol=1e-6)


def test_finetune_on_real_ct_writes_finite_metrics_and_figures(trained, real_ct):
    from lesion_fastai.deeplesion import evaluation_records, load_data
    m = json.loads((trained / 'metrics.json').read_text())
    assert (m['config']['windows'], m['config']['context']) == ('dicom', 1)
    froc = m['test']['froc']
    test = evaluation_records(load_data(real_ct)[1], 'test')                    # the test patient's nodules
    assert math.isfinite(froc['mean_0.5_4']) and (froc['slices'], froc['lesions']) == (len(test), sum(len(r.boxes) for r in test)) == (7, 10)
    assert (trained / 'results.png').stat().st_size > 0 and (trained / 'froc.png').stat().st_size > 0


def test_predict_on_a_real_series_writes_boxes_in_mm(trained, real_ct, tmp_path):
    from lesion_fastai.deeplesion import read_dl_info
    from lesion_fastai.predict import predict
    series = real_ct / 'Images_png' / '900003_01_01'
    predict(trained / 'export.pkl', [series], tmp_path, overlays=True)
    rows = list(csv.DictReader(open(tmp_path / 'predictions.csv')))
    assert {r['File_name'] for r in rows} == {f'900003_01_01_{p.stem}.png' for p in series.glob('*.png')}
    spacing = float(read_dl_info(real_ct / 'DL_info.csv').query('patient == 900003').spacing_x_mm.iloc[0])
    for r in rows[:20]:
        assert float(r['x2_mm']) == pytest.approx(float(r['x2']) * spacing, abs=1e-3) and 0 <= float(r['x1']) < float(r['x2']) <= 512
    assert len(list((tmp_path / 'overlays').glob('*.png'))) == len(list(series.glob('*.png')))


def test_show_results_draws_the_real_nodules(trained, real_ct):
    import matplotlib.pyplot as plt
    from lesion_fastai.data import labelled_dl
    learn = load_learner(trained / 'export.pkl')
    dl = labelled_dl(learn, real_ct)
    learn.show_results(dl=dl, max_n=3, min_score=0.)
    green = [p for ax in plt.gcf().axes for p in ax.patches if p.get_edgecolor()[:3] == (0., 1., 0.)]
    assert len(green) == sum(len(r.boxes) for r in dl.dataset.items[:3]) > 0
    plt.close('all')


def test_pretrain_on_real_ct_writes_a_checkpoint_finetune_loads(real_ct, tmp_path):
    import pretrain.__main__ as pretrain_cli
    from lesion_fastai.checkpoint import load_pretrained
    pretrain_cli.main(['--data', str(real_ct), '--out', str(tmp_path / 'pre'), '--epochs', '1', '--bs', '2', '--size', '64',
                       '--windows', 'lung', '--context', '1'])
    ckpt = load_pretrained(tmp_path / 'pre' / 'pretrained.pth')
    assert ckpt['config']['windows'] == 'lung' and ckpt['config']['context'] == 1
    assert (tmp_path / 'pre' / 'reconstructions.png').stat().st_size > 0
    from lesion_fastai.config import FinetuneConfig
    from lesion_fastai.finetuning import finetune
    finetune(FinetuneConfig(data=real_ct, out=tmp_path / 'ft', epochs=1, bs=2, pretrained=tmp_path / 'pre' / 'pretrained.pth',
                            freeze='sandwich'))
    assert math.isfinite(json.loads((tmp_path / 'ft' / 'metrics.json').read_text())['test']['froc']['mean_0.5_4'])
