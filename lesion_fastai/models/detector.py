"""The lesion detector: the shared ResNet body, optional transfer layers interleaved between its stages
(the encoder sandwich) or the pretrained decoder with transfer layers between its blocks (the decoder
sandwich), a feature pyramid down to stride 4, and a CenterNet head, direct or Gaussian.

Every head returns dense maps over the stride-`stride` grid of the input:
* `heat` [B, h, w]: centre-heatmap logits, one peak per lesion;
* `params` [B, h*w, 4]: the box at each cell as cx, cy, log w, log h in image fractions
  (`boxes.params_to_boxes` gives x1,y1,x2,y2: valid and of positive size by construction);
* the Gaussian head adds `mean` and `sd` [B, h*w, 4]: `params` is then a sample of Normal(mean, sd)
  in training and the mean in evaluation.
`heatmap.detections` (with the model's own `decoding`) turns them into the K best boxes per slice with
their scores.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..boxes import MIN_SIZE
from ..heatmap import Decoding
from .resnet import ENCODER_KEYS, conv_bn, create_encoder

__all__ = ['SANDWICHES', 'HEADS', 'KAPPA', 'TransferLayer', 'FeaturePyramid', 'DirectHead', 'GaussianHead', 'Detector', 'create_detector']

KAPPA = .05   # the Gaussian head's std scale: std = KAPPA * softplus(output), small by design


class TransferLayer(nn.Module):
    """A trainable residual 3x3 adapter placed between frozen stages (3FabRec's interleaved transfer
    layers). Its residual starts at zero, so an untrained sandwich computes exactly what the pretrained
    encoder computes and training starts from the pretrained features. `ratio` < 1 narrows the hidden
    layer (1/4 trains about a quarter of the parameters; docs/results.md says which width validation
    chose).

    With `gate` (the default) the residual is a learned scalar times a normally initialised branch, the
    scalar starting at zero (ReZero, Bachlechner et al. 2020): Adam moves the scalar by about the rate per
    step whatever the layer's width. Without it (models written before the gate) the branch's last
    convolution starts at zero instead, and Adam moves each of its weights by about the rate, so the
    first steps change the output in proportion to the fan-in (9 x 256 at the deepest stage): in the
    sandwich's untrained control the deepest layers outgrew the frozen features, and the gate, chosen on
    validation, doubled the control's FROC (docs/results.md, "The transfer layers' gate")."""
    def __init__(self, ch: int, ratio: float = 1., gate: bool = True):
        super().__init__()
        hidden = max(8, round(ch * ratio))
        self.conv1 = conv_bn(ch, hidden)
        self.conv2 = nn.Conv2d(hidden, ch, 3, padding=1)
        if gate: self.gate = nn.Parameter(torch.zeros(1))
        else: nn.init.zeros_(self.conv2.weight); nn.init.zeros_(self.conv2.bias)

    def forward(self, x):
        d = self.conv2(self.conv1(x))
        gate = getattr(self, 'gate', None)        # None in a pickled export of a model written before the gate
        return x + (d if gate is None else gate * d)


class FeaturePyramid(nn.Module):
    """A feature pyramid from the encoder stages down to `stride` (4: the first stage's resolution, so
    that lesions of a few pixels get a cell of their own; or 8): 1x1 laterals of `ch` channels, each
    coarser level upsampled and added, then a 3x3 convolution to `out_ch` channels at `stride`."""
    def __init__(self, widths, stride: int = 4, ch: int = 64, out_ch: int = 32):
        super().__init__()
        if stride not in (4, 8): raise ValueError(f"stride {stride}: expected 4 or 8")
        self.first = 0 if stride == 4 else 1                 # stage outputs are at strides 4, 8, 16, 32
        self.laterals = nn.ModuleList([nn.Conv2d(w, ch, 1) for w in widths[self.first:]])
        self.fuse = conv_bn(ch, out_ch)
        self.stride, self.out_ch = stride, out_ch

    def forward(self, feats):  # stage outputs, finest first -> [B, out_ch, H / stride, W / stride]
        f = feats[self.first:]
        p = self.laterals[-1](f[-1])
        for lat, x in zip(reversed(self.laterals[:-1]), reversed(f[:-1])):
            p = lat(x) + F.interpolate(p, size=x.shape[-2:], mode='nearest')
        return self.fuse(p)


def _branch(ch: int, hidden: int, n_out: int, out_bn: bool = False) -> nn.Sequential:
    layers = [conv_bn(ch, hidden), nn.Conv2d(hidden, n_out, 1)]
    if out_bn: layers.append(nn.BatchNorm2d(n_out))  # off by default: it hurt the earlier experiment
    return nn.Sequential(*layers)


