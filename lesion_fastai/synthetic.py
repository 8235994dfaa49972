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
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .settings import add_settings, check_fields, from_args, option
from .deeplesion import COLUMNS, format_numbers as _fmt, save_hu
from .files import pid_alive
from .log import log, progress

__all__ = ['generate', 'render_slice', 'SyntheticSettings', 'parser', 'main']

# Body regions a study covers, with the share of DeepLesion's labelled lesions found there and where they lie along
# the body (normalized z, mean and spread, from the official test split's rows per coarse type: lung and mediastinum
# 0.37-0.56, abdomen, liver and kidney 0.57-0.70, pelvis 0.74-0.84).
REGIONS = {'chest': dict(share=.425, z=(.465, .06)), 'abdomen': dict(share=.47, z=(.635, .045)), 'pelvis': dict(share=.105, z=(.80, .04))}
# Where lesions go within a region, and their coarse types: the shares of the official test split's 4,927 rows
# (bone 2%, abdomen 24%, mediastinum 17%, liver 14%, lung 22%, kidney 5%, soft tissue 7%, pelvis 8%).
SITES = {'chest': {'lung': .53, 'mediastinum': .41, 'wall': .04, 'bone': .02},
         'abdomen': {'liver': .30, 'kidney': .10, 'spleen': .10, 'node': .40, 'muscle': .04, 'wall': .04, 'bone': .02},
         'pelvis': {'pelvic_node': .80, 'wall': .13, 'bone': .07}}
LESION_TYPES = {'bone': 1, 'spleen': 2, 'node': 2, 'mediastinum': 3, 'liver': 4, 'lung': 5, 'kidney': 6, 'muscle': 7, 'wall': 7,
                'pelvic_node': 8}     # DeepLesion's coarse types
# Lesions per labelled key slice: DeepLesion has 32,735 lesions on 32,120 key slices (1.019 per slice).
LESIONS_PER_SLICE = {1: .981, 2: .018, 3: .001}
# Long diameter in mm: log-normal, median 19 mm, as the real sample (5% / 95%: 7 / 60 mm), within 3-120 mm.
DIAMETER_MM = dict(median=19., sigma=.65, low=3., high=120.)
# A lesion's contrast against the organ it sits in, |HU|: real liver lesions measure quartiles 18 / 31 / 42 HU
# (median of the box's central half against the ring around it, `bench stats`).
CONTRAST_HU = dict(mean=34., std=17., low=6.)
# Slice intervals in mm and their shares in the official test split (1 mm 47%, 5 mm 50%, 2 mm 2%, the rest 1%).
SLICE_MM = {5.: .50, 1.: .47, 2.: .02, 3.: .01}
BOX_PAD_PX = 5       # DeepLesion pads the RECIST extent by 5 px each side on its 512 px slices
BODY_MM = 400        # the key slice's number is its position along the body: z x BODY_MM / slice interval


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

    def at(self, fx, fy):
        "The point at (fx, fy) of the half axes from the centre (unrotated)."
        return self.cx + fx * self.a, self.cy + fy * self.b


def _tissue_hu(rng: np.random.Generator, enhanced: bool) -> dict:
    "HU per tissue for one study (contrast phase or not)."
    u = rng.uniform
    return {'fat': u(-115, -85), 'muscle': u(40, 55), 'liver': u(100, 120) if enhanced else u(50, 65),
            'spleen': u(100, 125) if enhanced else u(42, 52), 'kidney': u(140, 190) if enhanced else u(28, 38),
            'vessel': u(150, 220) if enhanced else u(35, 50), 'bone': u(250, 400), 'cortex': u(600, 900),
            'lung': u(-880, -820), 'heart': u(120, 160) if enhanced else u(35, 45), 'bladder': u(0, 15)}


