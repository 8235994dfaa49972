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

__all__ = ['GT_COLOR', 'PRED_COLOR', 'draw_box', 'plot_slices', 'plot_results', 'plot_froc', 'plot_reconstructions', 'save_fig']

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


def plot_results(images, records, pred_boxes, path: Path | str, pred_scores=None, pred_margins=None, ious=None, ncols=4,
                 threshold: float | None = None, titles=None) -> Path:
    """Slices with ground truth (all lesions, green) and the predicted boxes (yellow, each with its score
    when `pred_scores` is given; dashed where a box scores under `threshold`: the top box is drawn
    whatever it scores). `images` [n, H, W] in [0, 1]; `pred_boxes[i]` [k, 4] in pixels of those
    images, best first. With `pred_margins` (Gaussian head: per slice [2, 4], the smallest and largest
    box within one std of the top box, `boxes.one_std_boxes`, in pixels) thin dashed yellow boxes mark
    the one-std range around it. `titles` replace the series names as panel titles."""
    fig, axs = _grid(max(1, len(records)), ncols)
    for i, (ax, r) in enumerate(zip(axs, records)):
        img = images[i]
        ax.imshow(img, cmap='bone', vmin=0, vmax=1)
        sx, sy = img.shape[1] / r.width, img.shape[0] / r.height
        for b in r.boxes: draw_box(ax, b * np.array([sx, sy, sx, sy]), GT_COLOR)
        for j, b in enumerate(np.asarray(pred_boxes[i]).reshape(-1, 4)):
            score = None if pred_scores is None else float(pred_scores[i][j])
            below = threshold is not None and score is not None and score < threshold
            draw_box(ax, b, PRED_COLOR, ls='--' if below else '-')
            if score is not None: ax.text(b[0], b[1] - 1, f'{score:.2f}' + (' (below)' if below else ''), color=PRED_COLOR, fontsize=6)
        if pred_margins is not None:
            for b in pred_margins[i]: draw_box(ax, b, PRED_COLOR, lw=.8, ls=':')
        title = titles[i] if titles is not None else Path(r.image_path).parent.name
        if ious is not None: title += f'  top box IoU {ious[i]:.2f}'
        ax.set_title(title, fontsize=7)
    if not records: axs[0].text(.5, .5, 'none', ha='center', va='center', transform=axs[0].transAxes)
    shown = f'boxes scoring at least {threshold:.2f}; the top box always, dashed below that' if threshold is not None else 'predictions'
    fig.suptitle(f'ground truth green, {shown} yellow (score)', fontsize=9)
    return save_fig(fig, path)


def plot_froc(curves: dict, summaries: dict, baseline: dict | None, path: Path | str) -> Path:
    """FROC curves (`curves`: split -> (FPs per slice, sensitivity)) with the points read at 0.5-16 FPs
    (`summaries`: split -> `froc.froc` result), the mean-box baseline's points, and the sensitivities
    published on DeepLesion's real test split, marked as such (other data: not comparable)."""
    from .froc import FP_RATES, PUBLISHED
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for (name, (fp, sens)), color in zip(curves.items(), ('C0', 'C1', 'C2')):
        ax.step(np.r_[0, fp], np.r_[0, sens], where='post', color=color, alpha=.5, lw=1)
        s = summaries[name]
        ax.plot(FP_RATES, [s['sensitivity'][f'{r:g}'] for r in FP_RATES], 'o-', color=color,
                label=f"{name}: mean 0.5-4 FPs {s['mean_0.5_4']:.3f}")
    if baseline is not None:
        ax.plot(FP_RATES, [baseline['sensitivity'][f'{r:g}'] for r in FP_RATES], 's--', color='gray', ms=4,
                label=f"mean box, one per slice: {baseline['mean_0.5_4']:.3f}")
    for (name, pts), marker in zip(PUBLISHED.items(), ('^', 'v', 'D')):
        ax.plot(FP_RATES[:len(pts)], np.array(pts) / 100, marker, ls=':', color='k', alpha=.45, ms=4,
                label=f'{name} (published, real DeepLesion test)')
    ax.set_xscale('log', base=2); ax.set_xticks(FP_RATES); ax.set_xticklabels([f'{r:g}' for r in FP_RATES])
    ax.set_xlim(.35, 20); ax.set_ylim(0, 1.02); ax.grid(alpha=.3)
    ax.set_xlabel('false positives per slice'); ax.set_ylabel('sensitivity (IoU >= 0.5)')
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1), borderaxespad=0)     # beside the axes: it covers no curve
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
