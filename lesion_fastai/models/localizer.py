"""One-box lesion localizer: the shared ResNet body, optional transfer layers interleaved between its
stages (the frozen sandwich), and a direct or Gaussian box head.

Every head returns [B, 4] boxes x1, y1, x2, y2 in [-1, 1] (fastai's point scale), valid by
construction (x1 < x2, y1 < y2, inside the image: every side at least half of `boxes.MIN_SIZE`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..boxes import MIN_SIZE, params_to_boxes
from .resnet import DEFAULT_ENCODER, ResNetEncoder, conv_bn

__all__ = ['TransferLayer', 'LesionMap', 'DirectHead', 'GaussianHead', 'Localizer', 'create_localizer', 'HEADS']


class TransferLayer(nn.Module):
    """A trainable residual 3x3 adapter placed between frozen stages (3FabRec's interleaved transfer
    layers). Its last convolution starts at zero, so an untrained sandwich computes exactly what the
    pretrained encoder computes and training starts from the pretrained features. `ratio` < 1 narrows
    the hidden layer (1/4 trains about a quarter of the parameters); full width did at least as well on
    validation with 10% and 100% of the labels (`bench select`)."""
    def __init__(self, ch: int, ratio: float = 1.):
        super().__init__()
        hidden = max(8, round(ch * ratio))
        self.conv1 = conv_bn(ch, hidden)
        self.conv2 = nn.Conv2d(hidden, ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight); nn.init.zeros_(self.conv2.bias)

    def forward(self, x):
        return x + self.conv2(self.conv1(x))


class LesionMap(nn.Module):
    """A stride-8 feature map from the last three stages (FPN-style: 1x1 laterals, upsampled and
    summed, then a 3x3 conv), with a score per position: how likely the lesion's centre lies there."""
    def __init__(self, widths, ch: int = 64):
        super().__init__()
        self.laterals = nn.ModuleList([nn.Conv2d(w, ch, 1) for w in widths[-3:]])
        self.fuse = conv_bn(ch, ch)
        self.score = nn.Conv2d(ch, 1, 1)
        self.ch = ch

    def forward(self, feats):  # stage outputs, finest first -> ([B, ch, h, w] features, [B, h*w] scores)
        f = feats[-3:]
        p = self.laterals[0](f[0])
        for lat, x in zip(self.laterals[1:], f[1:]):
            p = p + F.interpolate(lat(x), size=p.shape[-2:], mode='nearest')
        p = self.fuse(p)
        return p, self.score(p).flatten(1)


def _cell_params(raw, h, w, min_size: float = MIN_SIZE):
    """Per-position outputs [B, 4, h, w] -> [B, h*w, 4] cx, cy, log w, log h in image fractions. The first
    two (sigmoid) move the centre within +-1 cell of the position, clamped into the image; the last two
    (sigmoid) are the sides, at least `min_size`. `params_to_boxes` turns them into corners
    x1 = cx - w/2, x2 = x1 + w: valid and of positive size, also after clipping to the image."""
    s = torch.sigmoid(raw.float()).flatten(2).transpose(1, 2)                       # [B, h*w, 4]
    ys, xs = torch.meshgrid(torch.arange(h, device=raw.device), torch.arange(w, device=raw.device), indexing='ij')
    gx, gy = (xs.flatten() + .5) / w, (ys.flatten() + .5) / h
    cx, cy = (gx + (2 * s[..., 0] - 1) / w).clamp(0, 1), (gy + (2 * s[..., 1] - 1) / h).clamp(0, 1)
    wh = min_size + (1 - min_size) * s[..., 2:]
    return torch.cat([cx[..., None], cy[..., None], wh.log()], -1)


class _MapHead(nn.Module):
    """Scores every stride-8 position and predicts a box at each (translation-equivariant, so a
    lesion learned in one place is found in another). Returns one box per image in [-1, 1]: in
    training the score-weighted mean of the per-position boxes (so the box loss also shapes the
    scores), in evaluation the box of the best-scoring position. Kept for `callbacks.CentreMapLoss`:
    `last_scores` [B, h, w], `last_params` [B, h*w, 4] (cx, cy, log w, log h) and `last_boxes`
    [B, h*w, 4] (x1,y1,x2,y2 in [0, 1])."""
    def __init__(self, widths, hidden: int = 64, out_bn: bool = False):
        super().__init__()
        self.map = LesionMap(widths)
        self.box = _branch(self.map.ch, hidden, out_bn)
        self.last_scores = self.last_params = self.last_boxes = None

    def _pick(self, x, scores):  # [B, n, k], [B, n] -> [B, k]
        if self.training: return torch.einsum('bn,bnk->bk', scores.float().softmax(1), x)
        return x[torch.arange(len(x), device=x.device), scores.argmax(1)]

    def _run(self, feats):
        p, scores = self.map(feats)
        B, _, h, w = p.shape
        self.last_scores = scores.view(B, h, w)
        self.last_params = _cell_params(self.box(p), h, w)
        self.last_boxes = params_to_boxes(self.last_params)
        return p, scores