def _cell_params(raw, min_size: float = MIN_SIZE) -> torch.Tensor:
    """Box outputs [B, 4, h, w] -> [B, h*w, 4] cx, cy, log w, log h in image fractions. The first two
    (sigmoid) place the centre inside its cell; the last two (sigmoid) place each side on a log scale
    between `min_size` and the whole image, side = min_size ** (1 - sigmoid): every box is valid and of
    positive size, and a side of 3% of the image (a small lesion) is as easy to learn as one of 50% (a
    side linear in the sigmoid needs its flat tail there, where gradients are 30x smaller). The
    untrained head starts at sqrt(min_size), about 4% of the image: a typical lesion."""
    B, _, h, w = raw.shape
    s = torch.sigmoid(raw.float()).flatten(2).transpose(1, 2)                        # [B, h*w, 4]
    ys, xs = torch.meshgrid(torch.arange(h, device=raw.device), torch.arange(w, device=raw.device), indexing='ij')
    cx, cy = (xs.flatten() + s[..., 0]) / w, (ys.flatten() + s[..., 1]) / h
    log_wh = math.log(min_size) * (1 - s[..., 2:])
    return torch.cat([cx[..., None], cy[..., None], log_wh], -1)


class DirectHead(nn.Module):
    """The centre heatmap and a box per cell from sigmoid outputs (offset in the cell, width, height),
    read as x1, y1, w, h: always a valid box. Returns (heat [B, h, w], params [B, h*w, 4])."""
    def __init__(self, ch: int, hidden: int = 32, out_bn: bool = False):
        super().__init__()
        self.heat = _branch(ch, hidden, 1)
        nn.init.constant_(self.heat[-1].bias, -math.log((1 - .1) / .1))   # CenterNet: start at a 0.1 score
        self.box = _branch(ch, hidden, 4, out_bn)

    def forward(self, p):
        return self.heat(p)[:, 0], _cell_params(self.box(p))


class GaussianHead(DirectHead):
    """`DirectHead` plus a std per cell for the box's centre x, y and its log width and log height:
    std = `kappa` * softplus(raw), from a branch of its own. Returns (heat, params, mean, sd): in
    training `params` is `Normal(mean, sd).rsample()` over (cx, cy, log w, log h), so every sampled box
    has positive size; in evaluation it is the mean. The loss's likelihood term
    (`losses.gaussian_nll`) makes the std an uncertainty: one std around the centre in image fractions,
    a factor exp(std) on each side."""
    def __init__(self, ch: int, hidden: int = 32, out_bn: bool = False, kappa: float = KAPPA):
        super().__init__(ch, hidden, out_bn)
        self.spread = _branch(ch, hidden, 4)
        self.kappa = kappa

    def forward(self, p):
        heat, mean = super().forward(p)
        sd = (self.kappa * F.softplus(self.spread(p).float())).flatten(2).transpose(1, 2)     # [B, h*w, 4]
        params = torch.distributions.Normal(mean, sd).rsample() if self.training else mean
        return heat, params, mean, sd


HEADS = {'direct': DirectHead, 'gaussian': GaussianHead}


SANDWICHES = ('encoder', 'decoder')


