"""Built-in synthetic CT data in DeepLesion's exact layout: `DL_info.csv` (18 columns) and
`Images_png/<patient>_<study>_<series>/<slice:03d>.png` (uint16, HU + 32768).

Each slice is an abdominal phantom in HU: body with subcutaneous fat and muscle wall, liver, spleen,
kidneys, spine, aorta and bowel loops, some of which are soft-tissue blobs that look like lesions (the
distractors a localizer must learn to ignore). Lesions follow DeepLesion's statistics (`SITES`,
`LESIONS_PER_SLICE`, `DIAMETER_MM`): about 1.02 per key slice, long diameters log-normal around 19 mm,
in the liver, kidneys, spleen, psoas, abdominal wall or beside the aorta (lymph nodes), tens of HU from
their background. Lesions are
ellipsoids, so they shrink or vanish on the neighbour slices, which carry no labels, as in DeepLesion.

    python -m lesion_fastai.synthetic --out data/synthetic --patients 60 --size 512 --seed 0
"""
from __future__ import annotations

from .log import hush_third_party
hush_third_party(__name__)       # run as a command: quiet known third-party warnings before fastai loads

import argparse
import csv
import math
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .deeplesion import COLUMNS, save_hu
from .log import log, progress

__all__ = ['generate', 'render_slice', 'main']

LESION_TYPES = {'liver': 4, 'kidney': 6, 'spleen': 2, 'node': 2, 'muscle': 7, 'wall': 7}  # DeepLesion's coarse types

# Where lesions go: types in the mix of the real DeepLesion sample's labelled abdominal lesions (abdomen 46%,
# soft tissue 36%, liver 13%; kidney 5%, which DeepLesion has though the sample does not).
SITES = {'node': .36, 'spleen': .10, 'muscle': .16, 'wall': .20, 'liver': .13, 'kidney': .05}
# Lesions per labelled key slice: DeepLesion has 32,735 lesions on 32,120 key slices (1.019 per slice).
LESIONS_PER_SLICE = {1: .981, 2: .018, 3: .001}
# Long diameter in mm: log-normal, median 19 mm, as the real sample (5% / 95%: 7 / 60 mm), within 3-120 mm.
DIAMETER_MM = dict(median=19., sigma=.65, low=3., high=120.)


@dataclass
class Ellipse:
    cx: float; cy: float; a: float; b: float; theta: float = 0.  # pixels, radians

    def inside(self, xx, yy, soft=1.0):
        "Soft indicator in [0, 1]: 1 inside, 0 outside, a ramp `soft` pixels wide at the edge."
        c, s = math.cos(self.theta), math.sin(self.theta)
        u, v = (xx - self.cx) * c + (yy - self.cy) * s, -(xx - self.cx) * s + (yy - self.cy) * c
        r = np.sqrt((u / self.a) ** 2 + (v / self.b) ** 2)
        return np.clip((1 - r) * min(self.a, self.b) / soft + 0.5, 0., 1.)

    def window(self, S, soft=1.0):
        "Slices (rows, cols) of an S x S image that hold the ellipse and its soft edge."
        hx, hy = self.extent()
        pad = soft + 2
        x0, x1 = max(0, int(self.cx - hx - pad)), min(S, int(self.cx + hx + pad) + 1)
        y0, y1 = max(0, int(self.cy - hy - pad)), min(S, int(self.cy + hy + pad) + 1)
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))

    def extent(self):
        "Axis-aligned half extents of the rotated ellipse."
        c, s = math.cos(self.theta), math.sin(self.theta)
        return math.hypot(self.a * c, self.b * s), math.hypot(self.a * s, self.b * c)

    def scaled(self, f):
        return Ellipse(self.cx, self.cy, self.a * f, self.b * f, self.theta)


