"""The unlabelled slices as training targets: labels carried to neighbour slices, pseudo-labels from a
teacher, and self-training, with the proof that no label of an unused patient reaches training."""
import csv
import shutil

import numpy as np
import pytest
import torch

from lesion_fastai.deeplesion import SliceRecord, evaluation_records, load_data, save_hu
from lesion_fastai.finetuning import epoch_of
from lesion_fastai.losses import DetectionLoss
from lesion_fastai.froc import score_at_fp
from lesion_fastai.unlabelled import PAD_PX, carry_labels, unlabelled_slices

from tiny import TINY, targets


def _record(path, box, diameter, spacing=1., spacing_z=5., size=200):
    return SliceRecord(image_path=str(path), split='train', patient=1, width=size, height=size, spacing_mm=(spacing, spacing),
                       dicom_window=(-175, 275), boxes=np.array([box], np.float32), lesion_types=(-1,), file_name='x.png',
                       spacing_z_mm=spacing_z, diameters_px=(diameter,))


def test_labels_carry_to_the_neighbours_within_the_lesions_extent_shrunk_as_a_balls_cross_section(tmp_path):
    series = tmp_path / 'Images_png' / '000001_01_01'
    for k in range(7, 14): save_hu(series / f'{k:03d}.png', np.zeros((8, 8)))
    (series / '012.png').unlink()                                       # not shipped: nothing carried there
    key = _record(series / '010.png', (100, 100, 140, 120), diameter=30)  # a 30 mm lesion, 5 mm slices: 15 mm above and below
    carried = {int(r.image_path[-7:-4]): r for r in carry_labels([key], .5)}
    assert sorted(carried) == [8, 9, 11]                               # offsets 1 and 2 (10 mm < 15 mm), 3 is 15 mm: outside
    for k, r in carried.items():
        f = np.sqrt(1 - (abs(k - 10) * 5 / 15) ** 2)
        want = [120 - (15 * f + PAD_PX), 110 - (5 * f + PAD_PX), 120 + 15 * f + PAD_PX, 110 + 5 * f + PAD_PX]
        assert r.boxes[0].tolist() == pytest.approx(want, abs=1e-4) and r.weight == .5 and r.lesion_types == (-1,)
    assert carried[9].boxes[0][2] - carried[9].boxes[0][0] > carried[8].boxes[0][2] - carried[8].boxes[0][0]   # farther: smaller
    neighbour_key = _record(series / '011.png', (10, 10, 30, 30), diameter=10)      # a labelled key slice gets no carried box
    assert 11 not in {int(r.image_path[-7:-4]) for r in carry_labels([key, neighbour_key], .5) if r.boxes[0][0] > 50}
    assert carry_labels([_record(series / '010.png', (100, 100, 140, 120), diameter=30, spacing_z=0.)], .5) == []   # no interval known


def test_unequal_target_weights_weigh_each_image_and_equal_ones_change_nothing():
    from lesion_fastai.models.detector import create_detector
    torch.manual_seed(0)
    out = create_detector(1, 'gaussian', **TINY).train()(torch.rand(2, 1, 64, 64))
    out = tuple(t.detach() for t in out)
    y, f = targets([[[.1, .1, .3, .3]], [[.5, .5, .7, .65]]])
    loss = DetectionLoss(nll_weight=.1)
    full = loss(out, y, f)
    assert torch.allclose(loss(out, y, f * .5), full, rtol=1e-5)       # every target at one weight: the same loss
    only = lambda i: loss(tuple(t[i:i + 1] for t in out), y[i:i + 1], f[i:i + 1])
    light = loss(out, y, f * torch.tensor([[1.], [1e-4]]))             # the second image barely counts
    assert abs(float(light - only(0))) < abs(float(full - only(0))) and torch.isfinite(light)


def test_an_epoch_holds_every_label_and_a_seeded_sample_of_the_other_targets():
    train, extra = list(range(10)), [f'x{i}' for i in range(50)]
    assert epoch_of(train, [], None, 0) == train and epoch_of(train, extra, None, 0) == train + extra
    assert epoch_of(train, [], 25, 0) == (train * 3)[:25]              # as the benchmarks always repeated small label sets
    e = epoch_of(train, extra, 40, 0)
    assert len(e) == 40 and e[:20] == train * 2 and len(set(e[20:])) == 20 and set(e[20:]) <= set(extra)
    assert e == epoch_of(train, extra, 40, 0) != epoch_of(train, extra, 40, 1)
    few = epoch_of(train, extra[:5], 40, 0)                            # fewer extras than half: labels fill the rest
    assert few[:35] == (train * 4)[:35] and sorted(few[35:]) == sorted(extra[:5])


def test_the_threshold_is_the_lowest_score_within_the_false_positive_rate():
    fps = np.array([0., 0., .5, .5, 1., 1.5])
    scores = np.array([.9, .8, .7, .6, .5, .4])
    assert score_at_fp(fps, scores, .5) == .6 and score_at_fp(fps, scores, 1) == .5 and score_at_fp(fps, scores, 10) == .4