def _branch(ch, hidden, out_bn=False, n_out=4):
    layers = [conv_bn(ch, hidden), nn.Conv2d(hidden, n_out, 1)]
    if out_bn: layers.append(nn.BatchNorm2d(n_out))  # off by default: it hurt the earlier experiment
    return nn.Sequential(*layers)


class DirectHead(_MapHead):
    "Sigmoid outputs per position (centre offset, w, h) read as x1, y1, w, h: a box that is always valid."
    def forward(self, feats):
        _, scores = self._run(feats)
        return self._pick(self.last_boxes, scores) * 2 - 1


class GaussianHead(_MapHead):
    """Per position a mean box (as `DirectHead`) and a std for its centre x, y and its log width and log
    height: std = `kappa` * softplus(raw), from a branch of its own. Training samples
    `Normal(mean, std).rsample()` over (cx, cy, log w, log h), so every sampled box has a positive size
    (the centre is kept in the image, the sides at least `MIN_SIZE`); evaluation uses the mean.
    `CentreMapLoss` adds the likelihood of the target under (mean, std), which makes the std an
    uncertainty: centre std in image fractions, size std as a factor exp(std) on the side.
    `last_sd` [B, h*w, 4] per position; `last_std` [B, 4] for the returned box."""
    def __init__(self, widths, hidden: int = 64, out_bn: bool = False, kappa: float = .05):
        super().__init__(widths, hidden, out_bn)
        self.spread = _branch(self.map.ch, hidden)
        self.kappa, self.last_sd, self.last_std = kappa, None, None

    def forward(self, feats):
        p, scores = self._run(feats)
        self.last_sd = (self.kappa * F.softplus(self.spread(p).float())).flatten(2).transpose(1, 2)   # [B, h*w, 4]
        sd = self._pick(self.last_sd, scores)
        self.last_std = sd.detach()
        if not self.training: return self._pick(self.last_boxes, scores) * 2 - 1
        mean = self._pick(self.last_params, scores)                                  # [B, 4] cx, cy, log w, log h
        return params_to_boxes(torch.distributions.Normal(mean, sd).rsample()) * 2 - 1


HEADS = {'direct': DirectHead, 'gaussian': GaussianHead}


class Localizer(nn.Module):
    """`encoder` (a `ResNetEncoder`, the autoencoder's encoder class) -> optional `adapters` (one
    `TransferLayer` after each stage: the sandwich; with `adapter_stem` one after the stem too, with
    `adapter_ratio` < 1 narrower ones) -> `head`. Returns [B, 4] boxes in [-1, 1]."""
    def __init__(self, encoder_args: dict | None = None, head: str = 'direct', sandwich: bool = False,
                 hidden: int = 64, out_bn: bool = False, kappa: float = .05, adapter_ratio: float = 1.,
                 adapter_stem: bool = False):
        super().__init__()
        if head not in HEADS: raise ValueError(f"head {head!r}: expected one of {sorted(HEADS)}")
        self.encoder_args = dict(DEFAULT_ENCODER, **(encoder_args or {}))
        self.encoder = ResNetEncoder(**self.encoder_args)
        self.adapters = nn.ModuleList([TransferLayer(w, adapter_ratio) for w in self.encoder.widths]) if sandwich else None
        stem_width = self.encoder_args['stem_width']
        self.stem_adapter = TransferLayer(stem_width, adapter_ratio) if sandwich and adapter_stem else None
        kw = dict(kappa=kappa) if head == 'gaussian' else {}
        self.head = HEADS[head](self.encoder.widths, hidden, out_bn, **kw)

    def features(self, x) -> list:  # [B, C, H, W] -> every stage's output, strides 4, 8, 16, 32
        x, out = self.encoder.stem(x), []
        if self.stem_adapter is not None: x = self.stem_adapter(x)
        for i, stage in enumerate(self.encoder.stages):
            x = stage(x)
            if self.adapters is not None: x = self.adapters[i](x)
            out.append(x)
        return out

    def forward(self, x):
        return self.head(self.features(x))


def create_localizer(in_chans: int = 1, head: str = 'direct', sandwich: bool = False, **kwargs) -> Localizer:
    "A localizer with the default body for `in_chans` input channels."
    enc = {k: kwargs.pop(k) for k in list(kwargs) if k in DEFAULT_ENCODER}
    return Localizer(dict(enc, in_chans=in_chans), head=head, sandwich=sandwich, **kwargs)