def _anatomy(rng: np.random.Generator, S: int) -> dict:
    "One study's anatomy in pixels at size S; organs as ellipses, HU per tissue (contrast phase)."
    enhanced = rng.random() < 0.6
    cx, cy = S / 2 + rng.normal(0, S * .01), S / 2 + rng.normal(0, S * .015)
    A, B = S * rng.uniform(.38, .45), S * rng.uniform(.28, .34)
    body = Ellipse(cx, cy, A, B)
    fat_t = rng.uniform(.04, .12)
    an = {
        'enhanced': enhanced,
        'body': body,
        'muscle_wall': Ellipse(cx, cy, A * (1 - fat_t), B * (1 - fat_t * 1.3)),
        'visceral': Ellipse(cx, cy, A * (1 - fat_t - .05), B * (1 - fat_t * 1.3 - .07)),
        'liver': Ellipse(cx - A * rng.uniform(.38, .5), cy - B * rng.uniform(.05, .25), A * rng.uniform(.32, .42),
                         B * rng.uniform(.4, .55), rng.uniform(-.5, .2)),
        'spleen': Ellipse(cx + A * rng.uniform(.5, .6), cy - B * rng.uniform(0, .25), A * rng.uniform(.1, .16),
                          B * rng.uniform(.22, .3), rng.uniform(-.8, -.2)),
        'kidney_l': Ellipse(cx - A * rng.uniform(.28, .36), cy + B * rng.uniform(.3, .42), A * .12, B * .2, rng.uniform(.3, .7)),
        'kidney_r': Ellipse(cx + A * rng.uniform(.28, .36), cy + B * rng.uniform(.3, .42), A * .12, B * .2, -rng.uniform(.3, .7)),
        'vertebra': Ellipse(cx, cy + B * .55, A * .1, B * .14),
        'canal': Ellipse(cx, cy + B * .78, A * .04, B * .05),
        'psoas_l': Ellipse(cx - A * .17, cy + B * .62, A * .07, B * .1),
        'psoas_r': Ellipse(cx + A * .17, cy + B * .62, A * .07, B * .1),
        'aorta': Ellipse(cx - A * .05, cy + B * .28, S * .028, S * .028),
        'ivc': Ellipse(cx + A * .12, cy + B * .25, S * .03, S * .022),
        'hu': {'fat': rng.uniform(-115, -85), 'muscle': rng.uniform(40, 55),
               'liver': rng.uniform(100, 120) if enhanced else rng.uniform(50, 65),
               'spleen': rng.uniform(100, 125) if enhanced else rng.uniform(42, 52),
               'kidney': rng.uniform(140, 190) if enhanced else rng.uniform(28, 38),
               'vessel': rng.uniform(150, 220) if enhanced else rng.uniform(35, 50),
               'bone': rng.uniform(250, 400), 'cortex': rng.uniform(600, 900)},
    }
    # Bowel loops in the anterior abdomen: gas, fluid, oral contrast, or soft-tissue blobs that look like lesions.
    loops = []
    for _ in range(rng.integers(6, 12)):
        r = S * rng.uniform(.02, .05)
        ang = rng.uniform(math.pi * 1.05, math.pi * 1.95)
        rad = rng.uniform(.05, .6)
        loops.append((Ellipse(cx + A * rad * math.cos(ang) * .9, cy + B * rad * math.sin(ang) * .8 + B * .1,
                              r, r * rng.uniform(.6, 1.), rng.uniform(0, math.pi)),
                      rng.choice(['gas', 'fluid', 'contrast', 'soft', 'soft']), rng.normal(0, 1, 2)))
    an['loops'] = loops
    return an