@pytest.mark.slow
def test_pseudo_labels_never_read_an_unused_patients_labels_and_a_student_trains_on_them(tiny_data, tmp_path):
    """The same teacher on two copies of the data whose unused patients' boxes differ (one set replaced by
    nonsense): the same pseudo-labels, bit for bit, and none of the nonsense among the student's targets."""
    from lesion_fastai.config import FinetuneConfig
    from lesion_fastai.data import select_patients
    from lesion_fastai.deeplesion import COLUMNS
    from lesion_fastai.finetuning import finetune, unlabelled_targets
    from lesion_fastai.selftrain import main, pseudo_labels_from
    cfg = dict(epochs=1, bs=2, size=32, context=1, label_fraction=.5, seed=0)
    teacher = tmp_path / 'teacher'
    finetune(FinetuneConfig(data=tiny_data, out=teacher, **cfg))
    _, records = load_data(tiny_data)
    used = {r.patient for r in select_patients(evaluation_records(records, 'train'), .5, 0)}
    unused = {r.patient for r in records if r.split == 'train'} - used
    assert used and unused
    moved = tmp_path / 'data'
    shutil.copytree(tiny_data, moved)
    rows = list(csv.reader(open(moved / 'DL_info.csv', newline='')))
    for row in rows[1:]:
        if int(row[COLUMNS.index('Patient_index')]) in unused: row[COLUMNS.index('Bounding_boxes')] = '1, 2, 9, 7'
    csv.writer(open(moved / 'DL_info.csv', 'w', newline='')).writerows(rows)
    a, b = tmp_path / 'a.csv', tmp_path / 'b.csv'
    ra = pseudo_labels_from(teacher / 'export.pkl', FinetuneConfig(data=tiny_data, out=tmp_path / 'x', **cfg), a, fp=8.)
    rb = pseudo_labels_from(teacher / 'export.pkl', FinetuneConfig(data=moved, out=tmp_path / 'x', **cfg), b, fp=8.)
    assert ra['boxes'] > 0 and ra['threshold'] == rb['threshold']
    strip = lambda p, root: [row[:-1] for row in csv.reader(open(p))]      # the teacher column aside
    assert strip(a, tiny_data) == strip(b, moved)
    pseudo_patients = {int(r[1]) for r in list(csv.reader(open(a)))[1:]}
    assert pseudo_patients <= {r.patient for r in records if r.split == 'train'}   # never a validation or test patient
    student = FinetuneConfig(data=moved, out=tmp_path / 's', pseudo_labels=b, **cfg)
    _, moved_records = load_data(moved)
    extra = unlabelled_targets(student, select_patients(evaluation_records(moved_records, 'train'), .5, 0), moved_records)
    assert extra and all(r.weight == .5 for r in extra)
    assert not any(np.allclose(box, [1, 2, 9, 7]) for r in extra for box in r.boxes)  # the unused patients' labels never arrive
    main(['--data', str(tiny_data), '--out', str(tmp_path / 'st'), '--teacher', str(teacher / 'export.pkl'), '--pseudo-fp', '8',
          '--epochs', '1', '--bs', '2', '--size', '32', '--context', '1', '--label-fraction', '.5'])
    assert (tmp_path / 'st' / 'round_1' / 'pseudo_labels.csv').exists() and (tmp_path / 'st' / 'round_1' / 'metrics.json').exists()
    with pytest.raises(SystemExit) as e:                                # a --resume asking for other pseudo-labels than those made
        main(['--data', str(tiny_data), '--out', str(tmp_path / 'st'), '--teacher', str(teacher / 'export.pkl'), '--pseudo-fp', '4',
              '--epochs', '1', '--bs', '2', '--size', '32', '--context', '1', '--label-fraction', '.5', '--resume'])
    assert 'was made by the teacher' in e.value.code and 'at --pseudo-fp 8' in e.value.code and 'at 4' in e.value.code
    import json
    m = json.loads((tmp_path / 'st' / 'round_1' / 'metrics.json').read_text())
    assert m['slices_per_epoch'] > m['train_slices']                    # the pseudo-labelled slices trained too
    with pytest.raises(ValueError, match='validation or test patient'):
        held_out = next(r for r in records if r.split == 'val')
        bad = tmp_path / 'bad.csv'
        rows = list(csv.reader(open(a)))
        rows[1][1] = str(held_out.patient)
        csv.writer(open(bad, 'w', newline='')).writerows(rows)
        unlabelled_targets(FinetuneConfig(data=tiny_data, out=tmp_path / 'y', pseudo_labels=bad, **cfg), [], records)


def test_unlabelled_slices_are_training_patients_slices_but_the_labelled_ones(tiny_data, tiny_records):
    used = [r for r in tiny_records if r.split == 'train'][:3]
    paths = unlabelled_slices(tiny_data, tiny_records, used)
    held_out = {r.patient for r in tiny_records if r.split != 'train'}
    assert paths and not {str(p) for p in paths} & {r.image_path for r in used}
    assert all(int(p.parent.name.split('_')[0]) not in held_out for p in paths)
    assert {r.image_path for r in tiny_records if r.split == 'train' and r not in used} <= {str(p) for p in paths}
