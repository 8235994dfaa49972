"""One-box lesion localizer: the shared ResNet body, optional transfer layers interleaved between its
stages (the frozen sandwich), and a direct or Gaussian box head.

Every head returns [B, 4] boxes x1, y1, x2, y2 in [-1, 1] (fastai's point scale), valid by
construction (x1 <= x2, y1 <= y2, inside the image).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import DEFAULT_ENCODER, ResNetEncoder, conv_bn

__all__ = ['TransferLayer', 'LesionMap', 'DirectHead', 'GaussianHead', 'Localizer', 'create_localizer', 'HEADS']


class TransferLayer(nn.Module):
    """A trainable residual 3x3 adapter placed between frozen stages (3FabRec's interleaved transfer
    layers). Its last convolution starts at zero, so an untrained sandwich computes exactly what the
    pretrained encoder computes and training starts from the pretrained features. `ratio` < 1 narrows
    the hidden layer: the default 1/4 trains about a quarter of the parameters of a full-width one
    and overfitted few labels less in the benchmark (`bench study`)."""
    def __init__(self, ch: int, ratio: float = .25):
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


def _cell_boxes(raw, h, w):
    """Per-position sigmoid outputs [B, 4, h, w] -> boxes [B, h*w, 4] x1,y1,x2,y2 in [0, 1]: the first two
    move the centre within +-1 cell of the position, the last two are w and h as image fractions, so
    x1 = cx - w/2, x2 = x1 + w: always valid, then clamped to the image."""
    s = torch.sigmoid(raw.float()).flatten(2).transpose(1, 2)                       # [B, h*w, 4]
    ys, xs = torch.meshgrid(torch.arange(h, device=raw.device), torch.arange(w, device=raw.device), indexing='ij')
    gx, gy = (xs.flatten() + .5) / w, (ys.flatten() + .5) / h
    cx, cy = gx + (2 * s[..., 0] - 1) / w, gy + (2 * s[..., 1] - 1) / h
    bw, bh = s[..., 2], s[..., 3]
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1).clamp(0, 1)


class _MapHead(nn.Module):
    """Scores every stride-8 position and predicts a box at each (translation-equivariant, so a
    lesion learned in one place is found in another). Returns one box per image in [-1, 1]: in
    training the score-weighted mean of the per-position boxes (so the box loss also shapes the
    scores), in evaluation the box of the best-scoring position. `last_scores` [B, h, w] and
    `last_boxes` [B, h*w, 4] are kept for `callbacks.CentreMapLoss`."""
    n_out = 4

    def __init__(self, widths, hidden: int = 64, out_bn: bool = False):
        super().__init__()
        self.map = LesionMap(widths)
        layers = [conv_bn(self.map.ch, hidden), nn.Conv2d(hidden, self.n_out, 1)]
        if out_bn: layers.append(nn.BatchNorm2d(self.n_out))  # off by default: it hurt the earlier experiment
        self.box = nn.Sequential(*layers)
        self.last_scores = self.last_boxes = None

    def _pick(self, boxes, scores):  # [B, n, 4], [B, n] -> [B, 4]
        if self.training: return torch.einsum('bn,bnk->bk', scores.float().softmax(1), boxes)
        return boxes[torch.arange(len(boxes), device=boxes.device), scores.argmax(1)]

    def _run(self, feats):
        p, scores = self.map(feats)
        B, _, h, w = p.shape
        self.last_scores = scores.view(B, h, w)
        return self.box(p), scores, h, w


class DirectHead(_MapHead):
    "Sigmoid outputs per position (centre offset, w, h) read as x1, y1, w, h: a box that is always valid."
    def forward(self, feats):
        raw, scores, h, w = self._run(feats)
        self.last_boxes = _cell_boxes(raw, h, w)
        return self._pick(self.last_boxes, scores) * 2 - 1


class GaussianHead(_MapHead):
    """Per position a mean box (as `DirectHead`) and a std for its centre x, y and w, h; std = `kappa` *
    softplus(raw), in image fractions. Training samples `Normal(mean, std).rsample()` over (cx, cy, w, h)
    (w, h clamped at 0: the box stays valid), evaluation uses the mean. The std of the chosen box, in x1,y1,x2,y2 image fractions, is kept in `last_std`."""
    n_out = 8

    def __init__(self, widths, hidden: int = 64, out_bn: bool = False, kappa: float = .05):
        super().__init__(widths, hidden, out_bn)
        self.kappa, self.last_std = kappa, None

    def forward(self, feats):
        raw, scores, h, w = self._run(feats)
        self.last_boxes = _cell_boxes(raw[:, :4], h, w)                                # means
        std = (self.kappa * F.softplus(raw[:, 4:].float())).flatten(2).transpose(1, 2)  # [B, h*w, 4]
        mu, sd = self._pick(self.last_boxes, scores), self._pick(std, scores)
        sx, sy, sw, sh = sd.detach().unbind(1)   # centre and size std -> corner std (independent terms)
        self.last_std = torch.stack([(sx ** 2 + sw ** 2 / 4).sqrt(), (sy ** 2 + sh ** 2 / 4).sqrt()] * 2, 1)
        if not self.training: return mu * 2 - 1
        cwh = torch.cat([(mu[:, :2] + mu[:, 2:]) / 2, mu[:, 2:] - mu[:, :2]], 1)       # [B, 4] cx,cy,w,h
        z = torch.distributions.Normal(cwh, sd).rsample()
        c, wh = z[:, :2], z[:, 2:].clamp(min=0)
        return torch.cat([c - wh / 2, c + wh / 2], 1).clamp(0, 1) * 2 - 1


HEADS = {'direct': DirectHead, 'gaussian': GaussianHead}


class Localizer(nn.Module):
    """`encoder` (a `ResNetEncoder`, the autoencoder's encoder class) -> optional `adapters` (one
    `TransferLayer` after each stage: the sandwich; with `adapter_stem` one after the stem too, with
    `adapter_ratio` < 1 narrower ones) -> `head`. Returns [B, 4] boxes in [-1, 1]."""
    def __init__(self, encoder_args: dict | None = None, head: str = 'direct', sandwich: bool = False,
                 hidden: int = 64, out_bn: bool = False, kappa: float = .05, adapter_ratio: float = .25,
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
