"""python -m lesion_fastai.predict on PNG folders, DICOM series and NIfTI volumes, with bad files among them."""
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastai.learner import load_learner
from PIL import Image

from lesion_fastai.deeplesion import load_hu, save_hu
from lesion_fastai.heatmap import MIN_SCORE
from lesion_fastai.predict import SKIPPED, find_inputs, main, predict, read_dicom_series
from lesion_fastai.config import FinetuneConfig
from lesion_fastai.finetuning import finetune


pytestmark = pytest.mark.slow      # every test here predicts with a model trained for it


@pytest.fixture(scope='module')
def model(tiny_data, tmp_path_factory):
    "A one-epoch Gaussian-head model with one neighbour slice on each side, at 32 px (the slices are 64 px)."
    out = tmp_path_factory.mktemp('model')
    finetune(FinetuneConfig(data=tiny_data, out=out, epochs=1, bs=2, size=32, head='gaussian', context=1))
    return out / 'export.pkl'


def _rows(out):
    with open(out / 'predictions.csv') as f: return list(csv.DictReader(f))


def _boxes(rows, key='File_name'):
    "Per slice: the boxes [n, 4] and scores [n] of its rows, in file order (best first)."
    per = {}
    for r in rows: per.setdefault(r[key], []).append([float(r[c]) for c in ('x1', 'y1', 'x2', 'y2', 'score')])
    return {k: np.array(v) for k, v in per.items()}


def _series(tiny_data):
    """The first series folder of the tiny data whose slices follow each other without a gap (so that a DICOM or NIfTI
    copy, whose neighbours are the next slices of the stack, holds the neighbours the PNGs have), and its slices
    in HU, in slice order."""
    def contiguous(folder):
        numbers = sorted(int(p.stem) for p in folder.glob('*.png'))
        return numbers == list(range(numbers[0], numbers[-1] + 1))
    folder = next(f for f in sorted((tiny_data / 'Images_png').iterdir()) if contiguous(f))
    pngs = sorted(folder.glob('*.png'))
    return folder, pngs, [load_hu(p) for p in pngs]


def test_png_folder_gives_what_learn_predict_gives(model, tiny_data, tiny_records, tmp_path):
    res = predict(model, [tiny_data / 'Images_png'], tmp_path / 'out')
    n_png = len(list((tiny_data / 'Images_png').rglob('*.png')))
    assert res['predicted'] == n_png and res['skipped'] == []
    rows = _rows(tmp_path / 'out')
    assert list(rows[0])[:6] == ['File_name', 'x1', 'y1', 'x2', 'y2', 'score']          # the evaluation's columns first
    assert all(r['std_x1'] != '' for r in rows)                                          # the Gaussian head's std
    spacing = {r.file_name.rsplit('_', 1)[0]: r.spacing_mm for r in tiny_records}        # DL_info.csv beside Images_png: mm columns
    for r in rows:
        sx, sy = spacing[r['File_name'].rsplit('_', 1)[0]]
        assert np.allclose([float(r[c + '_mm']) for c in ('x1', 'y1', 'x2', 'y2')],
                           np.array([float(r[c]) for c in ('x1', 'y1', 'x2', 'y2')]) * [sx, sy, sx, sy], atol=1e-3)
    got = _boxes(rows)
    learn = load_learner(model)
    for rec in [r for r in tiny_records if r.split == 'test'][:2]:
        (boxes, scores), _, _ = learn.predict(rec.image_path)
        boxes, scores = np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32)
        keep = scores >= MIN_SCORE
        want = np.c_[boxes[keep], scores[keep]]
        assert rec.file_name in got and np.allclose(got[rec.file_name], want[np.argsort(-want[:, 4], kind='stable')], atol=2e-3)