def _anatomy(rng: np.random.Generator, S: int, region: str, spacing: float) -> dict:
    """One study's anatomy in pixels at size S: the body of a chest, abdomen or pelvis slice as an ordered list of
    (name, ellipse, HU, shrinks along z) to paint, HU per tissue, and the hosts lesions are placed in."""
    hu = _tissue_hu(rng, rng.random() < 0.6)
    cx, cy = S / 2 + rng.normal(0, S * .01), S / 2 + rng.normal(0, S * .015)
    # the body's half width, 140-200 mm, in pixels of `spacing` mm (a field of view fitted to the patient)
    A = min(S * .47, rng.uniform(140, 200) / spacing)
    B = A * rng.uniform(.62, .80)
    body = Ellipse(cx, cy, A, B)
    fat_t = rng.uniform(.04, .12)
    wall = Ellipse(cx, cy, A * (1 - fat_t), B * (1 - fat_t * 1.3))
    inner = Ellipse(cx, cy, A * (1 - fat_t - .05), B * (1 - fat_t * 1.3 - .07))
    u = rng.uniform
    parts = [('body', body, hu['fat'], False), ('muscle_wall', wall, hu['muscle'], False), ('visceral', inner, hu['fat'] + 10, False)]
    an = {'hu': hu, 'body': body, 'muscle_wall': wall, 'region': region, 'loops': [], 'dots': []}
    vertebra = Ellipse(cx, cy + B * .55, A * .1, B * .14)
    if region == 'chest':
        lungs = [Ellipse(cx + sgn * A * u(.40, .48), cy - B * u(0, .08), A * u(.32, .38), B * u(.60, .70), sgn * u(0, .15)) for sgn in (-1, 1)]
        heart = Ellipse(cx + A * u(.05, .15), cy - B * u(.05, .2), A * u(.22, .28), B * u(.32, .4), u(-.4, .1))
        aorta = Ellipse(cx + A * .05, cy + B * .30, S * .03, S * .03)
        parts += [('lung_r', lungs[0], hu['lung'], True), ('lung_l', lungs[1], hu['lung'], True), ('heart', heart, hu['heart'], True),
                  ('aorta', aorta, hu['vessel'], False)]
        an.update(lungs=lungs, aorta=aorta, mediastinum=Ellipse(cx, cy - B * .1, A * .16, B * .45))
        an['dots'] = [(Ellipse(*lung.at(*(rng.uniform(-.8, .8, 2) * .8)), r, r), hu['vessel'] * .4)
                      for lung in lungs for r in S * rng.uniform(.003, .009, rng.integers(8, 20))]
    elif region == 'pelvis':
        ilia = [Ellipse(cx + sgn * A * u(.45, .55), cy + B * u(.1, .25), A * .1, B * .32, sgn * u(.3, .6)) for sgn in (-1, 1)]
        bladder = Ellipse(cx, cy - B * u(.2, .35), A * u(.15, .25), B * u(.2, .3))
        vessels = [Ellipse(cx + sgn * A * u(.28, .34), cy + B * u(.05, .15), S * .018, S * .018) for sgn in (-1, 1)]
        parts += [(f'ilium_{i}_cortex', e.scaled(1.15), hu['cortex'], False) for i, e in enumerate(ilia)]
        parts += [(f'ilium_{i}', e, hu['bone'], False) for i, e in enumerate(ilia)]
        parts += [('bladder', bladder, hu['bladder'], True)] + [(f'iliac_{i}', v, hu['vessel'], False) for i, v in enumerate(vessels)]
        an.update(vessels=vessels, bones=ilia)
        an['loops'] = _loops(rng, cx, cy, A, B * .8, S, hu)
    else:
        liver = Ellipse(cx - A * u(.38, .5), cy - B * u(.05, .25), A * u(.32, .42), B * u(.4, .55), u(-.5, .2))
        spleen = Ellipse(cx + A * u(.5, .6), cy - B * u(0, .25), A * u(.1, .16), B * u(.22, .3), u(-.8, -.2))
        kidneys = [Ellipse(cx + sgn * A * u(.28, .36), cy + B * u(.3, .42), A * .12, B * .2, sgn * u(.3, .7)) for sgn in (-1, 1)]
        psoas = [Ellipse(cx + sgn * A * .17, cy + B * .62, A * .07, B * .1) for sgn in (-1, 1)]
        aorta = Ellipse(cx - A * .05, cy + B * .28, S * .028, S * .028)
        parts += [('liver', liver, hu['liver'], True), ('spleen', spleen, hu['spleen'], True),
                  ('kidney_r', kidneys[0], hu['kidney'], True), ('kidney_l', kidneys[1], hu['kidney'], True),
                  ('psoas_r', psoas[0], hu['muscle'], False), ('psoas_l', psoas[1], hu['muscle'], False),
                  ('aorta', aorta, hu['vessel'], False), ('ivc', Ellipse(cx + A * .12, cy + B * .25, S * .03, S * .022), hu['vessel'] - 20, False)]
        an.update(liver=liver, spleen=spleen, kidneys=kidneys, psoas=psoas, aorta=aorta)
        an['loops'] = _loops(rng, cx, cy, A, B, S, hu)
    parts += [('vertebra_cortex', vertebra.scaled(1.2), hu['cortex'], False), ('vertebra', vertebra, hu['bone'], False),
              ('canal', Ellipse(cx, cy + B * .78, A * .04, B * .05), 20., False)]
    an.update(parts=parts, vertebra=vertebra)
    an.setdefault('bones', [vertebra])
    return an


