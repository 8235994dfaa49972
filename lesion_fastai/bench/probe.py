"""What does each stage of an encoder know about lesions? For autoencoder checkpoints (`python -m
pretrain`, the untrained control of `--epochs 0` among them) and trained detectors side by side: a
linear probe per stage (is this cell a lesion's centre cell or a cell away from every lesion?),
fitted on training key slices and scored by its validation AUC, and each stage's weight scale and
BatchNorm statistics. Labels are used to measure here, never to train a model.

    python -m lesion_fastai.bench probe --models runs/pretrain/pretrained.pth runs/pretrain_epochs0/pretrained.pth runs/scratch \\
        --data data/synthetic
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import load_encoder, load_pretrained
from ..data import CTSlice, SliceSpec
from ..deeplesion import evaluation_records, load_data
from ..files import atomic_write_text
from ..log import log
from ..models.resnet import create_encoder
from ..settings import check_fields, from_args, option
from .common import add_bench_settings

__all__ = ['encoder_of', 'stage_features', 'probe_cells', 'probe_auc', 'auc', 'stage_statistics', 'probe', 'add_parser']


def encoder_of(path: Path | str):
    """(encoder in eval mode, `SliceSpec`) of an autoencoder checkpoint (`pretrained.pth`) or of a
    trained detector (a run folder, its `export.pkl` or its safe pair, as `predict` reads them)."""
    path = Path(path)
    if path.suffix == '.pth':
        ckpt = load_pretrained(path)
        encoder = create_encoder(ckpt['model_args']['encoder_args'])
        load_encoder(encoder, ckpt, str(path))
        return encoder.eval(), SliceSpec.of(ckpt['config'])
    from ..export import load_model
    model, spec, _ = load_model(path / 'model.safetensors' if path.is_dir() else path)
    return model.encoder.eval(), spec


@torch.no_grad()
def stage_features(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    "The stem's output and each stage's, [B, C_i, H_i, W_i]."
    out = [encoder.stem(x)]
    for stage in encoder.stages: out.append(stage(out[-1]))
    return out


def stage_names(encoder: nn.Module) -> list[str]:
    return ['stem'] + [f'stage {i + 1}' for i in range(len(encoder.stages))]


def probe_cells(encoder: nn.Module, records, spec: SliceSpec, negatives: int = 4, seed: int = 0):
    """Per stage (X [N, C], y [N]): the feature vector of the cell holding each lesion's box centre
    (1) and of `negatives` cells per slice whose centre lies outside every box and whose cell holds
    no lesion centre (0). The negative points are drawn once per slice, the same for every stage."""
    load, size, rng = CTSlice(spec), spec.size, np.random.default_rng(seed)
    found = None
    for r in records:
        scale = size / r.width
        boxes = np.asarray(r.boxes, dtype=float).reshape(-1, 4) * scale
        centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
        points = rng.uniform(0, size, (negatives * 8, 2))
        outside = ~((points[:, None, 0] >= boxes[None, :, 0]) & (points[:, None, 0] <= boxes[None, :, 2])
                    & (points[:, None, 1] >= boxes[None, :, 1]) & (points[:, None, 1] <= boxes[None, :, 3])).any(1)
        points = points[outside][:negatives]
        feats = stage_features(encoder, load.channels(r.image_path)[None])
        found = found or [([], []) for _ in feats]
        for (xs, ys), f in zip(found, feats):
            stride = size / f.shape[-1]
            cell = lambda p: (min(int(p[1] // stride), f.shape[-2] - 1), min(int(p[0] // stride), f.shape[-1] - 1))
            positive = {cell(c) for c in centres}
            for c in positive: xs.append(f[0, :, c[0], c[1]].numpy()); ys.append(1)
            for i, j in map(cell, points):
                if (i, j) not in positive: xs.append(f[0, :, i, j].numpy()); ys.append(0)
    return [(np.stack(xs), np.asarray(ys)) for xs, ys in found]


def auc(scores, labels) -> float:
    "The area under the ROC curve: the chance that a positive scores above a negative (ties count half)."
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg): return float('nan')
    above = (pos[:, None] > neg[None]).sum() + .5 * (pos[:, None] == neg[None]).sum()
    return float(above / (len(pos) * len(neg)))


def probe_auc(train, valid, wd: float = 1e-2, steps: int = 100) -> float:
    """A logistic regression on the standardised features of `train` (X, y), weighted so that both
    classes count alike, with L2 penalty `wd` (LBFGS); its validation AUC on `valid`."""
    (xt, yt), (xv, yv) = train, valid
    mean, std = xt.mean(0), xt.std(0) + 1e-6
    xt, xv = (torch.as_tensor((a - mean) / std, dtype=torch.float32) for a in (xt, xv))
    yt = torch.as_tensor(yt, dtype=torch.float32)
    weight = torch.where(yt > 0, .5 / yt.mean().clamp(min=1e-6), .5 / (1 - yt.mean()).clamp(min=1e-6))
    lin = nn.Linear(xt.shape[1], 1)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = (nn.functional.binary_cross_entropy_with_logits(lin(xt)[:, 0], yt, reduction='none') * weight).mean()
        loss = loss + wd * lin.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad(): return auc(lin(xv)[:, 0].numpy(), yv)


def stage_statistics(encoder: nn.Module) -> list[dict]:
    """Per stage (stem first): the RMS of its convolution weights, and of its BatchNorms the mean scale
    (gamma), the mean |running mean| and the mean running variance."""
    out = []
    for name, module in zip(stage_names(encoder), [encoder.stem, *encoder.stages]):
        convs = [m.weight for m in module.modules() if isinstance(m, nn.Conv2d)]
        bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
        cat = lambda ts: torch.cat([t.detach().reshape(-1).float() for t in ts]) if ts else torch.zeros(1)
        out.append({'stage': name, 'conv_rms': float(cat(convs).pow(2).mean().sqrt()),
                    'bn_gamma': float(cat([b.weight for b in bns if b.weight is not None]).mean()),
                    'bn_mean_abs': float(cat([b.running_mean for b in bns if b.running_mean is not None]).abs().mean()),
                    'bn_var': float(cat([b.running_var for b in bns if b.running_var is not None]).mean())})
    return out


def probe(models, data: Path, train_slices: int = 300, negatives: int = 4, seed: int = 0, out: Path | None = None) -> str:
    """The probe and statistics table of every model in `models` on `data`: probes fitted on up to
    `train_slices` training key slices (drawn with `seed`), scored on every validation key slice."""
    _, records = load_data(Path(data))
    train = evaluation_records(records, 'train')
    rng = np.random.default_rng(seed)
    train = [train[i] for i in sorted(rng.choice(len(train), min(train_slices, len(train)), replace=False))]
    valid = evaluation_records(records, 'val')
    lines = ['| model | stage | probe validation AUC (lesion centre cell or not) | conv weight RMS | BatchNorm gamma, mean | '
             'BatchNorm running mean, mean abs | BatchNorm running var, mean |', '|---|---|---|---|---|---|---|']
    for path in models:
        encoder, spec = encoder_of(path)
        log.info(f"probing {path}: {len(train)} training and {len(valid)} validation key slices")
        fit, score = probe_cells(encoder, train, spec, negatives, seed), probe_cells(encoder, valid, spec, negatives, seed + 1)
        for (xt, yt), (xv, yv), st in zip(fit, score, stage_statistics(encoder)):
            lines.append(f"| {path} | {st['stage']} | {probe_auc((xt, yt), (xv, yv)):.3f} ({int(yv.sum())} + {int((1 - yv).sum())}) | "
                         f"{st['conv_rms']:.4f} | {st['bn_gamma']:.3f} | {st['bn_mean_abs']:.3f} | {st['bn_var']:.3f} |")
    table = '\n'.join(lines)
    log.info(table)
    if out is not None: atomic_write_text(Path(out), table + '\n')
    return table


@dataclass(kw_only=True)
class ProbeSettings:
    "Settings of `bench probe`."
    models: list = option(help='pretrained.pth files of python -m pretrain and fine-tuned run folders (or their export.pkl)', parse=Path,
                          nargs='+', group='benchmark')
    data: Path = option(help='the data, its training key slices fit the probes and its validation ones score them', group='benchmark')
    train_slices: int = option(300, 'training key slices the probes are fitted on, drawn with --seed', at_least=1, group='benchmark')
    negatives: int = option(4, 'cells away from every lesion drawn per slice, beside its lesion centre cells', at_least=1, group='benchmark')
    seed: int = option(0, 'the draw of the training slices and of the negative cells', group='benchmark')
    out: Path | None = option(None, 'a Markdown file for the table', group='benchmark')

    def __post_init__(self): check_fields(self)


def add_parser(sub) -> None:
    pr = sub.add_parser('probe', help="what each encoder stage knows about lesions: a linear probe per stage, weight and BatchNorm statistics",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_settings(pr, ProbeSettings, required=('models', 'data'))
    pr.set_defaults(run=lambda ap, args: (lambda s: probe(s.models, s.data, s.train_slices, s.negatives, s.seed, s.out))(
        from_args(ProbeSettings, ap, args)))
