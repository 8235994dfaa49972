"""The reader: real DeepLesion rows, malformed rows, HU pixels, windows, neighbours."""
import csv

import numpy as np
import pytest
from PIL import Image

from lesion_fastai.deeplesion import (COLUMNS, HU_OFFSET, WINDOWS, context_paths, image_path, list_slices, load_hu,
                                      read_dl_info, resolve_windows, save_hu, slice_records, window)


def test_real_sample_counts(sample_csv):
    df = read_dl_info(sample_csv)
    assert len(df) == 158
    assert df.file_name.nunique() == 152
    assert df.split.value_counts().to_dict() == {'train': 105, 'val': 18, 'test': 35}
    assert len(slice_records(df)) == 152
    assert (df.x2 >= df.x1).all() and (df.y2 >= df.y1).all()
    assert set(df.columns) >= {'x1', 'y1', 'x2', 'y2', 'long_x1', 'short_y2', 'diameter_long_px', 'location_z', 'slice_first',
                               'slice_last', 'spacing_x_mm', 'spacing_z_mm', 'width', 'height', 'window_low', 'window_high',
                               'lesion_type', 'noisy', 'gender', 'age', 'split', 'image_path', 'series_dir'}


def test_real_sample_first_row_typed(sample_csv):
    r = read_dl_info(sample_csv).iloc[0]
    assert r.file_name == '000089_01_01_037.png' and r.patient == 89 and r.key_slice == 37
    assert (r.x1, r.y1, r.x2, r.y2) == (132.977, 171.808, 165.939, 214.029)
    assert (r.slice_first, r.slice_last, r.spacing_z_mm) == (31, 43, 5.0)
    assert (r.window_low, r.window_high) == (-175., 275.) and r.split == 'train' and r.age == 71.
    assert r.image_path.endswith('Images_png/000089_01_01/037.png')


def test_multi_lesion_slices_keep_all_boxes(sample_csv):
    df = read_dl_info(sample_csv)
    recs = slice_records(df)
    multi = [r for r in recs if len(r.boxes) > 1]
    assert len(multi) == 6  # 158 rows on 152 slices: six slices with two lesions
    assert sum(len(r.boxes) for r in recs) == 158
    for r in multi:
        rows = df[df.file_name == r.file_name]
        assert np.array_equal(r.boxes, rows[['x1', 'y1', 'x2', 'y2']].to_numpy(np.float32)) and r.lines == tuple(rows.line)


def test_every_row_of_the_official_test_split_is_read_strictly(test_split_csv, caplog):
    with caplog.at_level('INFO', logger='lesion_fastai'):
        df = read_dl_info(test_split_csv)
    assert len(df) == 4927 and sorted(df.line) == list(range(2, 4929))        # every row, none skipped
    clipped = [m for m in caplog.messages if 'clipped to the slice border' in m]
    assert len(clipped) == 1 and clipped[0].endswith('line 4642')             # 489.818, 252.689, 513.681, 284.578 on 512 px
    r = df[df.line == 4642].iloc[0]
    assert (r.x1, r.y1, r.x2, r.y2) == (489.818, 252.689, 512., 284.578)
    assert (df.x1 >= 0).all() and (df.y1 >= 0).all() and (df.x2 <= df.width).all() and (df.y2 <= df.height).all()


def test_official_test_split_statistics(test_split_csv):
    from lesion_fastai.deeplesion import evaluation_records, lesion_statistics
    df = read_dl_info(test_split_csv)
    stats = lesion_statistics(df)
    assert (stats['lesions'], stats['key_slices'], df.patient.nunique(), int(df.noisy.sum())) == (4927, 4831, 665, 15)
    assert set(df.split) == {'test'} and stats['labelled_lesions'] == 4927
    evaluated = evaluation_records(slice_records(df), 'test')     # the protocol's counts (DEEPLESION.md): noisy lesions dropped
    assert (len(evaluated), sum(len(r.boxes) for r in evaluated)) == (4817, 4912)


