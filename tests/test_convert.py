"""python -m lesion_fastai.convert on tiny NIfTI phantoms: boxes, key slices, spacing and orientation against known
spheres, strict reading of what it writes, the split, skipped and empty lesions, resume, and its named errors."""
import json
import subprocess
import sys

import numpy as np
import pytest

nib = pytest.importorskip('nibabel')

import lesion_fastai.convert as convert_mod
from lesion_fastai.convert import Options, assign_splits, convert, main, read_split, recist
from lesion_fastai.deeplesion import COLUMNS, load_hu, read_dl_info

SHAPE = (48, 48, 24)                  # voxels: x, y, z
SPACING = (.8, .8, 2.5)               # mm: in-plane pixels, slice interval
EXTENT = [(n - 1) * s for n, s in zip(SHAPE, SPACING)]
RAS = np.diag([*SPACING, 1.])
# The same world box stored in LPS order (DICOM's): axis 0 runs toward the patient's left, axis 1 toward posterior.
LPS = np.array([[-.8, 0, 0, EXTENT[0]], [0, -.8, 0, EXTENT[1]], [0, 0, 2.5, 0], [0, 0, 0, 1]])
BODY_HU, ORGAN_HU, LESION_HU = 40, 60, 10
CENTRE = (24 * .8, 24 * .8, 12 * 2.5)  # world mm of voxel (24, 24, 12) under RAS: a sphere there is voxel-centred


