"""The top box, calibration and the evaluation beside the mean box, on hand-made slices."""
import dataclasses

import numpy as np
import pytest

from lesion_fastai.deeplesion import SliceRecord
from lesion_fastai.metrics import Detections, evaluate_detections, mean_box, top1_metrics


def _record(boxes, types=(-1,), spacing=(.5, .5), size=100, noisy=()):
    return SliceRecord(image_path='x.png', split='test', patient=1, width=size, height=size, spacing_mm=spacing,
                       dicom_window=(-175, 275), boxes=np.array(boxes, np.float32), lesion_types=tuple(types), noisy=tuple(noisy),
                       file_name='000001_01_01_001.png')

def test_top1_matches_any_lesion_on_the_slice():
    two = _record([[10, 10, 30, 30], [60, 60, 80, 80]], types=(4, 6))
    one = _record([[20, 20, 40, 40]], types=(4,), spacing=(1., 2.))
    pred = np.array([[.6, .6, .8, .8],        # exactly the second lesion of the two-lesion slice
                     [.25, .2, .45, .4]])     # shifted 5 px in x from the lesion: IoU 15*20/(2*400-300) = 0.6
    m = top1_metrics(pred, [two, one])
    assert m['n'] == 2 and m['hit@0.5'] == 1.
    assert m['mean_iou'] == pytest.approx((1 + .6) / 2)
    assert m['centre_error_mm_mean'] == pytest.approx((0 + 5 * 1.) / 2)
    assert m['by_type']['6_kidney']['mean_iou'] == pytest.approx(1) and m['by_type']['4_liver']['hit@0.5'] == 1

def test_a_box_overlapping_no_lesion_is_scored_against_the_nearest_one():
    two = _record([[10, 10, 20, 20], [70, 70, 80, 80]], types=(4, 6), spacing=(1., 1.))
    m = top1_metrics(np.array([[.55, .55, .65, .65]]), [two])        # centre (60, 60): nearest is the kidney lesion at (75, 75)
    assert m['mean_iou'] == 0 and m['centre_error_mm'] == pytest.approx(np.hypot(15, 15))
    assert list(m['by_type']) == ['6_kidney']

def test_calibration_counts_target_coordinates_within_one_and_two_std():
    rec = _record([[40, 40, 60, 60]])                                  # unit centre (.5, .5), sides .2
    pred = np.array([[.42, .42, .62, .62]])                            # centre off by .02, sides exact
    cal = lambda sd: top1_metrics(pred, [rec], pred_std=np.array([sd]))['calibration']
    c = cal([.03, .015, .1, .1])                                       # cx within 1 std, cy within 2, sizes exact
    assert c['within_1std'] == pytest.approx(3 / 4) and c['within_2std'] == 1.
    assert c['per_coordinate']['cy']['within_1std'] == 0 and c['per_coordinate']['cy']['median_abs_error'] == pytest.approx(.02)
    assert cal([.005, .005, .1, .1])['within_2std'] == pytest.approx(2 / 4)
    assert c['found']['n'] == 1 and c['found']['within_1std'] == c['within_1std']      # IoU 0.68: the box found its lesion
    far = top1_metrics(np.array([[.0, .0, .1, .1]]), [rec], pred_std=np.array([[.03, .03, .1, .1]]))['calibration']
    assert far['found'] == {'n': 0} and far['within_1std'] == 0

def test_noisy_lesions_and_then_empty_slices_are_dropped_for_evaluation():
    from lesion_fastai.deeplesion import evaluation_records
    mixed = _record([[10, 10, 30, 30], [60, 60, 80, 80]], types=(4, 6), noisy=(True, False))
    only_noisy = _record([[10, 10, 30, 30]], noisy=(True,))
    clean = _record([[20, 20, 40, 40]])
    val = dataclasses.replace(clean, split='val')
    kept = evaluation_records([mixed, only_noisy, clean, val], 'test')
    assert len(kept) == 2 and kept[1] is clean
    assert kept[0].boxes.tolist() == [[60, 60, 80, 80]] and kept[0].lesion_types == (6,) and kept[0].noisy == (False,)
    assert [r.split for r in evaluation_records([mixed, val], 'val')] == ['val']

def test_evaluate_detections_scores_froc_top_box_and_the_mean_box_detector():
    recs = [_record([[10, 10, 29, 29]]), _record([[50, 50, 69, 69], [10, 60, 29, 79]], types=(-1, -1))]
    base = mean_box(recs)                                              # over all three lesions
    assert np.allclose(base, np.array([70, 120, 127, 177]) / 3 / 100)
    boxes = np.array([[[.1, .1, .29, .29], [.6, .6, .7, .7]],          # a hit, then a false positive
                      [[.8, .8, .9, .9], [.5, .5, .69, .69]]])         # a false positive scoring highest, then a hit
    dets = Detections(boxes, np.array([[.9, .2], [.1, .8]]))
    assert np.allclose(dets.scores, [[.9, .2], [.8, .1]]) and np.allclose(dets.boxes[1, 0], [.5, .5, .69, .69])   # best first
    m = evaluate_detections(dets, recs, base)
    assert m['froc']['lesions'] == 3 and m['froc']['slices'] == 2 and m['froc']['max_sensitivity'] == pytest.approx(2 / 3)
    assert m['froc']['sensitivity']['0.5'] == pytest.approx(2 / 3) and m['top1']['hit@0.5'] == 1
    b = m['mean_box_baseline']
    assert b['froc']['predictions'] == 2 and b['froc']['max_fp_per_slice'] == 1 and b['top1']['n'] == 2
    with pytest.raises(ValueError, match='3 detection sets for 2 slices'): evaluate_detections(Detections(np.zeros((3, 1, 4)), np.zeros((3, 1))), recs)