def _lesion(rng: np.random.Generator, an: dict, S: int, spacing: float, hu: dict) -> dict:
    """A lesion ellipsoid placed in an organ, the abdominal wall or beside the aorta, with a contrast of
    tens of HU; `spacing` is mm per pixel at this image size."""
    site = rng.choice(list(SITES), p=list(SITES.values()))
    d_mm = float(np.clip(rng.lognormal(math.log(DIAMETER_MM['median']), DIAMETER_MM['sigma']), DIAMETER_MM['low'], DIAMETER_MM['high']))
    a = d_mm / spacing / 2
    b = a * rng.uniform(.55, 1.)
    if site == 'liver': host = an['liver']
    elif site == 'spleen': host = an['spleen']
    elif site == 'kidney': host = an['kidney_l' if rng.random() < .5 else 'kidney_r']
    elif site == 'muscle': host = an['psoas_l' if rng.random() < .5 else 'psoas_r']
    else: host = None
    if site == 'wall':  # a soft-tissue nodule in the subcutaneous fat, between the skin and the muscle wall
        body, wall = an['body'], an['muscle_wall']
        ang = rng.uniform(0, 2 * math.pi)
        f = rng.uniform(.2, .8)
        cx = body.cx + (wall.a + f * (body.a - wall.a)) * math.cos(ang)
        cy = body.cy + (wall.b + f * (body.b - wall.b)) * math.sin(ang)
        value = rng.uniform(20, 50)
    elif host is not None:
        ang, rad = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, .5))
        cx, cy = host.cx + host.a * rad * math.cos(ang), host.cy + host.b * rad * math.sin(ang)
        base = {'liver': hu['liver'], 'spleen': hu['spleen'], 'kidney': hu['kidney'], 'muscle': hu['muscle']}[site]
        value = base + rng.choice([-1, -1, -1, 1]) * rng.uniform(20, 60)
        if site == 'kidney': value = rng.uniform(0, 20)  # cyst
    else:  # lymph node beside the aorta / IVC, in retroperitoneal fat
        ao = an['aorta']
        ang = rng.uniform(-math.pi, math.pi)
        dist = ao.a + a + S * rng.uniform(.005, .03)
        cx, cy = ao.cx + dist * math.cos(ang), ao.cy + dist * math.sin(ang)
        value = rng.uniform(30, 55)
    e = Ellipse(cx, cy, a, b, rng.uniform(0, math.pi))
    rz_mm = max(a, b) * spacing * rng.uniform(.6, 1.2)  # half extent along z in mm
    return {'ellipse': e, 'value': value, 'rz_mm': rz_mm, 'type': LESION_TYPES[site]}