def _write_dicom(path, stored, z, uid, spacing=(.7, .8), modality='CT', intercept=-32768., **tags):
    pydicom = pytest.importorskip('pydicom')
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = CTImageStorage, generate_uid(), ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, uid, modality
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 16, 15, 0, 1
    ds.PhotometricInterpretation = 'MONOCHROME2'
    ds.RescaleIntercept, ds.RescaleSlope, ds.PixelSpacing = intercept, 1, list(spacing)
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0., 0., z], [1., 0., 0., 0., 1., 0.]
    for tag, value in tags.items(): setattr(ds, tag, value)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.__version__


def test_dicom_series_round_trips_hu_orders_by_position_and_predicts_as_the_pngs(model, tiny_data, tmp_path):
    pytest.importorskip('pydicom')
    import pydicom
    folder, pngs, hus = _series(tiny_data)
    dcm = tmp_path / 'dicom'
    dcm.mkdir()
    uid = pydicom.uid.generate_uid()
    # file names in the reverse of the slices' order: only the position can put them right, the most superior (the
    # first PNG, as convert numbers a volume) first; empty window tags, and a zero width, are no window
    for i, h in enumerate(hus):
        _write_dicom(dcm / f'IM{len(hus) - i:04d}.dcm', (h + 32768).astype(np.uint16), 40 - 2.5 * i, uid,
                     WindowCenter='' if i == 0 else 40, WindowWidth=0 if i == 1 else 400)
    _write_dicom(dcm / 'MR0001.dcm', (hus[0] + 32768).astype(np.uint16), 0., pydicom.uid.generate_uid(), modality='MR')
    _write_dicom(dcm / 'LOC0001.dcm', (hus[0] + 32768).astype(np.uint16), 0., uid, ImageType=['ORIGINAL', 'PRIMARY', 'LOCALIZER'])
    (series,), skipped = read_dicom_series(sorted(dcm.glob('*.dcm')))
    assert sorted(skipped) == [(str(dcm / 'LOC0001.dcm'), 'DICOM ImageType LOCALIZER (a scout image), expected an axial CT slice'),
                               (str(dcm / 'MR0001.dcm'), 'DICOM Modality MR, expected CT')]
    assert series.windows[:3] == [None, None, (-160., 240.)]
    assert [p.rsplit('IM', 1)[1] for p in series.files] == [f'{len(hus) - i:04d}.dcm' for i in range(len(hus))]
    assert all(np.array_equal(series.hu(i), h) for i, h in enumerate(hus)) and series.spacing == (.7, .8)
    res = predict(model, [dcm], tmp_path / 'd')
    assert res['predicted'] == len(hus) and sorted(s for s, _ in res['skipped']) == [str(dcm / 'LOC0001.dcm'), str(dcm / 'MR0001.dcm')]
    predict(model, [folder], tmp_path / 'p')
    rows_d, rows_p = _rows(tmp_path / 'd'), _rows(tmp_path / 'p')
    # slice i of the series is the i-th PNG: the same input (neighbours included), so the same boxes
    by_d = _boxes(rows_d, 'slice_index')
    by_p = {str(i): v for i, v in enumerate((_boxes(rows_p, 'slice_index')[str(int(p.stem))] for p in pngs), 1)}   # from 1
    assert by_d.keys() == by_p.keys() and all(np.allclose(by_d[k], by_p[k], atol=1e-4) for k in by_d)
    r = rows_d[0]
    assert np.isclose(float(r['x2_mm']), float(r['x2']) * .8, atol=1e-3) and np.isclose(float(r['y2_mm']), float(r['y2']) * .7, atol=1e-3)


