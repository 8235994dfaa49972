"""Tiny inputs shared by the model, loss and metric tests: a small encoder, box-validity checks and
PointBlock-layout targets (not a test module: pytest collects test_*.py only)."""
import torch

TINY = dict(stem_width=8, widths=(8, 16, 16, 16), depths=(1, 1, 1, 1))


def valid_boxes(boxes):  # [..., 4] in [0, 1]
    b = boxes.reshape(-1, 4)
    return bool(((b[:, 0] < b[:, 2]) & (b[:, 1] < b[:, 3]) & (b >= 0).all(1) & (b <= 1).all(1)).all())


def targets(boxes_unit, slots=4):
    "PointBlock-layout targets ([B, 2M, 2] corners in [-1, 1]) and flags of lists of unit boxes."
    y = torch.zeros(len(boxes_unit), slots, 4)
    f = torch.zeros(len(boxes_unit), slots)
    for i, bs in enumerate(boxes_unit):
        for j, b in enumerate(bs): y[i, j], f[i, j] = torch.tensor(b, dtype=torch.float32), 1.
    return (y * 2 - 1).reshape(len(y), -1, 2), f


Y, F_ = targets([[[.1, .1, .3, .25]], [[.5, .55, .6, .62], [.0, .0, .04, .04]]])
