"""The built-in generator's lesion statistics beside DeepLesion's published totals and a real sample
of DL_info.csv rows.

    python -m lesion_fastai.bench stats --sample ../shared/fixtures/DL_info_sample.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..deeplesion import lesion_statistics, read_dl_info
from ..log import log
from ..metrics import LESION_TYPES
from .common import ensure_data

__all__ = ['stats', 'add_parser']


def stats(data: Path, sample: Path | None, patients: int, native: int) -> str:
    """The built-in generator's lesion statistics beside DeepLesion's: the published totals (32,735 lesions
    on 32,120 key slices) and the real sample of DL_info rows (`sample`), as a Markdown table."""
    ensure_data(data, patients, native)
    cols = {'built-in generator': lesion_statistics(read_dl_info(data / 'DL_info.csv'))}
    if sample is not None and Path(sample).exists(): cols['real DeepLesion sample'] = lesion_statistics(read_dl_info(sample, root=Path(sample).parent))
    published = {'lesions_per_slice': 32735 / 32120}
    d = lambda c, k: f"{c['diameter_mm'][k]:.1f}"
    rows = [('lesions / key slices', lambda c: f"{c['lesions']} / {c['key_slices']}", '32,735 / 32,120'),
            ('lesions per key slice', lambda c: f"{c['lesions_per_slice']:.3f}", f"{published['lesions_per_slice']:.3f}"),
            ('key slices with several lesions', lambda c: f"{100 * c['multi_lesion_slices']:.1f}%", ''),
            ('long diameter, mm: 5% / 25% / median / 75% / 95%', lambda c: ' / '.join(d(c, k) for k in ('p5', 'p25', 'p50', 'p75', 'p95')), ''),
            ('Possibly_noisy lesions', lambda c: f"{100 * c['noisy']:.1f}%", '0.3% of the test split')]
    rows += [(f"type {t} ({name}), share of labelled lesions", (lambda t: lambda c: f"{100 * c['types'].get(t, 0):.0f}%")(t), '')
             for t, name in LESION_TYPES.items()]
    lines = [f"| statistic | {' | '.join(cols)} | DeepLesion, published |", '|---' * (len(cols) + 2) + '|']
    lines += [f"| {name} | {' | '.join(f(c) for c in cols.values())} | {pub} |" for name, f, pub in rows]
    table = '\n'.join(lines)
    log.info(table)
    return table


def add_parser(sub) -> None:
    sa = sub.add_parser('stats', help="the built-in data's lesion statistics beside DeepLesion's", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sa.add_argument('--data', type=Path, default=Path('runs/bench/efficiency/data_250p_256px'), help='data folder (generated if missing)')
    sa.add_argument('--sample', type=Path, default=Path('../shared/fixtures/DL_info_sample.csv'), help='real DL_info rows to compare with')
    sa.add_argument('--patients', type=int, default=250, help='patients to generate if --data is missing')
    sa.add_argument('--native', type=int, default=256, help='slice size to generate if --data is missing')
    sa.set_defaults(run=lambda ap, args: stats(args.data, args.sample, args.patients, args.native))
