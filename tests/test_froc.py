"""DeepLesion's FROC on hand-made cases, each checked against a count done by hand."""
import numpy as np
import pytest
import torch

from lesion_fastai.boxes import protocol_iou
from lesion_fastai.froc import PUBLISHED, froc, froc_curve, sensitivity_at

A, B = [10, 10, 29, 29], [60, 60, 79, 79]            # 20 x 20 pixel lesions (inclusive corners)
FAR = [200, 200, 219, 219]


def test_protocol_iou_counts_corner_pixels():
    a, b = torch.tensor([[0., 0., 9., 9.]]), torch.tensor([[5., 0., 14., 9.]])    # 10 x 10 boxes, 5 columns shared
    assert float(protocol_iou(a, b)) == pytest.approx(50 / 150)


def test_perfect_detector_is_one_everywhere():
    r = froc([[A, B], [A]], [[.9, .8], [.7]], [[A, B], [A]])
    assert r['sensitivity'] == {k: 1. for k in ('0.5', '1', '2', '4', '8', '16')} and r['mean_0.5_4'] == 1


def test_empty_prediction_set_is_zero():
    r = froc([np.zeros((0, 4)), np.zeros((0, 4))], [[], []], [[A], [B]])
    assert set(r['sensitivity'].values()) == {0.} and r['predictions'] == 0


def test_duplicate_detection_is_neither_hit_nor_false_positive():
    fp, sens, _ = froc_curve([[A, A, FAR]], [[.9, .8, .7]], [[A]])
    assert sens.tolist() == [1, 1, 1] and fp.tolist() == [0, 0, 1]               # the second A counts for nothing


def test_one_box_covering_two_lesions_finds_both():
    left, right = [0, 0, 19, 39], [20, 0, 39, 39]                                 # two halves of a 40 x 40 square
    cover = [0, 0, 39, 39]                                                         # IoU 0.5 with each
    assert float(protocol_iou(torch.tensor([cover], dtype=torch.float64), torch.tensor([left], dtype=torch.float64))) == .5
    fp, sens, _ = froc_curve([[cover]], [[1.]], [[left, right]])
    assert sens.tolist() == [1.] and fp.tolist() == [0.]


def test_false_positives_per_slice_and_sensitivity_per_lesion():
    # slice 0: one lesion, found by the second-best box; slice 1: two lesions, one found; 3 FPs over 2 slices
    preds = [[FAR, A], [FAR, B, FAR]]
    scores = [[.95, .9], [.85, .8, .1]]
    fp, sens, order = froc_curve(preds, scores, [[A], [A, B]])
    assert order.tolist() == [.95, .9, .85, .8, .1]
    assert fp.tolist() == [.5, .5, 1., 1., 1.5] and sens.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 2 / 3])


def test_reading_interpolates_and_holds_the_last_value_beyond_the_end():
    fp = np.array([0., .5, .5, 1., 2.])
    sens = np.array([.2, .2, .4, .4, .6])
    # 0.5 is reached twice: read at its first point (0.2, as scipy's interp1d does); 1.5 lies halfway from (1, .4) to (2, .6)
    assert sensitivity_at(fp, sens, (.5, 1, 1.5, 2, 4, 16)).tolist() == pytest.approx([.2, .4, .5, .6, .6, .6])
    assert sensitivity_at(np.array([1.]), np.array([0.]), (.5,)).tolist() == [0.]   # before the first point: from (0, 0)


def test_noisy_lesions_and_slices_with_only_noisy_lesions_are_dropped():
    from lesion_fastai.deeplesion import SliceRecord, evaluation_records
    rec = lambda boxes, noisy: SliceRecord(image_path='x.png', split='test', patient=1, width=100, height=100, spacing_mm=(1, 1),
                                           dicom_window=(0, 1), boxes=np.array(boxes, np.float32), lesion_types=(-1,) * len(boxes),
                                           noisy=noisy)
    recs = evaluation_records([rec([A, B], (False, True)), rec([B], (True,))], 'test')
    assert len(recs) == 1 and recs[0].boxes.tolist() == [A]
    r = froc([[A, B]], [[.9, .8]], [recs[0].boxes])
    assert r['lesions'] == 1 and r['slices'] == 1 and r['sensitivity']['0.5'] == 1   # B, now not a lesion, is an FP
    assert r['max_fp_per_slice'] == 1


def test_froc_figure_marks_the_published_points_as_such(tmp_path, monkeypatch):
    "The published sensitivities are drawn at their FP rates, as fractions, each labelled as a published real-DeepLesion figure."
    from lesion_fastai import plots
    figures = []
    monkeypatch.setattr(plots, 'save_fig', lambda fig, path: figures.append(fig) or path)
    fp, sens, _ = froc_curve([[A, FAR]], [[.9, .8]], [[A]])
    plots.plot_froc({'test': (fp, sens)}, {'test': froc([[A, FAR]], [[.9, .8]], [[A]])}, None, tmp_path / 'froc.png')
    lines = {line.get_label(): line for line in figures[0].axes[0].lines}
    for name, points in PUBLISHED.items():
        (label,) = [k for k in lines if k.startswith(name)]
        assert 'published, real DeepLesion test' in label
        assert lines[label].get_xdata().tolist() == [.5, 1, 2, 4, 8][:len(points)]
        assert lines[label].get_ydata().tolist() == pytest.approx([p / 100 for p in points])
