"""Box geometry shared by data, heads, losses and metrics: layouts, the unit square, the Gaussian head's
parameters, IoU. Conventions: x1,y1,x2,y2 corners; fastai's targets live in [-1, 1], the model's boxes
in [0, 1] image fractions ("unit"), evaluation in slice pixels.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_convert, box_iou

__all__ = ['MIN_SIZE', 'targets_to_unit', 'to_pixels', 'protocol_iou', 'box_params', 'params_to_boxes', 'one_std_boxes']

# The smallest box side a head predicts, as a fraction of the image (1 px of a 512 px slice). With every
# box of positive size the IoU losses and their gradients are finite (a zero-size box makes CIoU NaN).
MIN_SIZE = 1 / 512


def targets_to_unit(y: torch.Tensor) -> torch.Tensor:
    """fastai box layouts in [-1, 1] ([B, 2M, 2] corner pairs or [B, M, 4] boxes, as the DataBlock's
    tidied targets and the loss's decoded predictions are) -> [B, M, 4] x1,y1,x2,y2 in [0, 1]."""
    return (y.reshape(len(y), -1, 4).float() + 1) / 2


def to_pixels(box_unit: np.ndarray, width: int, height: int) -> np.ndarray:
    "x1,y1,x2,y2 in [0, 1] -> pixels of a width x height slice."
    return np.asarray(box_unit, np.float64) * np.array([width, height, width, height])


def protocol_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix [N, M] of pixel boxes as DeepLesion's evaluation code computes it: a box covers its
    corner pixels inclusively (width x2 - x1 + 1), so every side is one pixel longer than
    torchvision's continuous `box_iou` counts it."""
    one = torch.tensor([0., 0., 1., 1.], dtype=a.dtype, device=a.device)
    return box_iou(a + one, b.to(a.dtype) + one)


def box_params(boxes: torch.Tensor, min_size: float = MIN_SIZE) -> torch.Tensor:
    """[..., 4] x1,y1,x2,y2 -> [..., 4] cx, cy, log w, log h: the coordinates the Gaussian head's
    distribution is over (sizes on a log scale, so every sample is a box of positive size)."""
    c = box_convert(boxes.reshape(-1, 4), 'xyxy', 'cxcywh').reshape(boxes.shape)
    return torch.cat([c[..., :2], c[..., 2:].clamp(min=min_size).log()], -1)


def params_to_boxes(params: torch.Tensor, min_size: float = MIN_SIZE) -> torch.Tensor:
    """[..., 4] cx, cy, log w, log h -> [..., 4] x1,y1,x2,y2 in [0, 1], of positive size: the centre is
    clamped into the image and the sides to at least `min_size`, so clipping the corners to the image
    leaves at least half the smallest side."""
    c = params[..., :2].clamp(0, 1)
    wh = params[..., 2:].exp().clamp(min_size, 1)
    return torch.cat([c - wh / 2, c + wh / 2], -1).clamp(0, 1)


def one_std_boxes(box_unit, std) -> np.ndarray:
    """The one-std range of a Gaussian head's box, for figures: [2, 4] the smallest and the largest box
    within one std of the mean in every coordinate (centre +- std, sides x exp(-+std)), x1,y1,x2,y2."""
    p = box_params(torch.as_tensor(box_unit, dtype=torch.float64)[None])[0].numpy()
    sd = np.asarray(std, np.float64)
    half_in, half_out = np.exp(p[2:] - sd[2:]) / 2 - sd[:2], np.exp(p[2:] + sd[2:]) / 2 + sd[:2]
    half_in = np.maximum(half_in, 0)
    c = p[:2]
    return np.stack([np.r_[c - half_in, c + half_in], np.r_[c - half_out, c + half_out]])