@pytest.mark.parametrize('box,kept', [('-3, 5, 10, 12', (0., 5., 10., 12.)), ('50, 60, 69.5, 70', (50., 60., 64., 64.)),
                                      ('0, 0, 64, 64', (0., 0., 64., 64.))])
def test_a_box_a_few_pixels_past_the_border_is_clipped_to_the_slice(sample_csv, tmp_path, box, kept, caplog):
    rows = list(csv.reader(open(sample_csv)))[:3]
    for r in rows[1:]: r[COLUMNS.index('Image_size')] = '64, 64'; r[COLUMNS.index('Measurement_coordinates')] = '10, 10, 20, 20, 12, 18, 18, 12'
    rows[1][COLUMNS.index('Bounding_boxes')] = box
    rows[2][COLUMNS.index('Bounding_boxes')] = '10, 10, 20, 20'
    path = tmp_path / 'DL_info.csv'
    with open(path, 'w', newline='') as f: csv.writer(f).writerows(rows)
    with caplog.at_level('INFO', logger='lesion_fastai'): df = read_dl_info(path)
    assert tuple(df.iloc[0][['x1', 'y1', 'x2', 'y2']]) == kept and tuple(df.iloc[1][['x1', 'y1', 'x2', 'y2']]) == (10., 10., 20., 20.)
    clipped = [m for m in caplog.messages if 'clipped' in m]
    assert clipped == ([] if kept == (0., 0., 64., 64.) else [f"{path}: 1 box(es) clipped to the slice border (at most 6 px past it): line 2"])


@pytest.mark.parametrize('box,message', [('-7, 5, 10, 12', 'is not inside the 64 x 64 slice'), ('60, 5, 70.5, 12', 'is not inside'),
                                         ('64, 5, 69, 12', 'lies outside the 64 x 64 slice'), ('-6, -6, 0, 0', 'lies outside')])
def test_a_box_far_outside_or_beside_the_slice_stays_an_error(sample_csv, tmp_path, box, message):
    path = _csv_with(sample_csv, tmp_path, 0, 'Bounding_boxes', box)
    rows = list(csv.reader(open(path)))
    rows[1][COLUMNS.index('Image_size')] = '64, 64'; rows[1][COLUMNS.index('Measurement_coordinates')] = '10, 10, 20, 20, 12, 18, 18, 12'
    with open(path, 'w', newline='') as f: csv.writer(f).writerows(rows)
    with pytest.raises(ValueError, match=f'line 2: Bounding_boxes .*{message}'): read_dl_info(path)


def test_image_path_layout():
    assert image_path('000001_01_01_109.png', '/d').as_posix() == '/d/Images_png/000001_01_01/109.png'
    assert image_path('000001_01_01_007.png').as_posix() == 'Images_png/000001_01_01/007.png'


def _csv_with(sample_csv, tmp_path, row_index, column, value, header=None):
    rows = list(csv.reader(open(sample_csv)))
    if header is not None: rows[0] = header
    if column is not None: rows[row_index + 1][COLUMNS.index(column)] = value
    path = tmp_path / 'DL_info.csv'
    with open(path, 'w', newline='') as f: csv.writer(f).writerows(rows)
    return path


@pytest.mark.parametrize('column,value,message', [
    ('Bounding_boxes', '1, 2, 3', 'Bounding_boxes has 3 numbers, expected 4'),
    ('Measurement_coordinates', '1, 2, 3, 4', 'Measurement_coordinates has 4 numbers, expected 8'),
    ('Bounding_boxes', '50, 10, 40, 20', 'x2 < x1'),
    ('Train_Val_Test', '4', "Train_Val_Test '4' is unknown"),
    ('Spacing_mm_px_', 'a, b, c', 'Spacing_mm_px_'),
    ('Key_slice_index', '12', 'disagrees'),
    ('Patient_age', 'old', 'Patient_age'),
])
def test_malformed_row_names_file_line_and_field(sample_csv, tmp_path, column, value, message):
    path = _csv_with(sample_csv, tmp_path, 16, column, value)  # 17th data row = line 18
    with pytest.raises(ValueError) as e: read_dl_info(path)
    assert str(path) in str(e.value) and 'line 18' in str(e.value) and message in str(e.value)