def phantom(spheres, affine=RAS, shape=SHAPE, organ=True):
    """HU volume (air -1000, a body ellipse of 40 HU) and mask (an organ as label 1, `spheres` as label 2): spheres
    are (world centre mm, radius mm) in RAS+ world coordinates (x toward the patient's right, y anterior, z superior)."""
    ijk = np.indices(shape).reshape(3, -1).astype(float)
    x, y, z = (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape(3, *shape)
    cx, cy = (shape[0] - 1) * .4, (shape[1] - 1) * .4
    hu, mask = np.full(shape, -1000, np.int16), np.zeros(shape, np.uint8)
    hu[((x - cx) / (.9 * cx)) ** 2 + ((y - cy) / (.8 * cy)) ** 2 <= 1] = BODY_HU
    if organ:
        liver = ((x - 1.6 * cx) / (.3 * cx)) ** 2 + ((y - cy) / (.3 * cy)) ** 2 <= 1
        hu[liver], mask[liver] = ORGAN_HU, 1
    for (sx, sy, sz), r in spheres:
        inside = (x - sx) ** 2 + (y - sy) ** 2 + (z - sz) ** 2 <= r ** 2
        hu[inside], mask[inside] = LESION_HU, 2
    return hu, mask


def save_pair(root, name, hu, mask, affine=RAS, mask_affine=None):
    "Write `name`.nii.gz into root/imagesTr and root/labelsTr, as MSD lays them out."
    for folder, a, aff in (('imagesTr', hu, affine), ('labelsTr', mask, affine if mask_affine is None else mask_affine)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(a, aff), str(root / folder / f'{name}.nii.gz'))


def run(root, out, opts=Options(organ_values=(1,)), **kw):
    return convert(root / 'imagesTr', root / 'labelsTr', out, opts, **kw)


def test_box_key_slice_spacing_and_rows_read_strictly(tmp_path):
    r = 6.
    save_pair(tmp_path, 'liver_0', *phantom([(CENTRE, r)]))
    (tmp_path / 'imagesTr' / '._liver_0.nii.gz').write_bytes(b'\x00\x05\x16\x07 macOS resource fork')   # junk to ignore
    totals = run(tmp_path, tmp_path / 'out')
    df = read_dl_info(tmp_path / 'out' / 'DL_info.csv', strict=True)
    assert len(df) == totals['lesions'] == 1 and totals['skipped'] == 0          # the organ (label 1) is no lesion
    row = df.iloc[0]
    col, line, key = SHAPE[0] - 1 - 24, SHAPE[1] - 1 - 24, SHAPE[2] - 12      # display column, row, 1-based slice from the top
    assert row.key_slice == key and row.file_name == f'000001_01_01_{key:03d}.png'
    half = r / SPACING[0]
    truth = (col - half - 5, line - half - 5, col + half + 5, line + half + 5)
    assert np.allclose([row.x1, row.y1, row.x2, row.y2], truth, atol=1)
    assert (row.spacing_x_mm, row.spacing_y_mm, row.spacing_z_mm) == pytest.approx(SPACING)
    assert (row.width, row.height) == SHAPE[:2] and (row.window_low, row.window_high) == (-175, 275) and row.lesion_type == -1
    assert row.diameter_long_px == pytest.approx(2 * half, abs=1.5) and row.diameter_short_px == pytest.approx(2 * half, abs=1.5)
    assert row.location_x == pytest.approx(col / SHAPE[0], abs=.02) and row.location_z == pytest.approx((key - 1) / (SHAPE[2] - 1), abs=1e-4)
    reach = int(30 / SPACING[2])                                                 # --neighbours-mm 30 at 2.5 mm slices
    assert (row.slice_first, row.slice_last) == (max(1, key - reach), min(SHAPE[2], key + reach))
    pngs = sorted(p.name for p in (tmp_path / 'out' / 'Images_png' / '000001_01_01').iterdir())
    assert pngs == [f'{s:03d}.png' for s in range(row.slice_first, row.slice_last + 1)]
    img = load_hu(row.image_path)
    assert img.shape == (SHAPE[1], SHAPE[0]) and img[line, col] == LESION_HU and img[0, 0] == -1000
    run(tmp_path, tmp_path / 'by_value', Options(label_values=(2,), lesion_type=4))     # naming the lesion value instead
    by_value = read_dl_info(tmp_path / 'by_value' / 'DL_info.csv', strict=True)
    assert by_value.lesion_type.tolist() == [4] and by_value.drop(columns=['lesion_type', 'image_path']).equals(df.drop(columns=['lesion_type', 'image_path']))
    volumes = (tmp_path / 'out' / 'volumes.csv').read_text().splitlines()
    assert volumes == ['volume,patient,split,slices_written,lesions_written,lesions_skipped,empty_mask', f'liver_0,1,train,{len(pngs)},1,0,0']


def test_recist_axes_of_a_rotated_ellipse_are_long_short_and_perpendicular():
    yy, xx = np.mgrid[0:60, 0:60]
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    u, v = (xx - 30) * c + (yy - 30) * s, -(xx - 30) * s + (yy - 30) * c
    rows, cols = np.nonzero((u / 15) ** 2 + (v / 6) ** 2 <= 1)
    long, short = recist(np.stack([cols, rows], 1), (.7, .7))
    dl, ds = long[1] - long[0], short[1] - short[0]
    assert np.linalg.norm(dl) == pytest.approx(30, abs=1.5) and np.linalg.norm(ds) == pytest.approx(12, abs=1.5)
    assert abs(dl @ ds) / np.linalg.norm(dl) / np.linalg.norm(ds) < .02


def test_orientation_is_radiological_and_independent_of_the_stored_axis_order(tmp_path):
    # A lesion on the patient's left (low RAS x), anterior (high y) and superior (high z).
    left_anterior_superior = ((6 * .8, 40 * .8, 19 * 2.5), 4.1)
    for name, affine in (('ras', RAS), ('lps', LPS)):
        save_pair(tmp_path / name, 'case', *phantom([left_anterior_superior], affine), affine)
        run(tmp_path / name, tmp_path / name / 'out')
    ras, lps = (read_dl_info(tmp_path / n / 'out' / 'DL_info.csv') for n in ('ras', 'lps'))
    row = ras.iloc[0]
    assert (row.x1 + row.x2) / 2 > SHAPE[0] * .75        # the patient's left on the image's right
    assert (row.y1 + row.y2) / 2 < SHAPE[1] * .25        # anterior at the top
    assert row.key_slice < SHAPE[2] / 2                  # slices numbered from the head
    assert load_hu(row.image_path)[int(SHAPE[1] - 1 - 40), int(SHAPE[0] - 1 - 6)] == LESION_HU
    assert ras.drop(columns='image_path').equals(lps.drop(columns='image_path'))
    for png in sorted((tmp_path / 'ras' / 'out' / 'Images_png' / '000001_01_01').iterdir()):
        assert np.array_equal(load_hu(png), load_hu(tmp_path / 'lps' / 'out' / 'Images_png' / '000001_01_01' / png.name)), png.name


# RAS+'s voxels stored slice axis first (z, x, y): the same world box, axes permuted
ZXY = np.array([[0, .8, 0, 0], [0, 0, .8, 0], [2.5, 0, 0, 0], [0, 0, 0, 1]])


def test_predict_reads_a_volume_as_convert_writes_it_whatever_the_stored_axis_order(tmp_path):
    from lesion_fastai.scans import find_inputs
    lesion = ((6 * .8, 40 * .8, 19 * 2.5), 4.1)                       # left, anterior, superior: no symmetry to hide a flip
    for name, affine, shape in (('ras', RAS, SHAPE), ('lps', LPS, SHAPE), ('zxy', ZXY, SHAPE[2:] + SHAPE[:2])):
        save_pair(tmp_path / name, 'case', *phantom([lesion], affine, shape), affine)
        run(tmp_path / name, tmp_path / name / 'out', Options(organ_values=(1,), all_slices=True))
        (series,), skipped, _ = find_inputs([tmp_path / name / 'imagesTr' / 'case.nii.gz'])
        row = read_dl_info(tmp_path / name / 'out' / 'DL_info.csv').iloc[0]
        pngs = sorted((tmp_path / name / 'out' / 'Images_png' / '000001_01_01').iterdir())
        assert skipped == [] and len(series) == len(pngs) == SHAPE[2], name
        assert all(np.array_equal(series.hu(int(p.stem) - 1), load_hu(p)) for p in pngs), name            # slice s is PNG s
        assert np.allclose(series.spacing, (row.spacing_y_mm, row.spacing_x_mm)), name
    from lesion_fastai.scans import nifti_spacing
    img = nib.Nifti1Image(np.zeros(SHAPE[2:] + SHAPE[:2], np.int16), ZXY)
    img.header.set_zooms((1., 1., 1.))                                 # a header disagreeing with its affine: the affine counts, as in convert
    assert np.allclose(nifti_spacing(img, nib), (.8, .8))


def make_volumes(root, n, shape=(32, 32, 12)):
    "`n` small volumes, each with one lesion."
    for i in range(n):
        save_pair(root, f'case_{i}', *phantom([((16 * .8, 16 * .8, 6 * 2.5), 5.)], shape=shape))


def test_split_is_seeded_patient_disjoint_and_follows_a_split_file(tmp_path):
    make_volumes(tmp_path, 7)
    names = [f'case_{i}' for i in range(7)]
    splits = assign_splits(names, seed=0)
    assert splits == assign_splits(names, seed=0) and sorted(splits.values()) == [1, 1, 1, 1, 1, 2, 3]
    assert any(assign_splits(names, seed=s) != splits for s in range(1, 5))
    assert sorted(assign_splits(names[:3], 0).values()) == [1, 2, 3]
    run(tmp_path, tmp_path / 'out')
    df = read_dl_info(tmp_path / 'out' / 'DL_info.csv')
    assert sorted(df.patient) == list(range(1, 8)) and df.groupby('patient').split.nunique().max() == 1
    assert {p: s for p, s in zip(df.patient, df.split)} == {i + 1: {1: 'train', 2: 'val', 3: 'test'}[splits[n]] for i, n in enumerate(names)}
    table = tmp_path / 'split.csv'
    table.write_text('name,split\n' + ''.join(f'{n}.nii.gz,{"test" if i < 2 else 1}\n' for i, n in enumerate(names)))
    assert read_split(table, names) == {n: 3 if i < 2 else 1 for i, n in enumerate(names)}
    table.write_text('case_0,train\n')
    with pytest.raises(ValueError, match=r"no line for volume 'case_1' \(and 5 more\)"): read_split(table, names)


def test_small_lesions_are_skipped_and_counted_and_empty_masks_give_no_rows(tmp_path):
    save_pair(tmp_path, 'a', *phantom([(CENTRE, 6.), ((10 * .8, 30 * .8, 5 * 2.5), 1.)]))     # the second: 1.6 mm across
    save_pair(tmp_path, 'b', *phantom([]))                                                        # an organ, no lesion
    assert run(tmp_path, tmp_path / 'out') == {'slices': 24, 'lesions': 1, 'skipped': 1, 'empty_mask': 1}
    assert len(read_dl_info(tmp_path / 'out' / 'DL_info.csv')) == 1
    assert not (tmp_path / 'out' / 'Images_png' / '000002_01_01').exists()
    assert (tmp_path / 'out' / 'volumes.csv').read_text().splitlines()[1:] == ['a,1,train,24,1,1,0', 'b,2,train,0,0,0,1']
    totals = run(tmp_path, tmp_path / 'all', Options(organ_values=(1,), min_diameter_mm=0, all_slices=True))
    assert totals == {'slices': 48, 'lesions': 2, 'skipped': 0, 'empty_mask': 1}                   # b's slices, for pretraining
    assert len(list((tmp_path / 'all' / 'Images_png' / '000002_01_01').glob('*.png'))) == SHAPE[2]


def test_resume_skips_finished_volumes_and_an_interruption_leaves_no_half_volume(tmp_path, monkeypatch):
    make_volumes(tmp_path, 3)
    run(tmp_path, tmp_path / 'ref')
    out = tmp_path / 'out'
    real_save, written = convert_mod.save_hu, []
    def interrupted(path, hu):
        if path.parent.name.startswith('000002') and len(written) > 15: raise KeyboardInterrupt
        written.append(path)
        real_save(path, hu)
    monkeypatch.setattr(convert_mod, 'save_hu', interrupted)
    with pytest.raises(KeyboardInterrupt): run(tmp_path, out)
    monkeypatch.setattr(convert_mod, 'save_hu', real_save)
    assert sorted(p.name for p in (out / '.convert').iterdir()) == ['000001.json', 'settings.json']     # no temp folder left
    assert sorted(p.name for p in (out / 'Images_png').iterdir()) == ['000001_01_01'] and not (out / 'DL_info.csv').exists()
    first = {p.name: p.stat().st_mtime_ns for p in (out / 'Images_png' / '000001_01_01').iterdir()}
    calls = []
    real_volume = convert_mod.convert_volume
    monkeypatch.setattr(convert_mod, 'convert_volume', lambda *a: calls.append(a[2]) or real_volume(*a))
    run(tmp_path, out)
    assert calls == [2, 3] and first == {p.name: p.stat().st_mtime_ns for p in (out / 'Images_png' / '000001_01_01').iterdir()}
    assert (out / 'DL_info.csv').read_text() == (tmp_path / 'ref' / 'DL_info.csv').read_text()
    assert (out / 'volumes.csv').read_text() == (tmp_path / 'ref' / 'volumes.csv').read_text()
    (out / '.convert' / '000003.json').unlink()          # killed after its series was renamed into place, before its fragment
    run(tmp_path, out)
    assert calls == [2, 3, 3] and (out / 'DL_info.csv').read_text() == (tmp_path / 'ref' / 'DL_info.csv').read_text()
    with pytest.raises(ValueError, match=r'other settings \(pad_px\)'): run(tmp_path, out, Options(organ_values=(1,), pad_px=3))


def _error_case(root, case):
    "Lay out the inputs of one error case under `root`; returns extra command-line arguments."
    hu, mask = phantom([(CENTRE, 5.)])
    if case == 'no folder': return []
    (root / 'imagesTr').mkdir(parents=True)
    (root / 'labelsTr').mkdir(parents=True)
    if case == 'empty': return []
    if case == 'no mask': save_pair(root, 'a', hu, mask); (root / 'labelsTr' / 'a.nii.gz').unlink()
    elif case == 'no image':
        for name in ('a', 'b'): save_pair(root, name, hu, mask)
        (root / 'imagesTr' / 'a.nii.gz').unlink()
    elif case == 'shape': save_pair(root, 'a', hu, mask); nib.save(nib.Nifti1Image(mask[:, :, :-1], RAS), str(root / 'labelsTr' / 'a.nii.gz'))
    elif case == 'affine': save_pair(root, 'a', hu, mask, mask_affine=RAS + np.diag([0, 0, 0.5, 0]))
    elif case == 'not HU': save_pair(root, 'a', (hu + 1000).astype(np.int16), mask)
    elif case == '4-D': save_pair(root, 'a', hu[..., None].repeat(2, 3), mask[..., None].repeat(2, 3))
    elif case == 'float labels': save_pair(root, 'a', hu, mask.astype(np.float32) * .5)
    elif case == 'split':
        save_pair(root, 'a', hu, mask)
        (root / 'split.csv').write_text('b,train\n')
        return ['--split', root / 'split.csv']
    return []


ERRORS = {
    'no folder': "--images {root}/imagesTr: no such folder",
    'empty': "--images {root}/imagesTr holds no NIfTI volume",
    'no mask': "{root}/imagesTr/a.nii.gz: no mask of the same name in --labels {root}/labelsTr, expected {root}/labelsTr/a.nii.gz",
    'no image': "{root}/labelsTr/a.nii.gz: no image of the same name in --images",
    'shape': "{root}/labelsTr/a.nii.gz: mask of shape (48, 48, 23), expected its image's (48, 48, 24)",
    'affine': "{root}/labelsTr/a.nii.gz: affine differs from its image's ({root}/imagesTr/a.nii.gz) by up to 0.5",
    'not HU': "{root}/imagesTr/a.nii.gz: intensities 0 to 1060, expected CT in HU",
    '4-D': "{root}/imagesTr/a.nii.gz: a 4-D image of shape (48, 48, 24, 2), expected a 3-D CT volume",
    'float labels': "{root}/labelsTr/a.nii.gz: mask value 0.5 is not an integer",
    'split': "--split {root}/split.csv: no line for volume 'a'",
}


@pytest.mark.parametrize('case', list(ERRORS))
def test_errors_are_one_named_line_and_leave_no_output(tmp_path, case):
    extra = _error_case(tmp_path, case)
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as e:
        main(['--images', str(tmp_path / 'imagesTr'), '--labels', str(tmp_path / 'labelsTr'), '--out', str(out), *map(str, extra)])
    assert str(e.value.code).startswith('error: ' + ERRORS[case].format(root=tmp_path)), e.value.code
    assert not out.exists()


def test_help_documents_every_flag_and_the_command_exits_1_with_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as e: main(['--help'])
    text = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ('--images', '--labels', '--out', '--label-values', '--organ-values', '--lesion-type', '--pad-px',
                 '--min-diameter-mm', '--neighbours-mm', '--all-slices', '--window', '--seed', '--split'):
        assert flag in text, flag
    with pytest.raises(SystemExit) as e: main(['--images', 'i', '--labels', 'l', '--out', 'o', '--window=275,-175'])
    assert e.value.code == 2
    r = subprocess.run([sys.executable, '-m', 'lesion_fastai.convert', '--images', str(tmp_path / 'missing'), '--labels', str(tmp_path),
                        '--out', str(tmp_path / 'o')], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == f"error: --images {tmp_path / 'missing'}: no such folder"


@pytest.mark.slow
def test_converted_volumes_finetune_to_a_finite_test_froc(tmp_path):
    import finetune.__main__ as finetune_cli
    shape = (64, 64, 16)
    for i in range(7):                                   # 5 / 1 / 1 volumes: train, val and test patients with lesions
        rng = np.random.default_rng(i)
        spheres = [((float(rng.uniform(18, 32)), float(rng.uniform(18, 32)), 20.), float(rng.uniform(4, 7))),
                   ((float(rng.uniform(14, 34)), float(rng.uniform(14, 34)), 20. + 2.5 * i % 10), 4.)]
        save_pair(tmp_path / 'msd', f'case_{i}', *phantom(spheres, shape=shape))
    main(['--images', str(tmp_path / 'msd' / 'imagesTr'), '--labels', str(tmp_path / 'msd' / 'labelsTr'),
          '--out', str(tmp_path / 'data'), '--organ-values', '1'])
    df = read_dl_info(tmp_path / 'data' / 'DL_info.csv')
    assert set(df.split) == {'train', 'val', 'test'}
    finetune_cli.main(['--data', str(tmp_path / 'data'), '--out', str(tmp_path / 'run'), '--epochs', '1', '--bs', '2', '--size', '32'])
    m = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert np.isfinite(m['test']['froc']['mean_0.5_4']) and m['test']['froc']['lesions'] == int((df.split == 'test').sum())


def test_each_lesions_slice_range_is_the_run_of_written_slices_around_its_key(tmp_path):
    far_apart = [((24 * .8, 24 * .8, 3 * 2.5), 4.), ((24 * .8, 24 * .8, 20 * 2.5), 4.)]     # near the feet and near the head
    save_pair(tmp_path, 'case', *phantom(far_apart))
    run(tmp_path, tmp_path / 'out', Options(organ_values=(1,), neighbours_mm=5.))            # two slices a side: two runs
    df = read_dl_info(tmp_path / 'out' / 'DL_info.csv', strict=True)
    written = sorted(int(p.stem) for p in (tmp_path / 'out' / 'Images_png' / '000001_01_01').iterdir())
    assert len(df) == 2
    for row in df.itertuples():
        run_ = list(range(row.slice_first, row.slice_last + 1))
        assert row.key_slice in run_ and set(run_) <= set(written) and row.slice_last - row.slice_first < len(written) - 1


def test_slice_spacing_is_the_distance_between_slice_planes_under_a_gantry_tilt():
    from lesion_fastai.convert import spacing_of
    tilt = np.radians(20)
    sheared = np.array([[.8, 0, 0, 0], [0, .7, 2.5 * np.tan(tilt), 0], [0, 0, 2.5, 0], [0, 0, 0, 1]])   # planes 2.5 mm apart
    assert np.allclose(spacing_of(sheared), (.8, .7, 2.5)) and np.allclose(spacing_of(RAS), SPACING)
    assert nib.affines.voxel_sizes(sheared)[2] > 2.6                     # the third axis's length: 6% too far


def test_an_oblique_volume_is_converted_and_named(tmp_path, caplog):
    t = np.radians(10)
    turned = RAS.copy()
    turned[:2, :2] = [[.8 * np.cos(t), -.8 * np.sin(t)], [.8 * np.sin(t), .8 * np.cos(t)]]    # 10 degrees about the body's axis
    save_pair(tmp_path, 'case', *phantom([(CENTRE, 6.)], turned), turned)
    run(tmp_path, tmp_path / 'out')
    assert len(read_dl_info(tmp_path / 'out' / 'DL_info.csv', strict=True)) == 1
    assert any('10.0 degrees off the patient' in r.getMessage() for r in caplog.records if r.levelname == 'WARNING')
    caplog.clear()
    save_pair(tmp_path / 'straight', 'case', *phantom([(CENTRE, 6.)]))
    run(tmp_path / 'straight', tmp_path / 'straight' / 'out')
    assert not any('degrees off' in r.getMessage() for r in caplog.records)
