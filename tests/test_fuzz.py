"""A seeded fuzz of DL_info.csv and of the slice PNGs, each mutation run through `finetune`: a bad input
is one `error:` line naming the file (and for the CSV its line), never a traceback, and no --out; a
mutation that is still valid DeepLesion trains exactly as the clean set does."""
import csv
import json
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import finetune.__main__ as finetune_cli
from lesion_fastai.deeplesion import COLUMNS, read_dl_info

ARGS = ['--epochs', '1', '--bs', '2', '--size', '32', '--context', '0']
NAN8 = 'nan, 1, 2, 3, 4, 5, 6, 7'
# per column, values DeepLesion never holds and the pipeline cannot use (the tiny set's slices are 64 x 64)
BAD = {
    'File_name': ['x.png', '', '000001_01_01.png', '1_2_3_4.jpg', '000001_01_01_-1.png'],
    'Patient_index': ['nan', '1.5', '9999999999999999999999999', '', 'a'],
    'Study_index': ['inf', '-', '99999999999999999999'],
    'Series_ID': ['1e3', ' '],
    'Key_slice_index': ['nan', '3.0', '99999999999999999999999'],
    'Measurement_coordinates': [NAN8, 'inf, 1, 2, 3, 4, 5, 6, 7', '1e308, 1, 2, 3, 4, 5, 6, 7', '1, 2, 3', '500, 1, 2, 3, 4, 5, 6, 7'],
    'Bounding_boxes': ['nan, 1, 5, 5', 'inf, 1, 5, 5', '1, 1, 5, -inf', '100, 100, 120, 130', '-50, -40, -10, -5', '0, 0, 1000, 1000',
                       '-7, 5, 10, 12', '5, 5, 5, 9', '10, 10, 2, 2', '1e308, 1, 2, 3'],
    'Lesion_diameters_Pixel_': ['nan, 1', 'inf, 1', '1e308, 1', '-5, 1', '3'],
    'Normalized_lesion_location': ['nan, 0.5, 0.5', '2, 0.5, 0.5', '-1, 0.5, 0.5', '1e308, 0.5, 0.5', 'inf, 0, 0'],
    'Coarse_lesion_type': ['99', '0', 'nan', '1.5', '9', '-2'],
    'Possibly_noisy': ['2', 'yes', ''],
    'Slice_range': ['inf, 5', 'inf, inf', '-inf, 3', '1, 2', '900, 901', '5, 1', '1.5, 300'],
    'Spacing_mm_px_': ['0, 0.8, 5', '-0.8, 0.8, 5', 'nan, 0.8, 5', '0.8, 0.8, inf', '0.8, 0.8, 0', '1e308, 1, 1'],
    'Image_size': ['inf, 64', '0, 0', '-64, 64', '100000, 64', '64.5, 64', 'nan, 64'],
    'DICOM_windows': ['nan, 100', '300, 100', '100, 100', 'inf, 5', '1, -inf'],
    'Patient_age': ['abc', '1,2'],
    'Train_Val_Test': ['4', '0', 'a', '', '1.0'],
}
ANY_FIELD = ['a\x00b', 'a\nb', 'x' * 200_000]


def _rows(path):
    with open(path, newline='') as f: return list(csv.reader(f))


def _write(path, rows, **kw):
    with open(path, 'w', newline='', **kw) as f: csv.writer(f).writerows(rows)