def render_slice(an: dict, lesions: list[tuple[Ellipse, float]], dz_mm: float, S: int, noise: float,
                 rng: np.random.Generator) -> np.ndarray:
    """The HU image [S, S] of a study at `dz_mm` from its first key slice: organs change slowly with z,
    bowel loops drift; `lesions` are (cross-section, HU) pairs already cut at this slice."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    hu = an['hu']
    img = np.full((S, S), -1000., np.float32)
    def paint(e, value, soft=1.0):
        win = e.window(S, soft)
        m = e.inside(xx[win], yy[win], soft)
        img[win] = img[win] * (1 - m) + value * m
    zf = math.sqrt(max(.2, 1 - (dz_mm / 150) ** 2))
    paint(an['body'], hu['fat'], 1.5)
    paint(an['muscle_wall'], hu['muscle'])
    paint(an['visceral'], hu['fat'] + 10)
    paint(an['liver'].scaled(zf), hu['liver'])
    paint(an['spleen'].scaled(zf), hu['spleen'])
    for k in ('kidney_l', 'kidney_r'): paint(an[k].scaled(zf), hu['kidney'])
    for k in ('psoas_l', 'psoas_r'): paint(an[k], hu['muscle'])
    paint(an['vertebra'].scaled(1.2), hu['cortex'])
    paint(an['vertebra'], hu['bone'])
    paint(an['canal'], 20.)
    paint(an['aorta'], hu['vessel'])
    paint(an['ivc'], hu['vessel'] - 20)
    contents = {'gas': -900., 'fluid': 10., 'contrast': 250., 'soft': hu['muscle'] + 5}
    for e, kind, drift in an['loops']:
        dz = max(-30., min(30., dz_mm))  # loops wander a little, and stay in the abdomen
        e = Ellipse(e.cx + drift[0] * dz * .3 * S / 512, e.cy + drift[1] * dz * .3 * S / 512, e.a, e.b, e.theta)
        paint(e.scaled(1.25), hu['muscle'])      # wall
        paint(e, contents[kind])
    for e, value in lesions: paint(e, value, 1.2)
    img += rng.normal(0, noise, img.shape).astype(np.float32)
    return img


def _fmt(*v) -> str:
    return ', '.join(f'{x:g}' if isinstance(x, (int, np.integer)) else f'{x:.4f}'.rstrip('0').rstrip('.') for x in v)


def _row(fname, patient, study, series, key, les, box, spacing, z_mm, S, slice_range, gender, age, split, lesion_type, noisy=0):
    e = les['ellipse']
    c, s = math.cos(e.theta), math.sin(e.theta)
    (a, ua), (b, ub) = sorted([(e.a, (c, s)), (e.b, (-s, c))], key=lambda t: -t[0])
    recist = (e.cx - a * ua[0], e.cy - a * ua[1], e.cx + a * ua[0], e.cy + a * ua[1],
              e.cx - b * ub[0], e.cy - b * ub[1], e.cx + b * ub[0], e.cy + b * ub[1])
    return [fname, patient, study, series, key, _fmt(*recist), _fmt(*box), _fmt(2 * a, 2 * b),
            _fmt(e.cx / S, e.cy / S, z_mm), lesion_type, noisy, _fmt(*slice_range),
            _fmt(spacing, spacing, 5.0), _fmt(S, S), '-175, 275', gender, age, split]


def _write_patient(tmp: Path, p: int, split: int, size: int, seed: int, neighbours: int, noise, mix) -> list:
    """Render and write one patient's series (its own random streams, so patients can be written in any
    order or process and give the same files); returns its DL_info rows."""
    rows = []
    prng = np.random.default_rng([seed, p])
    gender, age = prng.choice(['M', 'F']), int(prng.integers(20, 90))
    for study in range(1, int(prng.integers(1, 3)) + 1):
        an = _anatomy(prng, size)
        spacing = float(np.clip(prng.normal(.82, .12), .5, .98)) * 512 / size      # mm per pixel (DeepLesion: median ~0.82)
        keys = sorted(int(k) for k in prng.choice(np.arange(20, 80), size=int(prng.integers(1, 3)), replace=False))
        if len(keys) == 2 and keys[1] - keys[0] < 2 * neighbours + 1: keys = keys[:1]
        counts = prng.choice(list(mix), size=len(keys), p=list(mix.values()))
        key_lesions = {k: [_lesion(prng, an, size, spacing, an['hu']) for _ in range(int(n))] for k, n in zip(keys, counts)}
        series_dir = tmp / 'Images_png' / f'{p:06d}_{study:02d}_01'
        # As in DeepLesion, only slices around each key slice are shipped.
        for sl in sorted({k + o for k in keys for o in range(-neighbours, neighbours + 1)}):
            # A lesion is an ellipsoid: this slice cuts it if it lies within its z half extent (5 mm slices).
            cuts = []
            for k, ls in key_lesions.items():
                for l in ls:
                    dz = (sl - k) * 5.
                    if abs(dz) < l['rz_mm']:
                        cuts.append((l['ellipse'].scaled(math.sqrt(1 - (dz / l['rz_mm']) ** 2)), l['value']))
            srng = np.random.default_rng([seed, p, study, sl])
            img = render_slice(an, cuts, (sl - keys[0]) * 5., size, float(srng.uniform(*noise)), srng)
            save_hu(series_dir / f'{sl:03d}.png', img)
        for k, ls in key_lesions.items():
            fname = f'{p:06d}_{study:02d}_01_{k:03d}.png'
            for l in ls:
                hx, hy = l['ellipse'].extent()
                e = l['ellipse']
                box = (max(0., e.cx - hx - 5), max(0., e.cy - hy - 5), min(size - 1., e.cx + hx + 5), min(size - 1., e.cy + hy + 5))
                lesion_type = -1 if split == 1 else l['type']
                rows.append(_row(fname, p, study, 1, k, l, box, spacing, k * 5. / 400, size, (k - neighbours, k + neighbours),
                                 gender, age, split, lesion_type, 0))
    return rows


def generate(out: Path | str, patients: int = 60, size: int = 512, seed: int = 0, neighbours: int = 2,
             noise: tuple[float, float] = (10., 20.), noisy: float = 0., lesions_per_slice: dict | None = None, workers: int = 1) -> Path:
    """Write a synthetic DeepLesion-layout data set to `out` and return the path of its `DL_info.csv`.

    Patients are split 70 / 15 / 15 into train / val / test (Train_Val_Test 1 / 2 / 3). Each patient has
    1-2 studies; each study one series with 1-2 key slices and `neighbours` unlabeled slices on each side.
    `lesions_per_slice` ({count: probability}) replaces DeepLesion's mix (`LESIONS_PER_SLICE`), e.g. for
    a small set that must hold multi-lesion slices. Deterministic for a seed. A `noisy` fraction of the lesion rows is marked `Possibly_noisy` = 1
    (DeepLesion marks about 0.3% of its test lesions), drawn from a stream of its own, so the images
    and every other column are the same whatever `noisy` is. Written to a temporary folder first, then
    moved into place, so an interrupted run leaves no half data set behind. `workers` processes write
    patients in parallel: the files are the same for any number.
    """
    if not 0 <= noisy <= 1: raise ValueError(f"noisy {noisy}: expected a fraction in [0, 1]")
    out = Path(out)
    if (out / 'DL_info.csv').exists(): raise FileExistsError(f"{out}/DL_info.csv exists; remove {out} to regenerate")
    rng = np.random.default_rng(seed)
    n_val = n_test = max(1, round(patients * .15))
    splits = [1] * (patients - n_val - n_test) + [2] * n_val + [3] * n_test
    rng.shuffle(splits)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix='.synthetic-', dir=out.parent))
    noisy_rng = np.random.default_rng([seed, 7919])
    jobs = [(tmp, p, split, size, seed, neighbours, noise, lesions_per_slice or LESIONS_PER_SLICE) for p, split in enumerate(splits, 1)]
    what = f'writing {patients} patients at {size} px'
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            per_patient = list(progress(pool.map(_write_patient, *zip(*jobs), chunksize=4), what, total=len(jobs)))
    else: per_patient = [_write_patient(*job) for job in progress(jobs, what)]
    rows = [row for rs in per_patient for row in rs]
    for row in rows: row[10] = int(noisy_rng.random() < noisy)          # Possibly_noisy, in row order
    with open(tmp / 'DL_info.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)
    try: tmp.rename(out)                      # atomic, where `out` does not exist or is an empty folder
    except OSError:
        if (out / 'DL_info.csv').exists():       # another process wrote the same data set meanwhile
            shutil.rmtree(tmp)
            raise FileExistsError(f"{out}/DL_info.csv appeared while generating; remove {out} to regenerate") from None
        for item in tmp.iterdir(): shutil.move(str(item), out / item.name)
        tmp.rmdir()
    return out / 'DL_info.csv'


def main(argv=None):
    ap = argparse.ArgumentParser(prog='python -m lesion_fastai.synthetic', description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument('--out', required=True, type=Path, help='folder to write DL_info.csv and Images_png/ into')
    ap.add_argument('--patients', type=int, default=60, help='number of patients (split 70/15/15 by patient)')
    ap.add_argument('--size', type=int, default=512, help='slice size in pixels (DeepLesion: 512)')
    ap.add_argument('--seed', type=int, default=0, help='random seed; the same seed gives the same files')
    ap.add_argument('--neighbours', type=int, default=2, help='unlabeled slices written on each side of a key slice')
    ap.add_argument('--noisy', type=float, default=0., help='fraction of lesion rows marked Possibly_noisy = 1 (DeepLesion: about '
                    '0.003 of its test lesions); evaluation drops them as the official protocol does')
    ap.add_argument('--workers', type=int, default=1, help='processes writing patients in parallel (the files are the same for any number)')
    ap.add_argument('--figure', type=Path, default=None, help='also save a figure of a few key slices with their boxes')
    args = ap.parse_args(argv)
    if args.patients < 3: ap.error('--patients must be at least 3 (one per split)')
    if args.size < 32: ap.error('--size must be at least 32')
    if not 0 <= args.noisy <= 1: ap.error(f'--noisy must be a fraction in [0, 1], got {args.noisy}')
    csv_path = generate(args.out, args.patients, args.size, args.seed, args.neighbours, noisy=args.noisy, workers=args.workers)
    log.info(f"wrote {csv_path} and {args.out / 'Images_png'}")
    if args.figure is not None:
        from .deeplesion import read_dl_info, slice_records
        from .plots import plot_slices
        plot_slices(slice_records(read_dl_info(csv_path))[:8], args.figure)
        log.info(f"wrote {args.figure}")


if __name__ == '__main__':
    main()
