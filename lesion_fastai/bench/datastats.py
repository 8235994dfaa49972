"""How far the built-in generator's lesions are from real DeepLesion rows: geometry as two-sample
Kolmogorov-Smirnov distances against the official test split's 4,927 rows, and appearance (lesion
contrast, soft-tissue texture in HU) per lesion type beside what real key slices show.

    python -m lesion_fastai.bench stats --data data/synthetic --real ../shared/fixtures/DL_info_test_split.csv
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp

from ..deeplesion import load_hu, read_dl_info
from ..log import log
from ..metrics import LESION_TYPES
from ..settings import check_fields, from_args, option
from .common import add_bench_settings, ensure_data

__all__ = ['geometry', 'ks_table', 'lesion_contrast', 'tissue_texture', 'appearance', 'appearance_table', 'stats', 'add_parser',
           'KS_TARGET', 'REAL_LIVER']

KS_TARGET = .15       # two real row sets differ from each other by at most 0.09 on these statistics
# Measured on 47 real DeepLesion liver key slices (16-bit, every lesion): lesion contrast quartiles and 10th / 90th
# percentiles in HU, soft-tissue texture median and quartiles in HU (`lesion_contrast`, `tissue_texture`).
REAL_LIVER = {'contrast_quartiles': (18., 31., 42.), 'contrast_p10_p90': (11., 50.), 'texture_median': 34., 'texture_quartiles': (17., 66.)}
TEXTURE_TISSUE_HU = (20., 80.)   # a texture window counts when its mean lies here: soft tissue, not fat, air or bone


def geometry(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per lesion (per key slice for the count): the statistics that say where and how large a lesion is,
    in mm and as a fraction of the slice (what the detector sees)."""
    bw, bh = (df.x2 - df.x1) / df.width, (df.y2 - df.y1) / df.height
    typed = df.lesion_type[df.lesion_type > 0]
    return {'long diameter, mm': (df.diameter_long_px * df.spacing_x_mm).to_numpy(),
            'short diameter, mm': (df.diameter_short_px * df.spacing_x_mm).to_numpy(),
            'box side / slice side': ((bw + bh) / 2).to_numpy(),
            'box aspect (width / height)': ((df.x2 - df.x1) / (df.y2 - df.y1)).to_numpy(),
            'lesions per key slice': df.groupby('file_name').size().to_numpy(),
            'normalized location x': df.location_x.to_numpy(), 'normalized location y': df.location_y.to_numpy(),
            'normalized location z': df.location_z.to_numpy(),
            'slice interval, mm': df.spacing_z_mm.to_numpy(),
            'lesion type (1-8, labelled lesions)': typed.to_numpy()}


def ks_table(generated: pd.DataFrame, real: pd.DataFrame) -> tuple[str, dict[str, float]]:
    """The KS distance of each `geometry` statistic between two row sets (for the lesion type, the largest
    gap between the two cumulative shares over the codes 1-8), with both medians, as a Markdown table."""
    gen, ref = geometry(generated), geometry(real)
    distances = {k: float(ks_2samp(gen[k], ref[k]).statistic) for k in gen}
    lines = ['| statistic | built-in median | real median | KS distance | <= 0.15 |', '|---|---|---|---|---|']
    lines += [f"| {k} | {np.median(gen[k]):.3g} | {np.median(ref[k]):.3g} | {d:.3f} | {'yes' if d <= KS_TARGET else 'no'} |"
              for k, d in distances.items()]
    return '\n'.join(lines), distances


def _box_regions(box, shape):
    "The central half of a box and the ring around it (as wide as half the box's sides), as [H, W] masks."
    h, w = shape
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    cl = lambda v, hi: int(np.clip(round(v), 0, hi))
    centre, outer, inner = (np.zeros(shape, bool) for _ in range(3))
    centre[cl(y1 + bh / 4, h):cl(y2 - bh / 4, h), cl(x1 + bw / 4, w):cl(x2 - bw / 4, w)] = True
    outer[cl(y1 - bh / 2, h):cl(y2 + bh / 2, h), cl(x1 - bw / 2, w):cl(x2 + bw / 2, w)] = True
    inner[cl(y1, h):cl(y2, h), cl(x1, w):cl(x2, w)] = True
    return centre, outer & ~inner


def lesion_contrast(hu: np.ndarray, box) -> float:
    "|median HU of the box's central half - median HU of the ring around the box| (NaN when either is empty)."
    centre, ring = _box_regions(box, hu.shape)
    if not centre.any() or not ring.any(): return float('nan')
    return float(abs(np.median(hu[centre]) - np.median(hu[ring])))


