"""Figures: CT slices with boxes (ground truth green, prediction yellow), reconstructions, curves."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib
matplotlib.use(os.environ.get('MPLBACKEND', 'Agg'))
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from .deeplesion import load_hu, window, WINDOWS
from .files import atomic_path

__all__ = ['GT_COLOR', 'PRED_COLOR', 'draw_box', 'plot_slices', 'plot_results', 'plot_reconstructions', 'save_fig']

GT_COLOR, PRED_COLOR = 'lime', 'yellow'


def save_fig(fig, path: Path | str) -> Path:
    "Save atomically (temp file + rename) and close."
    try:
        with atomic_path(path) as tmp: fig.savefig(tmp, format=Path(path).suffix[1:] or 'png', dpi=110, bbox_inches='tight')
    finally: plt.close(fig)
    return Path(path)


def draw_box(ax, box, color, lw=1.5, ls='-'):
    "Draw x1,y1,x2,y2 (pixels) on `ax`."
    x1, y1, x2, y2 = (float(v) for v in box)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, lw=lw, ls=ls))


def _grid(n, ncols=4, size=3.):
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axs = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axs.flat: ax.axis('off')
    return fig, axs.flat


def plot_slices(records, path: Path | str, win=WINDOWS['soft'], ncols=4) -> Path:
    "Key slices (soft-tissue window, bone colour map) with every lesion box in green."
    fig, axs = _grid(len(records), ncols)
    for ax, r in zip(axs, records):
        ax.imshow(window(load_hu(r.image_path), *win), cmap='bone', vmin=0, vmax=1)
        for b in r.boxes: draw_box(ax, b, GT_COLOR)
        ax.set_title(Path(r.image_path).parent.name + '/' + Path(r.image_path).name, fontsize=7)
    return save_fig(fig, path)


def plot_results(images, records, pred_boxes, path: Path | str, pred_margins=None, ious=None, ncols=4) -> Path:
    """Slices with ground truth (all lesions, green) and the predicted box (yellow). `images` [n, H, W]
    in [0, 1]; boxes in pixels of those images. With `pred_margins` (Gaussian head: per slice [2, 4],
    the smallest and largest box within one std, `boxes.one_std_boxes`, in pixels) dashed yellow
    boxes mark the one-std range around the prediction."""
    fig, axs = _grid(len(records), ncols)
    for i, (ax, r) in enumerate(zip(axs, records)):
        img = images[i]
        ax.imshow(img, cmap='bone', vmin=0, vmax=1)
        sx, sy = img.shape[1] / r.width, img.shape[0] / r.height
        for b in r.boxes: draw_box(ax, b * np.array([sx, sy, sx, sy]), GT_COLOR)
        draw_box(ax, pred_boxes[i], PRED_COLOR)
        if pred_margins is not None:
            for b in pred_margins[i]: draw_box(ax, b, PRED_COLOR, lw=.8, ls='--')
        title = Path(r.image_path).parent.name
        if ious is not None: title += f'  IoU {ious[i]:.2f}'
        ax.set_title(title, fontsize=7)
    fig.suptitle('ground truth green, prediction yellow', fontsize=9)
    return save_fig(fig, path)


def plot_reconstructions(clean, corrupted, output, path: Path | str) -> Path:
    "Rows of (input, corrupted input, reconstruction), first channel, each [n, H, W] in [0, 1]."
    n = len(clean)
    fig, axs = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for i in range(n):
        for j, (img, name) in enumerate(((clean, 'input'), (corrupted, 'corrupted'), (output, 'reconstruction'))):
            axs[i, j].imshow(img[i], cmap='bone', vmin=0, vmax=1)
            axs[i, j].axis('off')
            if i == 0: axs[i, j].set_title(name, fontsize=9)
    return save_fig(fig, path)