def _csv_cases(n_rows: int, seed: int = 0) -> list:
    """(id, rows -> rows) mutations: every BAD value on a random row, every ANY_FIELD value in a random
    column, and then random (row, column, BAD value) draws up to 110 field cases."""
    rng = np.random.default_rng(seed)
    cases = []

    def field(r, col, value):
        def mutate(rows):
            rows[r + 1][COLUMNS.index(col)] = value
            return rows
        named = col if len(value) < 131072 else None        # a field over the csv limit: no column is parsed to name
        return (f'{col}={value[:20]!r} row {r}', mutate, named)
    for col, values in BAD.items():
        for v in values: cases.append(field(int(rng.integers(n_rows)), col, v))
    for v in ANY_FIELD: cases.append(field(int(rng.integers(n_rows)), COLUMNS[int(rng.integers(len(COLUMNS)))], v))

    def huge_patient(rows):                                  # the index and File_name's patient agree, both too large
        row = rows[1 + int(rng.integers(n_rows))]
        row[1] = '9999999999999999999999999'
        row[0] = '9999999999999999999999999_' + row[0].split('_', 1)[1]
        return rows
    cases.append(('Patient_index and File_name patient 9999999999999999999999999', huge_patient, 'Patient_index'))
    while len(cases) < 110:
        col = list(BAD)[int(rng.integers(len(BAD)))]
        cases.append(field(int(rng.integers(n_rows)), col, BAD[col][int(rng.integers(len(BAD[col])))]))
    return cases


def _whole_file_cases() -> list:
    "(id, path -> None, what the error says) mutations of the file as a whole."
    def rewrite(fn):
        def go(path):
            rows = _rows(path)
            fn(rows, path)
        return go
    swap = [COLUMNS[1], COLUMNS[0], *COLUMNS[2:]]
    no_test = lambda rows, p: _write(p, [rows[0]] + [r for r in rows[1:] if r[17] != '3'])
    return [
        ('UTF-16', rewrite(lambda rows, p: _write(p, rows, encoding='utf-16')), r'not UTF-8 text'),
        ('Latin-1 byte', lambda p: p.write_bytes(p.read_bytes().replace(b'M,', b'\xe9,', 1)), r'not UTF-8 text'),
        ('swapped header columns', rewrite(lambda rows, p: _write(p, [swap] + rows[1:])), r'the right names in another order'),
        ('a header column twice', rewrite(lambda rows, p: _write(p, [rows[0] + [rows[0][3]]] + [r + ['1'] for r in rows[1:]])),
         r'Series_ID more than once; expected each of the 18 once'),
        ('a header column missing', rewrite(lambda rows, p: _write(p, [rows[0][:-1]] + rows[1:])), r"missing \['Train_Val_Test'\]"),
        ('a row with a field more', rewrite(lambda rows, p: _write(p, rows[:3] + [rows[3] + ['x']] + rows[4:])), r'line 4: row has 19 fields'),
        ('a truncated last row', lambda p: p.write_bytes(p.read_bytes().rstrip(b'\r\n')[:-30]), r'line \d+: row has \d+ fields|line \d+: '),
        ('an empty file', lambda p: p.write_bytes(b''), r'header is not DeepLesion'),
        ('the header only', rewrite(lambda rows, p: _write(p, rows[:1])), r'no lesion rows'),
        ('no test rows', rewrite(no_test), r'test \(3\) slices .* it has \d+, \d+ and 0'),
        ('an unclosed quote', lambda p: p.write_bytes(p.read_bytes().replace(b'\n', b'\n"', 1) + b'x' * 200_000), r'line \d+'),
    ]


def _tiny_set(tmp_path_factory, neighbours: int):
    "8 patients at 64 px with `neighbours` unlabelled slices on each side of a key slice."
    from lesion_fastai.synthetic import generate
    root = tmp_path_factory.mktemp(f'fuzz{neighbours}n') / 'data'
    generate(root, patients=8, size=64, seed=5, neighbours=neighbours)
    return root


@pytest.fixture(scope='module')
def clean(tmp_path_factory):
    "The tiny set, key slices only."
    return _tiny_set(tmp_path_factory, 0)


def _case_dir(clean, tmp_path):
    "A data folder with its own DL_info.csv beside the clean set's slices."
    d = tmp_path / 'data'
    d.mkdir()
    shutil.copy(clean / 'DL_info.csv', d / 'DL_info.csv')
    (d / 'Images_png').symlink_to(clean / 'Images_png')
    return d