def tissue_texture(hu: np.ndarray) -> np.ndarray:
    """The HU standard deviation in each window of 1/32 of the slice side whose mean lies in 20..80 HU (soft
    tissue): how grainy and structured the tissue is."""
    k = max(2, hu.shape[0] // 32)
    h, w = (hu.shape[0] // k) * k, (hu.shape[1] // k) * k
    tiles = hu[:h, :w].reshape(h // k, k, w // k, k).transpose(0, 2, 1, 3).reshape(-1, k * k)
    mean = tiles.mean(1)
    keep = (mean >= TEXTURE_TISSUE_HU[0]) & (mean <= TEXTURE_TISSUE_HU[1])
    return tiles[keep].std(1)


def appearance(df: pd.DataFrame, max_slices: int | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Per lesion type (labelled lesions only): each lesion's contrast and the texture windows of its key
    slices, read from the PNGs (`max_slices` key slices per type at most, the first in file order)."""
    out = {}
    for t, rows in df[df.lesion_type > 0].groupby('lesion_type'):
        files = list(dict.fromkeys(rows.image_path))[:max_slices]
        contrast, texture = [], []
        for path in files:
            hu = load_hu(path)
            texture.append(tissue_texture(hu))
            contrast += [lesion_contrast(hu, b) for b in rows[rows.image_path == path][['x1', 'y1', 'x2', 'y2']].to_numpy()]
        out[int(t)] = {'contrast': np.array([c for c in contrast if np.isfinite(c)]), 'texture': np.concatenate(texture)}
    return out


def appearance_table(found: dict[int, dict[str, np.ndarray]], name: str) -> str:
    "Contrast quartiles (10th / 90th percentiles) and texture median (quartiles) per lesion type, as a Markdown table."
    q = lambda a, ps: ' / '.join(f'{v:.0f}' for v in np.percentile(a, ps)) if len(a) else '-'
    lines = [f'| {name}: lesion type | lesions | contrast HU, quartiles (10th / 90th) | texture HU, median (quartiles) |', '|---|---|---|---|']
    lines += [f"| {t} {LESION_TYPES.get(t, '')} | {len(f['contrast'])} | {q(f['contrast'], (25, 50, 75))} ({q(f['contrast'], (10, 90))}) | "
              f"{q(f['texture'], (50,))} ({q(f['texture'], (25, 75))}) |" for t, f in sorted(found.items())]
    r = REAL_LIVER
    lines.append(f"| real DeepLesion, 4 liver (47 key slices) | | {' / '.join(f'{v:.0f}' for v in r['contrast_quartiles'])} "
                 f"({' / '.join(f'{v:.0f}' for v in r['contrast_p10_p90'])}) | {r['texture_median']:.0f} "
                 f"({' / '.join(f'{v:.0f}' for v in r['texture_quartiles'])}) |")
    return '\n'.join(lines)


def liver_within_bounds(found: dict[int, dict[str, np.ndarray]]) -> dict[str, float]:
    """How far the built-in liver lesions are from the real ones: the largest gap of the contrast quartiles
    (bound 10 HU) and the gap of the texture medians (bound 5 HU)."""
    liver = found.get(4)
    if liver is None or not len(liver['contrast']): return {'contrast_gap': float('nan'), 'texture_gap': float('nan')}
    gap = np.abs(np.percentile(liver['contrast'], (25, 50, 75)) - np.array(REAL_LIVER['contrast_quartiles'])).max()
    return {'contrast_gap': float(gap), 'texture_gap': float(abs(np.median(liver['texture']) - REAL_LIVER['texture_median']))}


def stats(data: Path, real: Path | None, patients: int, native: int, real_images: Path | None = None) -> str:
    """The built-in data (`data`, generated with the demo's settings if missing) against real DeepLesion rows
    (`real`): the KS table of the geometry, then the appearance per lesion type, with the real liver
    figures and, where `real_images` (a DeepLesion-layout folder with PNGs) is given, the same measures on it."""
    ensure_data(data, patients, native, seed=0)
    generated = read_dl_info(Path(data) / 'DL_info.csv')
    parts = []
    if real is not None and Path(real).exists():
        table, distances = ks_table(generated, read_dl_info(real, root=Path(real).parent))
        worst = max(distances, key=distances.get)
        parts += [f"Geometry: {data} against {real}", table,
                  f"largest distance {distances[worst]:.3f} ({worst}): target <= {KS_TARGET} {'met' if distances[worst] <= KS_TARGET else 'NOT met'}"]
    found = appearance(generated)
    gaps = liver_within_bounds(found)
    parts += ['Appearance (labelled key slices of the built-in data):', appearance_table(found, 'built-in'),
              f"liver: contrast quartiles at most {gaps['contrast_gap']:.1f} HU from the real ones (bound 10), texture median "
              f"{gaps['texture_gap']:.1f} HU from it (bound 5): {'met' if gaps['contrast_gap'] <= 10 and gaps['texture_gap'] <= 5 else 'NOT met'}"]
    if real_images is not None and (Path(real_images) / 'DL_info.csv').exists():
        parts += ['', appearance_table(appearance(read_dl_info(Path(real_images) / 'DL_info.csv')), f'{real_images}')]
    text = '\n'.join(parts)
    log.info(text)
    return text


@dataclass(kw_only=True)
class StatsSettings:
    "Settings of `bench stats`."
    data: Path = option(Path('data/synthetic'), "built-in data folder (generated with the demo's settings if missing)", group='benchmark')
    real: Path = option(Path('../shared/fixtures/DL_info_test_split.csv'), 'real DL_info.csv rows to compare with', group='benchmark')
    real_images: Path = option(Path('../shared/realct'), 'a real DeepLesion-layout folder with PNGs whose appearance is measured the '
                               'same way (skipped if missing)', group='benchmark')
    patients: int = option(250, 'patients to generate if --data is missing (the demo: 250)', at_least=3, group='benchmark')
    native: int = option(256, 'slice size to generate if --data is missing (the demo: 256)', at_least=32, group='benchmark')

    def __post_init__(self): check_fields(self)


def add_parser(sub) -> None:
    sa = sub.add_parser('stats', help="the built-in data's lesions against real DeepLesion rows: KS distances and appearance",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_settings(sa, StatsSettings)
    sa.set_defaults(run=lambda ap, args: stats(**vars(from_args(StatsSettings, ap, args))))