class Detector(nn.Module):
    """`encoder` (a `ResNetEncoder` or a `TimmEncoder`, as `encoder_args` name it: the autoencoder's
    encoder class; `backbone_weights` a timm model's local weights) -> `neck` (pyramid to `stride`) ->
    `head`, returning the head's dense maps (module docstring). Two sandwiches of frozen pretrained
    layers and fresh `TransferLayer`s:
    * `sandwich='encoder'` (or True): one transfer layer after each encoder stage (with `adapter_stem`
      one after the stem too, with `adapter_ratio` < 1 narrower ones, gated by `adapter_gate`, the
      default); the neck reads the stages.
    * `sandwich='decoder'`: 3FabRec's: the autoencoder's `decoder` (built from `decoder_args`, its
      `model_args` without the encoder's) decodes the encoder's codes down to `stride`, a transfer
      layer after each of its blocks; the neck reads those blocks, so the head sits on the features
      the decoder draws the slice from. The decoder reads only the codes (3% of a slice's values at
      128 px); with `decoder_skips` what the neck reads of each block also gains a 1x1 projection of the
      encoder stage at its stride, a path around them (the next decoder block still reads the block alone);
      with `decoder_deepest` the neck also reads the encoder's deepest stage, below the decoder's first
      block, as the neck of every other mode does."""
    def __init__(self, encoder_args: dict | None = None, head: str = 'direct', sandwich: bool | str = False,
                 hidden: int = 32, out_bn: bool = False, kappa: float = KAPPA, adapter_ratio: float = 1.,
                 adapter_stem: bool = False, adapter_gate: bool = True, stride: int = 4, decoder_args: dict | None = None, backbone_weights=None,
                 decoding: Decoding | None = None, decoder_skips: bool = False,
                 decoder_deepest: bool = False):
        super().__init__()
        if head not in HEADS: raise ValueError(f"head {head!r}: expected one of {sorted(HEADS)}")
        kind = 'encoder' if sandwich is True else (sandwich or None)
        if kind not in (None, *SANDWICHES): raise ValueError(f"sandwich {sandwich!r}: expected one of {SANDWICHES}")
        self.encoder = create_encoder(encoder_args, backbone_weights)
        self.encoder_args = self.encoder.encoder_args
        self.adapters = nn.ModuleList([TransferLayer(w, adapter_ratio, adapter_gate) for w in self.encoder.widths]) if kind == 'encoder' else None
        if kind == 'encoder' and adapter_stem and 'stem_width' not in self.encoder_args:
            raise ValueError("--adapter-stem needs the resnet backbone's stem (a timm body's first stage holds its stem)")
        self.stem_adapter = TransferLayer(self.encoder_args['stem_width'], adapter_ratio, adapter_gate) if kind == 'encoder' and adapter_stem else None
        self.decoder = self.decoder_adapters = self.decoder_skips = None
        self.decoder_deepest = decoder_deepest
        if decoder_skips and kind != 'decoder': raise ValueError("decoder skips join the decoder sandwich's blocks: they need sandwich='decoder'")
        if decoder_deepest and kind != 'decoder':
            raise ValueError("decoder_deepest adds the encoder's deepest stage to the decoder sandwich's pyramid: it needs sandwich='decoder'")
        if kind == 'decoder':
            from .autoencoder import CODE_CHANNELS, Decoder
            self.decoder_args = dict(decoder_args or {})
            self.decoder = Decoder(self.encoder.widths, self.encoder.in_chans, self.encoder.reduction,
                                   tuple(self.decoder_args.get('code_channels', CODE_CHANNELS)), self.decoder_args.get('decoder_widths'))
            self.n_decoder_blocks = self.decoder.blocks_to(stride)
            widths = self.decoder.widths[:self.n_decoder_blocks]
            self.decoder_adapters = nn.ModuleList([TransferLayer(w, adapter_ratio, adapter_gate) for w in widths])
            if decoder_skips:   # finest first, as the neck reads them: the stages below the deepest, at the blocks' strides
                self.decoder_skips = nn.ModuleList([nn.Conv2d(e, w, 1) for e, w in zip(self.encoder.widths[-len(widths) - 1:-1], widths[::-1])])
            deepest = (self.encoder.widths[-1],) if decoder_deepest else ()
            self.neck = FeaturePyramid(widths[::-1] + deepest, 4)   # the blocks, finest first (the finest at `stride`), then the deepest stage
        else: self.neck = FeaturePyramid(self.encoder.widths, stride)
        kw = dict(kappa=kappa) if head == 'gaussian' else {}
        self.head = HEADS[head](self.neck.out_ch, hidden, out_bn, **kw)
        self.stride = stride
        self.decoding = decoding or Decoding()   # how its maps become scored boxes: travels with the model into its export
        # what rebuilds it around a state dict (export.save_safe): the weights come from there, not from backbone_weights
        self.init_args = dict(encoder_args=dict(self.encoder_args), head=head, sandwich=kind, hidden=hidden, out_bn=out_bn, kappa=kappa,
                              adapter_ratio=adapter_ratio, adapter_stem=adapter_stem, adapter_gate=adapter_gate, stride=stride,
                              decoder_args=dict(self.decoder_args) if kind == 'decoder' else None, decoder_skips=decoder_skips,
                              decoder_deepest=decoder_deepest)

    def features(self, x) -> list:  # [B, C, H, W] -> what the neck reads, finest first
        x, out = self.encoder.stem(x), []
        if self.stem_adapter is not None: x = self.stem_adapter(x)
        for i, stage in enumerate(self.encoder.stages):
            x = stage(x)
            if self.adapters is not None: x = self.adapters[i](x)
            out.append(x)                                    # strides 4, 8, 16, 32
        if getattr(self, 'decoder', None) is None: return out
        dec = self.decoder.features(out, self.n_decoder_blocks, self.decoder_adapters)[::-1]   # down to `stride`, finest first
        skips = getattr(self, 'decoder_skips', None)
        if skips is not None: dec = [d + skip(f) for d, skip, f in zip(dec, skips, out[-len(dec) - 1:-1])]   # the blocks' strides
        return dec + out[-1:] if getattr(self, 'decoder_deepest', False) else dec

    def forward(self, x):
        return self.head(self.neck(self.features(x)))


def create_detector(in_chans: int = 1, head: str = 'direct', sandwich: bool | str = False, **kwargs) -> Detector:
    "A detector with the default body for `in_chans` input channels."
    enc = {k: kwargs.pop(k) for k in list(kwargs) if k in ENCODER_KEYS}
    return Detector(dict(enc, in_chans=in_chans), head=head, sandwich=sandwich, **kwargs)