def _refused(data, tmp_path, names: str):
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as e: finetune_cli.main(['--data', str(data), '--out', str(out), *ARGS])
    code = e.value.code
    assert isinstance(code, str) and code.startswith('error: ') and code.count('error:') == 1, code    # exit 1, one error
    assert 'Traceback' not in code
    assert names in code, code
    assert not out.exists()
    return code


N_ROWS = 12          # the rows the fuzz draws from (the tiny set has at least these)


@pytest.mark.parametrize('case', _csv_cases(N_ROWS), ids=lambda c: c[0])
def test_a_bad_field_is_an_error_naming_file_line_and_field(case, clean, tmp_path):
    name, mutate, column = case
    data = _case_dir(clean, tmp_path)
    rows = _rows(data / 'DL_info.csv')
    assert len(rows) > N_ROWS
    _write(data / 'DL_info.csv', mutate(rows))
    code = _refused(data, tmp_path, str(data / 'DL_info.csv'))
    assert ' line ' in code
    if column: assert column in code and 'expected' in code, code       # the field, and what it may hold


@pytest.mark.parametrize('case', _whole_file_cases(), ids=lambda c: c[0])
def test_a_bad_file_is_an_error_naming_it(case, clean, tmp_path):
    import re
    name, mutate, message = case
    data = _case_dir(clean, tmp_path)
    mutate(data / 'DL_info.csv')
    code = _refused(data, tmp_path, 'DL_info.csv')
    assert re.search(message, code), code


def test_a_bom_is_read_as_utf8(clean, tmp_path):
    data = _case_dir(clean, tmp_path)
    (data / 'DL_info.csv').write_bytes(b'\xef\xbb\xbf' + (clean / 'DL_info.csv').read_bytes())
    read = lambda p: read_dl_info(p).drop(columns='image_path')          # the rest, with the slices' paths under each folder
    assert read(data / 'DL_info.csv').equals(read(clean / 'DL_info.csv'))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)


def _png_header_only(w: int, h: int) -> bytes:
    "A 16-bit greyscale PNG whose header says w x h and whose pixel data is a few bytes."
    return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, 0, 0, 0, 0))
            + _png_chunk(b'IDAT', zlib.compress(b'\x00' * 64)) + _png_chunk(b'IEND', b''))


def _ztxt_bomb(path):
    "A valid 16-bit slice with a zTXt chunk that inflates to 200 MB."
    info = PngImagePlugin.PngInfo()
    info.add_text('comment', 'x', zip=True)
    raw = path.read_bytes()
    bomb = _png_chunk(b'zTXt', b'comment\x00\x00' + zlib.compress(b'\x00' * 200_000_000, 9))
    path.write_bytes(raw[:33] + bomb + raw[33:])     # after the signature and IHDR


def _png_cases(seed: int = 0) -> list:
    "(id, path -> None) mutations of one slice file: 14 by hand and 20 seeded byte flips."
    rng = np.random.default_rng(seed)
    cases = [
        ('0 bytes', lambda p: p.write_bytes(b'')),
        ('first 7 bytes', lambda p: p.write_bytes(p.read_bytes()[:7])),
        ('header only', lambda p: p.write_bytes(p.read_bytes()[:33])),
        ('truncated to half', lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])),
        ('no IEND', lambda p: p.write_bytes(p.read_bytes()[:-12])),
        ('8-bit', lambda p: Image.new('L', (64, 64)).save(p)),
        ('RGB', lambda p: Image.new('RGB', (64, 64)).save(p)),
        ('1-bit', lambda p: Image.new('1', (64, 64)).save(p)),
        ('palette', lambda p: Image.new('P', (64, 64)).save(p, format='PNG')),
        ('JPEG named .png', lambda p: Image.new('L', (64, 64)).save(p, format='JPEG')),
        ('a text file', lambda p: p.write_text('not an image\n')),
        ('30000 x 30000 header', lambda p: p.write_bytes(_png_header_only(30000, 30000))),
        ('5000 x 5000 header', lambda p: p.write_bytes(_png_header_only(5000, 5000))),
        ('zTXt bomb', _ztxt_bomb),
    ]

    def flip(at: float, bit: int):
        def go(p):
            b = bytearray(p.read_bytes())
            i = 8 + int(at * (len(b) - 8 - 12))                 # past the signature, before IEND
            b[i] ^= 1 << bit
            p.write_bytes(bytes(b))
        return go
    cases += [(f'bit {b} flipped at {a:.3f}', flip(a, b)) for a, b in zip(rng.random(20), rng.integers(0, 8, 20))]
    return cases