def test_nifti_volume_predicts_slice_by_slice_as_the_pngs(model, tiny_data, tmp_path):
    nib = pytest.importorskip('nibabel')
    folder, pngs, hus = _series(tiny_data)
    # stored as convert reads a RAS+ volume: x toward the patient's right (the image's left), y anterior (the top),
    # z superior (the first PNG the most superior)
    vol = np.stack([h.T[::-1, ::-1] for h in hus[::-1]], axis=-1)
    img = nib.Nifti1Image(vol.astype(np.int16), np.diag([.8, .7, 2.5, 1.]))
    nib.save(img, tmp_path / 'ct.nii.gz')
    (series,), _, _ = find_inputs([tmp_path / 'ct.nii.gz'])
    assert all(np.array_equal(series.hu(i), h) for i, h in enumerate(hus)) and np.allclose(series.spacing, (.7, .8))   # float32 header
    predict(model, [tmp_path / 'ct.nii.gz'], tmp_path / 'n')
    predict(model, [folder], tmp_path / 'p')
    by_n = _boxes(_rows(tmp_path / 'n'), 'slice_index')
    by_p = _boxes(_rows(tmp_path / 'p'), 'slice_index')
    assert all(np.allclose(by_n[str(i)], by_p[str(int(p.stem))], atol=1e-4) for i, p in enumerate(pngs, 1))


