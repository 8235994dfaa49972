"""Does a pretrained autoencoder keep the lesions? Its reconstructions of validation key slices scored
inside the lesion boxes, in the ring around them and over the whole slice. Labels are used to
measure here, never to train.

    python -m lesion_fastai.bench lesions --pretrained runs/pretrain/pretrained.pth --data data/synthetic
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_decoder, load_encoder, load_pretrained
from ..data import CTSlice, SliceSpec
from ..deeplesion import evaluation_records, load_data
from ..genesis import RATES as GENESIS_RATES
from ..log import log
from ..models.autoencoder import Autoencoder
from ..pretraining import corruption_of, key_channels
from ..settings import check_fields, from_args, option
from .common import add_bench_settings

__all__ = ['lesion_reconstruction', 'lesion_reconstruction_of', 'lesions', 'add_parser']


def _masks(box_px, scale: float, size: int):
    "The box (slice pixels) at the model's size, and a ring around it as wide as half its sides: [size, size] bools."
    x1, y1, x2, y2 = np.asarray(box_px) * scale
    inside, ring = np.zeros((size, size), bool), np.zeros((size, size), bool)
    mx, my = max(1., (x2 - x1) / 2), max(1., (y2 - y1) / 2)
    cl = lambda v: int(np.clip(round(v), 0, size))
    ring[cl(y1 - my):cl(y2 + my + 1), cl(x1 - mx):cl(x2 + mx + 1)] = True
    inside[cl(y1):cl(y2 + 1), cl(x1):cl(x2 + 1)] = True
    return inside, ring & ~inside


@torch.no_grad()
def lesion_reconstruction(model, records, spec: SliceSpec, corruption, seed: int = 0) -> dict:
    """For the clean and the corrupted (pretext) input of each record's key slice: the reconstruction's
    L1 error over the slice, inside the lesion boxes and in the ring around them (the same neighbourhood
    without the lesion), and the share of each lesion's contrast
    against its surrounding ring (box mean minus ring mean) that the reconstruction keeps (1: kept,
    0: erased; lesions under 0.02 of contrast in the input are left out). `corruption` is the
    pretext's (`pretraining.corruption_of`). Returns means and the median share kept."""
    load, size = CTSlice(spec), spec.size
    g = torch.Generator().manual_seed(seed)
    found = {k: {'l1_slice': [], 'l1_lesion': [], 'l1_ring': [], 'contrast_kept': []} for k in ('clean', 'corrupted')}
    model.eval()
    for r in records:
        x = load.channels(r.image_path)[None]                                   # [1, C, size, size] in [0, 1]
        inputs = {'clean': x, 'corrupted': corruption(x, generator=g)[0]}
        for kind, inp in inputs.items():
            y = model(inp)[0, 0].numpy()                                        # the key slice, first window
            x0 = x[0, 0].numpy()
            err = np.abs(y - x0)
            found[kind]['l1_slice'].append(float(err.mean()))
            for box in r.boxes:
                inside, ring = _masks(box, size / r.width, size)
                if not inside.any() or not ring.any(): continue
                found[kind]['l1_lesion'].append(float(err[inside].mean()))
                found[kind]['l1_ring'].append(float(err[ring].mean()))
                c_in = x0[inside].mean() - x0[ring].mean()
                if abs(c_in) >= .02: found[kind]['contrast_kept'].append(float((y[inside].mean() - y[ring].mean()) / c_in))
    summary = {}
    for kind, f in found.items():
        summary[kind] = {'l1_slice': float(np.mean(f['l1_slice'])), 'l1_lesion': float(np.mean(f['l1_lesion'])),
                         'l1_ring': float(np.mean(f['l1_ring'])),
                         'contrast_kept_median': float(np.median(f['contrast_kept'])) if f['contrast_kept'] else float('nan'),
                         'lesions': len(f['l1_lesion']), 'lesions_with_contrast': len(f['contrast_kept'])}
    return summary


def lesion_reconstruction_of(pretrained: Path | str, data: Path | str, split: str = 'val') -> dict:
    "`lesion_reconstruction` of a `python -m pretrain` checkpoint, with its settings, on the split's key slices."
    ckpt = load_pretrained(pretrained)
    cfg = ckpt['config']
    model = Autoencoder(**ckpt['model_args'])                   # the autoencoder's own construction arguments
    load_encoder(model.encoder, ckpt, str(pretrained)); load_decoder(model.decoder, ckpt, str(pretrained))
    _, records = load_data(Path(data))
    keys = key_channels(cfg['in_chans'], cfg['context']) if cfg.get('pretext') == 'context' else None
    rates = {f'genesis_{k}': cfg.get(f'genesis_{k}') for k in GENESIS_RATES}      # a checkpoint from before them: the official ones
    pretext = SimpleNamespace(pretext=cfg.get('pretext', 'masked'), **{k: cfg[k] for k in ('mask_ratio', 'patch', 'noise_std')}, **rates)
    return lesion_reconstruction(model, evaluation_records(records, split), SliceSpec.of(cfg),
                                 corruption_of(pretext, keys))


def lesions(checkpoints, data: Path) -> str:
    """Per checkpoint: validation reconstruction L1 over the slice and inside the lesion boxes, and the
    median share of lesion contrast the reconstruction keeps, from the clean and the pretext's input."""
    lines = ['| checkpoint | pretext | input | L1, whole slice | L1, inside lesion boxes | L1, ring around them | lesion contrast kept (median) | lesions |',
             '|---|---|---|---|---|---|---|---|']
    for ckpt in checkpoints:
        pretext = load_pretrained(ckpt)['config'].get('pretext', 'masked')
        for kind, r in lesion_reconstruction_of(ckpt, data).items():
            lines.append(f"| {ckpt} | {pretext} | {kind} | {r['l1_slice']:.4f} | {r['l1_lesion']:.4f} | {r['l1_ring']:.4f} | {r['contrast_kept_median']:.2f} | "
                         f"{r['lesions_with_contrast']} of {r['lesions']} |")
    table = '\n'.join(lines)
    log.info(table)
    return table


@dataclass(kw_only=True)
class LesionsSettings:
    "Settings of `bench lesions`."
    pretrained: list = option(help='pretrained.pth files of python -m pretrain', parse=Path, nargs='+', group='benchmark')
    data: Path = option(help='the data they were pretrained on', group='benchmark')

    def __post_init__(self): check_fields(self)


def add_parser(sub) -> None:
    le = sub.add_parser('lesions', help="does a pretrained autoencoder keep the lesions? its validation reconstructions inside the boxes",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_settings(le, LesionsSettings, required=('pretrained', 'data'))
    le.set_defaults(run=lambda ap, args: (lambda s: lesions(s.pretrained, s.data))(from_args(LesionsSettings, ap, args)))
