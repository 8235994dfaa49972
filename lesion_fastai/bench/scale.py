"""The disk slice cache at scale: built and read at growing slice counts, and what that gives for
DeepLesion's ~930k slices.

    python -m lesion_fastai.bench scale --counts 5000,50000
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
import pickle
import shutil
import time
from pathlib import Path

import numpy as np

from ..cache import build_slice_cache
from ..data import SliceSpec
from ..deeplesion import list_slices
from ..log import quiet
from ..synthetic import generate
from ..settings import check_fields, from_args, option, parse_ints
from .common import add_bench_settings, machine, report

__all__ = ['DEEPLESION_SLICES', 'scale', 'add_parser']

DEEPLESION_SLICES = 930_000


def scale(out: Path, counts=(5000, 50000), native: int = 128, size: int = 64, workers: int = 2) -> dict:
    """The disk slice cache at growing sizes: one generated data set (`native` px, 20 unlabelled slices
    per key slice) large enough for the largest count; for each count its first slices are built into a
    fresh cache by `workers` processes (slices/s), then read back in a random order through an
    unpickled copy, as a DataLoader worker reads it (slices/s). Reports how the time grows and what
    that gives for DeepLesion's ~930k slices (time at the largest count's rate; size at 256 px)."""
    data = out / f'data_{native}px'
    have = len(list_slices(data)) if (data / 'DL_info.csv').exists() else 0
    if have < max(counts):
        shutil.rmtree(data, ignore_errors=True)
        generate(data, patients=max(counts) // 35 + 10, size=native, seed=11, neighbours=10, workers=workers)
    paths = list_slices(data)
    if len(paths) < max(counts): raise ValueError(f"{data}: {len(paths)} slices, fewer than {max(counts)}")
    rows = []
    for n in counts:
        folder = out / f'cache_{n}'
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        with quiet(): cache = build_slice_cache(paths[:n], SliceSpec('soft', 0, size), folder, workers=workers)
        build_s = time.perf_counter() - t
        cache = pickle.loads(pickle.dumps(cache))
        order = np.random.default_rng(0).permutation(n)
        keys = list(cache.index)
        t = time.perf_counter()
        for i in order: cache.get(keys[i])
        read_s = time.perf_counter() - t
        rows.append({'slices': n, 'build_s': build_s, 'build_per_s': n / build_s, 'read_per_s': n / read_s,
                     'cache_mb': cache.array_file.stat().st_size / 2 ** 20})
        shutil.rmtree(folder, ignore_errors=True)
    last = rows[-1]
    res = {'machine': machine(), 'native': native, 'size': size, 'workers': workers, 'rows': rows,
           'growth': last['build_s'] / rows[0]['build_s'], 'count_ratio': last['slices'] / rows[0]['slices'],
           'deeplesion_build_h': DEEPLESION_SLICES / last['build_per_s'] / 3600,
           'deeplesion_256px_gb': DEEPLESION_SLICES * 256 * 256 * 2 / 1e9}
    lines = ['| slices | build, s | build, slices/s | random reads, slices/s | cache, MB |', '|---|---|---|---|---|']
    lines += [f"| {r['slices']:,} | {r['build_s']:.1f} | {r['build_per_s']:.0f} | {r['read_per_s']:.0f} | {r['cache_mb']:.0f} |" for r in rows]
    table = '\n'.join(lines)
    summary = (f"{res['count_ratio']:.0f}x the slices took {res['growth']:.1f}x the build time; DeepLesion's {DEEPLESION_SLICES:,} slices "
               f"at the last rate: {res['deeplesion_build_h']:.1f} h with {workers} process(es) ({native} px PNG -> {size} px here), "
               f"{res['deeplesion_256px_gb']:.0f} GB at 256 px")
    report(out, 'scale', res, table, [summary])
    return res


@dataclass(kw_only=True)
class ScaleSettings:
    "Settings of `bench scale`."
    out: Path = option(Path('runs/bench/scale'), 'output folder (generated data, scale.json, scale.md)', group='benchmark')
    counts: tuple = option((5000, 50000), 'slice counts, comma separated (the data is generated for the largest)', parse=parse_ints,
                           group='benchmark')
    native: int = option(128, 'slice size of the generated PNGs', at_least=32, group='benchmark')
    size: int = option(64, 'prepared size in the cache', at_least=32, group='benchmark')
    workers: int = option(2, 'processes that generate the data and build the cache', at_least=1, group='benchmark')

    def __post_init__(self): check_fields(self)


def add_parser(sub) -> None:
    sc = sub.add_parser('scale', help='the disk slice cache from 5,000 to 50,000 slices: build and read rates, extrapolated to 930k',
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_settings(sc, ScaleSettings)
    sc.set_defaults(run=lambda ap, args: scale(**{**vars(from_args(ScaleSettings, ap, args)), 'counts': list(args.counts)}))