def test_bad_files_are_skipped_and_named_the_rest_predicted_strict_writes_nothing(model, tiny_data, tmp_path, capsys):
    folder, pngs, _ = _series(tiny_data)
    mixed = tmp_path / 'mixed' / folder.name
    shutil.copytree(folder, mixed)
    Image.new('L', (64, 64)).save(mixed / '900.png')                       # 8-bit
    Image.new('RGB', (64, 64)).save(mixed / '901.png')                     # colour
    (mixed / '902.png').write_bytes(np.random.default_rng(0).bytes(500))   # not an image
    good = mixed / pngs[0].name
    data = good.read_bytes()
    (mixed / '903.png').write_bytes(data[:len(data) // 2])                 # header fine, pixels truncated
    (mixed / 'notes.txt').write_text('ignored: not an input kind')
    with pytest.raises(SystemExit) as e: main([str(model), str(tmp_path / 'mixed'), '--out', str(tmp_path / 'out')])
    assert e.value.code == SKIPPED
    with open(tmp_path / 'out' / 'skipped.csv') as f: skipped = {r['file'].rsplit('/', 1)[1]: r['reason'] for r in csv.DictReader(f)}
    assert set(skipped) == {'900.png', '901.png', '902.png', '903.png'}
    assert "mode 'L'" in skipped['900.png'] and "mode 'RGB'" in skipped['901.png'] and 'not an image' in skipped['902.png']
    assert 'truncated' in skipped['903.png']
    assert {r['source'].rsplit('/', 1)[1] for r in _rows(tmp_path / 'out')} == {p.name for p in pngs}
    assert '1 other file(s) in the folders ignored' in capsys.readouterr().out
    with pytest.raises(SystemExit) as e: main([str(model), str(tmp_path / 'mixed'), '--out', str(tmp_path / 'strict'), '--strict'])
    assert str(e.value.code).startswith('error: --strict') and not (tmp_path / 'strict').exists()


def test_overlays_default_to_the_models_operating_point_and_always_show_the_top_box(model, tiny_data, tmp_path, capsys):
    from lesion_fastai.export import detector_settings
    _, decoding = detector_settings(load_learner(model))
    op = decoding.operating_score
    assert op is not None
    folder, pngs, _ = _series(tiny_data)
    res = predict(model, [folder], tmp_path / 'o', overlays=True)
    scores = {k: v[:, 4] for k, v in _boxes(_rows(tmp_path / 'o')).items()}
    want = sum(max(1, int((s[:5] >= op).sum())) for s in scores.values())
    assert res['threshold'] == op and res['drawn'] == want and len(scores) == len(pngs)
    assert f"{want} box(es) at score >= {op:.3f} (the model's operating point" in capsys.readouterr().out
    below = [k for k, s in scores.items() if s[0] < op]                    # a top box under the threshold: drawn orange
    for k in below[:1]:
        img = np.asarray(Image.open(tmp_path / 'o' / 'overlays' / (k[:-4] + '.png')))
        assert ((img == (255, 150, 0)).all(-1)).any()
    res = predict(model, [folder], tmp_path / 'z', overlays=True, min_score=1.)              # a threshold no box reaches
    assert res['threshold'] == 1. and res['drawn'] == len(pngs)


def test_a_slice_larger_than_the_training_size_gets_boxes_in_its_own_pixels(model, tiny_data, tmp_path):
    folder, pngs, hus = _series(tiny_data)
    big = tmp_path / 'big' / folder.name
    for p, h in zip(pngs, hus): save_hu(big / p.name, np.kron(h, np.ones((2, 2), np.float32)))   # 128 px, the same picture
    predict(model, [big], tmp_path / 'b', overlays=True, min_score=0.)
    predict(model, [folder], tmp_path / 's')
    b, s = _boxes(_rows(tmp_path / 'b')), _boxes(_rows(tmp_path / 's'))
    assert b.keys() == s.keys() and all(np.allclose(b[k][:, :4], 2 * s[k][:, :4], atol=2e-3) and np.allclose(b[k][:, 4], s[k][:, 4], atol=1e-4) for k in b)
    shots = sorted((tmp_path / 'b' / 'overlays').glob('*.png'))
    assert len(shots) == len(pngs) and Image.open(shots[0]).size == (128, 128)


def test_bombs_truncated_volumes_and_empty_inputs_are_rows_of_skipped_csv_and_the_rest_is_predicted(model, tiny_data, tmp_path):
    nib = pytest.importorskip('nibabel')
    from test_fuzz import _png_header_only, _ztxt_bomb
    folder, pngs, hus = _series(tiny_data)
    mixed = tmp_path / 'mixed' / folder.name
    shutil.copytree(folder, mixed)
    (mixed / '900.png').write_bytes(_png_header_only(30000, 30000))         # a decompression bomb's header
    (mixed / '901.png').write_bytes((mixed / pngs[0].name).read_bytes())
    _ztxt_bomb(mixed / '901.png')                                          # a text chunk that inflates to 200 MB
    vol = np.stack([h.T for h in hus], axis=-1).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / 'ct.nii.gz')
    data = (tmp_path / 'ct.nii.gz').read_bytes()
    (tmp_path / 'cut.nii.gz').write_bytes(data[:len(data) // 2])           # truncated
    nib.save(nib.Nifti1Image(np.full((8, 8, 2), np.nan, np.float32), np.eye(4)), tmp_path / 'nan.nii.gz')
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 0), np.int16), np.eye(4)), tmp_path / 'none.nii.gz')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'dir' / 'x.png').mkdir(parents=True)                       # a folder named like a slice
    inputs = [tmp_path / 'mixed', tmp_path / 'cut.nii.gz', tmp_path / 'nan.nii.gz', tmp_path / 'none.nii.gz', tmp_path / 'empty',
              tmp_path / 'dir' / 'x.png']
    with pytest.raises(SystemExit) as e: main([str(model), *map(str, inputs), '--out', str(tmp_path / 'out')])
    assert e.value.code == SKIPPED
    with open(tmp_path / 'out' / 'skipped.csv') as f: skipped = {}; [skipped.setdefault(r['file'], r['reason']) for r in csv.DictReader(f)]
    name = lambda p: str(p)
    assert 'larger than' in skipped[name(mixed / '900.png')] or 'far larger' in skipped[name(mixed / '900.png')]
    assert 'unreadable PNG header' in skipped[name(mixed / '901.png')]
    assert 'truncated' in skipped[name(tmp_path / 'cut.nii.gz')] and 'no slices' in skipped[name(tmp_path / 'none.nii.gz')]
    assert 'no finite HU' in skipped[name(tmp_path / 'nan.nii.gz')]
    assert 'no PNG, DICOM or NIfTI' in skipped[name(tmp_path / 'empty')] and 'no PNG, DICOM or NIfTI' in skipped[name(tmp_path / 'dir' / 'x.png')]
    assert {r['source'].rsplit('/', 1)[1] for r in _rows(tmp_path / 'out')} == {p.name for p in pngs}     # the rest, predicted
    with pytest.raises(SystemExit) as e: main([str(model), str(tmp_path / 'empty'), '--out', str(tmp_path / 'nothing')])
    assert str(e.value.code).startswith('error: nothing to predict') and not (tmp_path / 'nothing').exists()