@pytest.mark.parametrize('split', ['train', 'val', 'test'])
@pytest.mark.parametrize('case', _png_cases(), ids=lambda c: c[0])
def test_a_bad_slice_is_an_error_naming_it(case, split, clean, tmp_path):
    name, mutate = case
    data = tmp_path / 'data'
    shutil.copytree(clean, data)
    df = read_dl_info(data / 'DL_info.csv')
    path = df[df.split == split].iloc[0].image_path
    mutate(__import__('pathlib').Path(path))
    _refused(data, tmp_path, path)


@pytest.fixture(scope='module')
def with_neighbours(tmp_path_factory):
    "The tiny set with one unlabelled slice on each side of every key slice."
    return _tiny_set(tmp_path_factory, 1)


@pytest.mark.parametrize('cache', ['memory', 'none'])
def test_a_bombed_neighbour_slice_is_named_before_it_is_decoded(with_neighbours, tmp_path, cache):
    data = tmp_path / 'data'
    shutil.copytree(with_neighbours, data)
    row = read_dl_info(data / 'DL_info.csv').iloc[0]
    neighbour = __import__('pathlib').Path(row.image_path).with_name(f'{row.key_slice + 1:03d}.png')
    assert neighbour.exists()
    neighbour.write_bytes(_png_header_only(30000, 30000))
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as e:
        finetune_cli.main(['--data', str(data), '--out', str(out), '--epochs', '1', '--bs', '2', '--size', '32', '--context', '1',
                           '--cache', cache])
    assert str(neighbour) in e.value.code and '30000 x 30000' in e.value.code and 'Traceback' not in e.value.code, e.value.code
    assert not out.exists()


# mutations that are still valid DeepLesion: the same training as the clean set
VALID = [
    ('LF line endings (the csv module writes CRLF)', lambda p: p.write_bytes(p.read_bytes().replace(b'\r\n', b'\n'))),
    ('spaces around numbers', lambda p: _write(p, [rows[0]] + [[f'  {c} ' if i in (6, 12) else c for i, c in enumerate(r)] for r in rows[1:]])
     if (rows := _rows(p)) else None),
    ('a repeated row', lambda p: _write(p, (rows := _rows(p))[:4] + [rows[3]] + rows[4:])),
    ('a BOM', lambda p: p.write_bytes(b'\xef\xbb\xbf' + p.read_bytes())),
]


@pytest.mark.slow
def test_valid_mutations_train_as_the_clean_set_does(clean, tmp_path):
    def run(data, out):
        finetune_cli.main(['--data', str(data), '--out', str(out), *ARGS])
        m = json.loads((out / 'metrics.json').read_text())
        return m['valid']['froc'], m['test']['froc'], (out / 'history.csv').read_text().splitlines()[1].split(',')[:4]
    reference = run(clean, tmp_path / 'clean')
    for name, mutate in VALID:
        data = tmp_path / name.replace(' ', '_') / 'data'
        data.parent.mkdir()
        shutil.copy(clean / 'DL_info.csv', data.parent / 'x.csv')
        data.mkdir()
        shutil.move(data.parent / 'x.csv', data / 'DL_info.csv')
        (data / 'Images_png').symlink_to(clean / 'Images_png')
        mutate(data / 'DL_info.csv')
        assert (data / 'DL_info.csv').read_bytes() != (clean / 'DL_info.csv').read_bytes(), name
        assert run(data, data.parent / 'out') == reference, name
