"""The built-in generator writes DeepLesion's layout, and the reader reads it back."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesion_fastai.deeplesion import list_slices, load_hu, read_dl_info
from lesion_fastai.synthetic import generate, main


def test_round_trip_layout(tiny_data):
    df = read_dl_info(tiny_data / 'DL_info.csv')
    assert len(df.columns) == 39 and df.file_name.nunique() < len(df)   # some slices carry several lesions
    assert list(df.line) == list(range(2, len(df) + 2))               # each row's line in DL_info.csv
    for path in set(df.image_path):
        with Image.open(path) as im: assert im.mode.startswith('I;16') and im.size == (64, 64)
    assert ((df.x1 >= 0) & (df.y1 >= 0) & (df.x2 <= df.width) & (df.y2 <= df.height) & (df.x1 < df.x2) & (df.y1 < df.y2)).all()
    by_patient = df.groupby('patient').split.nunique()
    assert (by_patient == 1).all()                       # a patient is in one split only
    assert set(df.split) == {'train', 'val', 'test'}
    assert (df.lesion_type[df.split == 'train'] == -1).all() and (df.lesion_type[df.split != 'train'] > 0).all()
    assert df.groupby('file_name').size().between(1, 3).all()


def test_neighbours_are_shipped_but_unlabeled(tiny_data):
    df = read_dl_info(tiny_data / 'DL_info.csv')
    every = {str(p) for p in list_slices(tiny_data)}
    keys = set(df.image_path)
    assert keys < every
    for r in df.itertuples():  # Slice_range names shipped slices around the key slice
        assert r.slice_first < r.key_slice < r.slice_last
        assert str(tiny_data / 'Images_png' / r.series_dir / f'{r.slice_first:03d}.png') in every


def test_lesions_are_visible_with_ct_contrast(tiny_data):
    """A lesion's centre differs from the surrounding ring by tens of HU; the image has air and body."""
    df = read_dl_info(tiny_data / 'DL_info.csv')
    contrasts = []
    for r in df.itertuples():
        hu = load_hu(r.image_path)
        cx, cy = int((r.long_x1 + r.long_x2) / 2), int((r.long_y1 + r.long_y2) / 2)
        assert hu.min() < -800 and hu.max() > 100
        centre = hu[cy, cx]
        contrasts.append(abs(centre - np.median(hu[max(0, int(r.y1) - 2):int(r.y2) + 3, max(0, int(r.x1) - 2):int(r.x2) + 3])))
    assert np.median(contrasts) > 10


def test_deterministic_for_a_seed_and_any_number_of_workers(tmp_path):
    a = generate(tmp_path / 'a', patients=3, size=32, seed=7, noisy=.5)
    b = generate(tmp_path / 'b', patients=3, size=32, seed=7, noisy=.5, workers=2)
    assert a.read_text() == b.read_text()
    pa, pb = list_slices(tmp_path / 'a'), list_slices(tmp_path / 'b')
    assert [p.relative_to(tmp_path / 'a') for p in pa] == [p.relative_to(tmp_path / 'b') for p in pb]
    assert all(np.array_equal(load_hu(x), load_hu(y)) for x, y in zip(pa, pb))
    assert '1' in pd.read_csv(a).Possibly_noisy.astype(str).values      # the noisy draws follow the rows, whoever wrote them
    c = generate(tmp_path / 'c', patients=3, size=32, seed=8)
    assert c.read_text() != a.read_text()


def test_refuses_to_overwrite_and_cli_errors(tmp_path, capsys):
    generate(tmp_path / 'd', patients=3, size=32, seed=0)
    with pytest.raises(FileExistsError, match='DL_info.csv exists'): generate(tmp_path / 'd', patients=3, size=32)
    with pytest.raises(SystemExit): main(['--out', str(tmp_path / 'e'), '--patients', '1'])
    assert '--patients must be at least 3' in capsys.readouterr().err


def test_an_interrupted_generation_leaves_nothing_and_a_killed_ones_folder_is_removed_by_the_next(tmp_path, monkeypatch):
    import lesion_fastai.synthetic as synthetic
    dead = tmp_path / '.data.999999999.generating'                       # a generation killed mid-way: its pid runs no more
    (dead / 'Images_png').mkdir(parents=True)
    (dead / '.lesion_fastai-synthetic').touch()
    (tmp_path / '.data.999999998.generating').mkdir()                   # named so, but not made here: left alone
    real, calls = synthetic._write_patient, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2: raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(synthetic, '_write_patient', interrupted)
    with pytest.raises(KeyboardInterrupt): generate(tmp_path / 'data', patients=4, size=32, seed=0, neighbours=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.data.999999998.generating']   # neither its own nor the dead one's
    monkeypatch.setattr(synthetic, '_write_patient', real)
    generate(tmp_path / 'data', patients=4, size=32, seed=0, neighbours=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.data.999999998.generating', 'data']


def test_a_generation_into_what_an_interrupted_one_left_replaces_it_rather_than_nesting(tmp_path):
    left = tmp_path / 'data' / 'Images_png' / '000001_01_01'                # images moved, the table never was
    left.mkdir(parents=True)
    (left / 'stale.png').write_bytes(b'')
    generate(tmp_path / 'data', patients=4, size=32, seed=0, neighbours=0)
    assert (tmp_path / 'data' / 'DL_info.csv').exists() and not (tmp_path / 'data' / 'Images_png' / 'Images_png').exists()
    assert not (left / 'stale.png').exists() and len(list_slices(tmp_path / 'data')) == len(read_dl_info(tmp_path / 'data' / 'DL_info.csv'))