def test_learn_predict_on_a_slice_not_named_like_deeplesions(model, tiny_records, tmp_path):
    "learn.predict('slice.png') with a --context model: the key slice stands in for its neighbours, with one warning."
    learn = load_learner(model)
    rec = next(r for r in tiny_records if r.split == 'test')
    shutil.copy(rec.image_path, tmp_path / 'slice.png')
    (tmp_path / 'alone').mkdir()
    shutil.copy(rec.image_path, tmp_path / 'alone' / '050.png')           # numbered, but no neighbour beside it
    with pytest.warns(UserWarning, match='slice.png: its name is not a slice number') as w:
        (boxes, scores), _, _ = learn.predict(tmp_path / 'slice.png')
    assert len(w) == 1
    (boxes2, scores2), _, _ = learn.predict(tmp_path / 'alone' / '050.png')
    assert np.asarray(boxes).reshape(-1, 4).shape[0] == len(scores) > 0
    assert np.allclose(np.asarray(boxes), np.asarray(boxes2)) and np.allclose(scores, scores2)


def test_dicom_files_without_positions_follow_their_numbers_and_another_size_is_another_series(tmp_path):
    pydicom = pytest.importorskip('pydicom')
    uid, img = pydicom.uid.generate_uid(), np.full((8, 8), 32768, np.uint16)
    for name, z, number in (('a', 0., 3), ('b', 5., 1), ('c', None, 2)):      # c lacks its position: numbers order all three
        _write_dicom(tmp_path / f'{name}.dcm', img, z or 0., uid, InstanceNumber=number)
    ds = pydicom.dcmread(tmp_path / 'c.dcm')
    del ds.ImagePositionPatient, ds.ImageOrientationPatient            # nor its orientation: it joins its UID's stack all the same
    ds.save_as(tmp_path / 'c.dcm')
    _write_dicom(tmp_path / 'd.dcm', np.full((6, 6), 32768, np.uint16), 10., uid)      # another stack under the same UID
    series, skipped = read_dicom_series(sorted(tmp_path.glob('*.dcm')))
    assert skipped == [] and sorted(len(s) for s in series) == [1, 3]
    assert [Path(f).stem for f in next(s for s in series if len(s) == 3).files] == ['b', 'c', 'a']


@pytest.mark.parametrize('orientation, stored', [([1., 0, 0, 0, 1, 0], lambda a: a),                     # as DeepLesion shows it
                                                 ([-1., 0, 0, 0, -1, 0], lambda a: a[::-1, ::-1]),     # prone: turned half a turn
                                                 ([-1., 0, 0, 0, 1, 0], lambda a: a[:, ::-1]),         # left and right swapped
                                                 ([0., 1, 0, 1, 0, 0], lambda a: a.T)])                # rows and columns swapped
def test_a_dicom_slice_is_shown_as_deeplesion_shows_one_however_it_is_stored(tmp_path, orientation, stored):
    pydicom = pytest.importorskip('pydicom')
    shown = np.arange(6 * 8, dtype=np.uint16).reshape(6, 8) + 32768       # anterior at the top, the patient's left on the right
    _write_dicom(tmp_path / 'a.dcm', np.ascontiguousarray(stored(shown)), 0., pydicom.uid.generate_uid(), spacing=(.7, .8),
                 ImageOrientationPatient=orientation)
    (series,), _ = read_dicom_series([tmp_path / 'a.dcm'])
    assert np.array_equal(series.hu(0), shown.astype(np.float32) - 32768)
    assert series.spacing == ((.8, .7) if orientation[1] else (.7, .8))   # (row, column) of the slice as shown