def _loops(rng, cx, cy, A, B, S, hu) -> list:
    "Bowel loops in the anterior abdomen: gas, fluid, oral contrast, or soft-tissue blobs that look like lesions."
    loops = []
    for _ in range(rng.integers(6, 12)):
        r = S * rng.uniform(.02, .05)
        ang, rad = rng.uniform(math.pi * 1.05, math.pi * 1.95), rng.uniform(.05, .6)
        loops.append((Ellipse(cx + A * rad * math.cos(ang) * .9, cy + B * rad * math.sin(ang) * .8 + B * .1, r, r * rng.uniform(.6, 1.),
                              rng.uniform(0, math.pi)), rng.choice(['gas', 'fluid', 'contrast', 'soft', 'soft']), rng.normal(0, 1, 2)))
    return loops


def _contrast(rng) -> float:
    "How many HU a lesion differs from the organ it sits in (`CONTRAST_HU`)."
    return max(CONTRAST_HU['low'], rng.normal(CONTRAST_HU['mean'], CONTRAST_HU['std']))


def _inside(rng, host: Ellipse, reach: float = .6) -> tuple[float, float]:
    "A point inside `host`, at most `reach` of its half axes from its centre."
    ang, rad = rng.uniform(0, 2 * math.pi), reach * math.sqrt(rng.uniform(0, 1))
    return host.at(rad * math.cos(ang), rad * math.sin(ang))


def _lesion(rng: np.random.Generator, an: dict, S: int, spacing: float) -> dict:
    """A lesion ellipsoid at one of its region's sites (`SITES`), with the contrast real lesions have against
    their surroundings: tens of HU in an organ, more for a node in fat or a nodule in the lung; `spacing` is mm
    per pixel at this image size."""
    hu, sites = an['hu'], SITES[an['region']]
    site = rng.choice(list(sites), p=list(sites.values()))
    d_mm = float(np.clip(rng.lognormal(math.log(DIAMETER_MM['median']), DIAMETER_MM['sigma']), DIAMETER_MM['low'], DIAMETER_MM['high']))
    a = d_mm / spacing / 2
    b = a * rng.uniform(.4, 1.)
    dark = rng.random() < .75                       # most organ lesions are hypodense (cysts, metastases)
    if site in ('liver', 'spleen', 'kidney', 'muscle'):
        kidney, psoas = an['kidneys'][rng.integers(2)], an['psoas'][rng.integers(2)]     # both drawn whatever the site
        host = {'liver': an['liver'], 'spleen': an['spleen'], 'kidney': kidney, 'muscle': psoas}[site]
        cx, cy = _inside(rng, host, max(.1, .7 - a / min(host.a, host.b)))
        value = hu[site] + (-1 if dark else 1) * _contrast(rng)
    elif site == 'lung':
        cx, cy = _inside(rng, an['lungs'][rng.integers(2)], .75)
        value = rng.uniform(-100, 50)                 # a solid or part-solid nodule in aerated lung
    elif site == 'bone':
        cx, cy = _inside(rng, an['bones'][rng.integers(len(an['bones']))], .4)
        a, b = min(a, an['vertebra'].a * .8), min(b, an['vertebra'].a * .8)
        value = hu['bone'] + (-1 if dark else 1) * rng.uniform(80, 250)       # lytic or sclerotic
    elif site == 'wall':  # a soft-tissue nodule in the subcutaneous fat, between the skin and the muscle wall
        body, wall = an['body'], an['muscle_wall']
        ang, f = rng.uniform(0, 2 * math.pi), rng.uniform(.2, .8)
        cx = body.cx + (wall.a + f * (body.a - wall.a)) * math.cos(ang)
        cy = body.cy + (wall.b + f * (body.b - wall.b)) * math.sin(ang)
        value = rng.uniform(20, 50)
    else:  # a lymph node in fat: beside the aorta (abdomen), in the mediastinum, or beside the iliac vessels (pelvis)
        anchor = {'node': lambda: an['aorta'], 'mediastinum': lambda: an['aorta'] if rng.random() < .4 else Ellipse(*_inside(rng, an['mediastinum'], .9), 1, 1),
                  'pelvic_node': lambda: an['vessels'][rng.integers(2)]}[site]()
        ang = rng.uniform(-math.pi, math.pi)
        dist = anchor.a + a + S * rng.uniform(.005, .03)
        cx, cy = anchor.cx + dist * math.cos(ang), anchor.cy + dist * math.sin(ang)
        value = rng.uniform(30, 55)
    e = Ellipse(cx, cy, a, b, rng.uniform(0, math.pi))
    rz_mm = max(a, b) * spacing * rng.uniform(.6, 1.2)  # half extent along z in mm
    return {'ellipse': e, 'value': value, 'rz_mm': rz_mm, 'type': LESION_TYPES[site]}