def test_wrong_header(sample_csv, tmp_path):
    header = list(COLUMNS); header[6] = 'Boxes'
    with pytest.raises(ValueError, match=r"line 1: header .*missing \['Bounding_boxes'\]"):
        read_dl_info(_csv_with(sample_csv, tmp_path, 0, None, None, header=header))


def test_non_strict_skips_bad_rows_with_one_warning(sample_csv, tmp_path):
    path = _csv_with(sample_csv, tmp_path, 3, 'Bounding_boxes', '1, 2')
    with pytest.warns(UserWarning, match=r'(?s)skipped 1 bad row.*line 5: Bounding_boxes has 2 numbers') as w:
        df = read_dl_info(path, strict=False)
    assert len(w) == 1 and len(df) == 157


def test_missing_age_is_allowed(sample_csv, tmp_path):
    df = read_dl_info(_csv_with(sample_csv, tmp_path, 0, 'Patient_age', ''))
    assert np.isnan(df.age[0]) and df.age[1:].notna().all()


def test_hu_round_trip_exact_any_size(tmp_path):
    rng = np.random.default_rng(0)
    for shape in [(64, 64), (48, 96)]:
        hu = rng.integers(-HU_OFFSET, HU_OFFSET - 1, size=shape).astype(np.float32)
        save_hu(tmp_path / 'x.png', hu)
        with Image.open(tmp_path / 'x.png') as im: assert im.mode.startswith('I;16')
        back = load_hu(tmp_path / 'x.png')
        assert back.shape == shape and back.dtype == np.float32 and np.array_equal(back, hu)


@pytest.mark.parametrize('mode', ['L', 'RGB'])
def test_8bit_png_is_rejected(tmp_path, mode):
    Image.new(mode, (8, 8)).save(tmp_path / 'x.png')
    with pytest.raises(ValueError, match=r"x.png.*expected a 16-bit"): load_hu(tmp_path / 'x.png')


def test_windows():
    hu = np.array([-2000., -150., 50., 250., 5000.])
    assert np.allclose(window(hu, *WINDOWS['soft']), [0, 0, .5, 1, 1])
    assert resolve_windows('soft,lung') == [WINDOWS['soft'], WINDOWS['lung']]
    assert resolve_windows(['dicom', '-100:100'], (-175, 275)) == [(-175., 275.), (-100., 100.)]
    with pytest.raises(ValueError, match='unknown window'): resolve_windows('brain')
    with pytest.raises(ValueError, match='needs the row'): resolve_windows('dicom')


def test_neighbours_fall_back_to_nearest_shipped_slice(tmp_path):
    d = tmp_path / 'Images_png' / '000001_01_01'
    for k in (10, 11, 13): save_hu(d / f'{k:03d}.png', np.zeros((4, 4)))
    key = d / '011.png'
    assert [p.name for p in context_paths(key, 1)] == ['010.png', '011.png', '011.png']
    # 012 is missing: its nearest shipped slices are 011 (key) and 013, ties go towards the key slice
    assert [p.name for p in context_paths(key, 2)] == ['010.png', '010.png', '011.png', '011.png', '013.png']
    assert [p.name for p in context_paths(d / '010.png', 1)] == ['010.png', '010.png', '011.png']


def test_list_slices(tiny_data):
    from lesion_fastai.deeplesion import read_dl_info
    df = read_dl_info(tiny_data / 'DL_info.csv')
    every = list_slices(tiny_data)
    train = list_slices(tiny_data, set(df[df.split == 'train'].patient))
    assert len(every) > df.file_name.nunique()          # neighbours are listed too
    assert 0 < len(train) < len(every)
    with pytest.raises(FileNotFoundError, match='Images_png'): list_slices(tiny_data / 'nope')