def _smooth(noise: np.ndarray, sigma: float) -> np.ndarray:
    "Gaussian-filtered noise rescaled to unit std: texture with a grain of about `sigma` pixels."
    from scipy.ndimage import gaussian_filter
    t = gaussian_filter(noise, sigma)
    return t / max(float(t.std()), 1e-6)


def render_slice(an: dict, lesions: list[tuple[Ellipse, float]], dz_mm: float, S: int, noise: float,
                 rng: np.random.Generator) -> np.ndarray:
    """The HU image [S, S] of a study at `dz_mm` from its first key slice: organs change slowly with z,
    bowel loops drift; `lesions` are (cross-section, HU) pairs already cut at this slice, painted with soft
    margins. Tissue gets a grain of its own (parenchyma, partial volume) on top of CT's pixel noise."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    hu = an['hu']
    img = np.full((S, S), -1000., np.float32)
    def paint(e, value, soft=1.0):
        win = e.window(S, soft)
        m = e.inside(xx[win], yy[win], soft)
        img[win] = img[win] * (1 - m) + value * m
    zf = math.sqrt(max(.2, 1 - (dz_mm / 150) ** 2))
    for name, e, value, shrinks in an['parts']: paint(e.scaled(zf) if shrinks else e, value, 1.5 if name == 'body' else 1.0)
    for e, value in an['dots']: paint(e, value)
    contents = {'gas': -900., 'fluid': 10., 'contrast': 250., 'soft': hu['muscle'] + 5}
    for e, kind, drift in an['loops']:
        dz = max(-30., min(30., dz_mm))  # loops wander a little, and stay in the abdomen
        e = Ellipse(e.cx + drift[0] * dz * .3 * S / 512, e.cy + drift[1] * dz * .3 * S / 512, e.a, e.b, e.theta)
        paint(e.scaled(1.25), hu['muscle'])      # wall
        paint(e, contents[kind])
    for e, value in lesions: paint(e, value, max(1.2, .25 * min(e.a, e.b)))
    grain = _smooth(rng.normal(0, 1, (S, S)).astype(np.float32), 1.5 * S / 256) * noise * .8
    img += np.where(img > -500, grain, 0).astype(np.float32) + rng.normal(0, noise, img.shape).astype(np.float32)
    return img


def _row(fname, patient, study, series, key, les, box, spacing, slice_mm, z, S, slice_range, gender, age, split, lesion_type, body, noisy=0):
    e = les['ellipse']
    c, s = math.cos(e.theta), math.sin(e.theta)
    (a, ua), (b, ub) = sorted([(e.a, (c, s)), (e.b, (-s, c))], key=lambda t: -t[0])
    recist = (e.cx - a * ua[0], e.cy - a * ua[1], e.cx + a * ua[0], e.cy + a * ua[1],
              e.cx - b * ub[0], e.cy - b * ub[1], e.cx + b * ub[0], e.cy + b * ub[1])
    # location within the body's extent, as DeepLesion's Normalized_lesion_location
    loc = (np.clip((e.cx - body.cx + body.a) / (2 * body.a), 0, 1), np.clip((e.cy - body.cy + body.b) / (2 * body.b), 0, 1), z)
    return [fname, patient, study, series, key, _fmt(*recist), _fmt(*box), _fmt(2 * a, 2 * b),
            _fmt(*loc), lesion_type, noisy, _fmt(*slice_range),
            _fmt(spacing, spacing, slice_mm), _fmt(S, S), '-175, 275', gender, age, split]


def _write_patient(tmp: Path, p: int, split: int, size: int, seed: int, neighbours: int, noise, mix) -> list:
    """Render and write one patient's series (its own random streams, so patients can be written in any
    order or process and give the same files); returns its DL_info rows. Each study covers one body region
    (`REGIONS`) with its own slice interval (`SLICE_MM`) and pixel spacing; its key slices lie where that
    region lies along the body."""
    rows = []
    prng = np.random.default_rng([seed, p])
    gender, age = prng.choice(['M', 'F']), int(prng.integers(20, 90))
    for study in range(1, int(prng.integers(1, 3)) + 1):
        region = str(prng.choice(list(REGIONS), p=[r['share'] for r in REGIONS.values()]))
        spacing = float(np.clip(prng.normal(.82, .1), .55, .98)) * 512 / size      # mm per pixel (DeepLesion: median ~0.82)
        slice_mm = float(prng.choice(list(SLICE_MM), p=list(SLICE_MM.values())))
        an = _anatomy(prng, size, region, spacing)
        zs = np.clip(prng.normal(*REGIONS[region]['z'], size=int(prng.integers(1, 3))), .02, .98)
        keys = sorted({max(neighbours + 1, int(round(z * BODY_MM / slice_mm))) for z in zs})
        if len(keys) == 2 and keys[1] - keys[0] < 2 * neighbours + 1: keys = keys[:1]
        counts = prng.choice(list(mix), size=len(keys), p=list(mix.values()))
        key_lesions = {k: [_lesion(prng, an, size, spacing) for _ in range(int(n))] for k, n in zip(keys, counts)}
        series_dir = tmp / 'Images_png' / f'{p:06d}_{study:02d}_01'
        # As in DeepLesion, only slices around each key slice are shipped.
        for sl in sorted({k + o for k in keys for o in range(-neighbours, neighbours + 1)}):
            # A lesion is an ellipsoid: this slice cuts it if it lies within its z half extent.
            cuts = []
            for k, ls in key_lesions.items():
                for l in ls:
                    dz = (sl - k) * slice_mm
                    if abs(dz) < l['rz_mm']:
                        cuts.append((l['ellipse'].scaled(math.sqrt(1 - (dz / l['rz_mm']) ** 2)), l['value']))
            srng = np.random.default_rng([seed, p, study, sl])
            img = render_slice(an, cuts, (sl - keys[0]) * slice_mm, size, float(srng.uniform(*noise)), srng)
            save_hu(series_dir / f'{sl:03d}.png', img)
        pad = BOX_PAD_PX * size / 512
        for k, ls in key_lesions.items():
            fname = f'{p:06d}_{study:02d}_01_{k:03d}.png'
            for l in ls:
                hx, hy = l['ellipse'].extent()
                e = l['ellipse']
                box = (max(0., e.cx - hx - pad), max(0., e.cy - hy - pad), min(size - 1., e.cx + hx + pad), min(size - 1., e.cy + hy + pad))
                lesion_type = -1 if split == 1 else l['type']
                rows.append(_row(fname, p, study, 1, k, l, box, spacing, slice_mm, min(1., k * slice_mm / BODY_MM), size,
                                 (k - neighbours, k + neighbours), gender, age, split, lesion_type, an['body'], 0))
    return rows


def generate(out: Path | str, patients: int = 60, size: int = 512, seed: int = 0, neighbours: int = 2,
             noise: tuple[float, float] = (18., 32.), noisy: float = 0., lesions_per_slice: dict | None = None, workers: int = 1) -> Path:
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
    _remove_killed_generations(out)
    tmp = out.parent / f'.{out.name}.{os.getpid()}.generating'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / _MARK).touch()
    try: return _generate_into(tmp, out, splits, size, seed, neighbours, noise, lesions_per_slice, noisy, workers)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_MARK = '.lesion_fastai-synthetic'     # in a generation's temp folder: what makes it one, for `_remove_killed_generations`


def _remove_killed_generations(out: Path) -> None:
    "The temp folders of generations of `out` whose process no longer runs (killed mid-way): only folders this module made."
    for p in out.parent.glob(f'.{out.name}.*.generating'):
        pid = p.name[len(out.name) + 2:-len('.generating')]
        if pid.isdigit() and not pid_alive(int(pid)) and (p / _MARK).is_file() and not p.is_symlink(): shutil.rmtree(p, ignore_errors=True)


def _generate_into(tmp, out, splits, size, seed, neighbours, noise, lesions_per_slice, noisy, workers):
    patients = len(splits)
    noisy_rng = np.random.default_rng([seed, 7919])
    jobs = [(tmp, p, split, size, seed, neighbours, noise, lesions_per_slice or LESIONS_PER_SLICE) for p, split in enumerate(splits, 1)]
    what = f'writing {patients} patients at {size} px'
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            per_patient = list(progress(pool.map(_write_patient, *zip(*jobs), chunksize=4), what, total=len(jobs)))
    else: per_patient = [_write_patient(*job) for job in progress(jobs, what)]
    rows = [row for rs in per_patient for row in rs]
    for row in rows: row[10] = int(noisy_rng.random() < noisy)          # Possibly_noisy, in row order
    (tmp / _MARK).unlink()
    with open(tmp / 'DL_info.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)
    try: tmp.rename(out)                      # atomic, where `out` does not exist or is an empty folder
    except OSError:
        if (out / 'DL_info.csv').exists():       # another process wrote the same data set meanwhile
            shutil.rmtree(tmp)
            raise FileExistsError(f"{out}/DL_info.csv appeared while generating; remove {out} to regenerate") from None
        for item in sorted(tmp.iterdir(), key=lambda i: i.name == 'DL_info.csv'):             # the table last
            if (out / item.name).is_dir(): shutil.rmtree(out / item.name)    # a move interrupted before its table: not a data set
            shutil.move(str(item), out / item.name)
        tmp.rmdir()
    return out / 'DL_info.csv'


@dataclass(kw_only=True)
class SyntheticSettings:
    "Settings of `python -m lesion_fastai.synthetic`: what `generate` is given, and a figure of the result."
    out: Path = option(help='folder to write DL_info.csv and Images_png/ into', group='data')
    patients: int = option(60, 'number of patients (split 70/15/15 by patient; at least one per split)', at_least=3, group='data')
    size: int = option(512, 'slice size in pixels (DeepLesion: 512)', at_least=32, group='data')
    seed: int = option(0, 'random seed; the same seed gives the same files', group='data')
    neighbours: int = option(2, 'unlabeled slices written on each side of a key slice', at_least=0, group='data')
    noisy: float = option(0., 'fraction of lesion rows marked Possibly_noisy = 1 (DeepLesion: about 0.003 of its test lesions); '
                          'evaluation drops them as the official protocol does', at_least=0, at_most=1, group='data')
    workers: int = option(1, 'processes writing patients in parallel (the files are the same for any number)', group='writing')
    figure: Path | None = option(None, 'also save a figure of a few key slices with their boxes', default_help='none', group='writing')

    def __post_init__(self):
        self.out = Path(self.out)
        if self.figure is not None: self.figure = Path(self.figure)
        check_fields(self)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='python -m lesion_fastai.synthetic', description=__doc__.split('\n\n')[0])
    add_settings(ap, SyntheticSettings, required=('out',))
    return ap


def main(argv=None):
    ap = parser()
    cfg = from_args(SyntheticSettings, ap, ap.parse_args(argv))
    csv_path = generate(cfg.out, cfg.patients, cfg.size, cfg.seed, cfg.neighbours, noisy=cfg.noisy, workers=cfg.workers)
    log.info(f"wrote {csv_path} and {cfg.out / 'Images_png'}")
    if cfg.figure is not None:
        from .deeplesion import read_dl_info, slice_records
        from .plots import plot_slices
        plot_slices(slice_records(read_dl_info(csv_path))[:8], cfg.figure)
        log.info(f"wrote {cfg.figure}")


if __name__ == '__main__':
    main()
