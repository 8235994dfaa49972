"""The ResNet body shared by the autoencoder's encoder and the detector, sized for half-resolution CT,
or any timm model as the body (`TimmEncoder`, `--backbone NAME`).

One class per backbone, so that pretrained weights move by `load_state_dict(strict=True)`. Output stride 32: a
256 px slice gives an 8 x 8 map. Widths and depths are configurable; the defaults
(stem 32, widths 32/64/128/256, one block per stage) cost about 0.3 GMAC per 256 px slice.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

__all__ = ['conv_bn', 'BasicBlock', 'ResNetEncoder', 'TimmEncoder', 'create_encoder', 'DEFAULT_ENCODER', 'ENCODER_KEYS']

DEFAULT_ENCODER = dict(in_chans=1, stem_width=32, widths=(32, 64, 128, 256), depths=(1, 1, 1, 1))
ENCODER_KEYS = (*DEFAULT_ENCODER, 'backbone')   # the encoder's arguments among a model factory's keyword arguments


def conv_bn(ci: int, co: int, stride: int = 1, k: int = 3, act: bool = True) -> nn.Sequential:
    "k x k convolution (no bias), BatchNorm, optional ReLU."
    layers = [nn.Conv2d(ci, co, k, stride, k // 2, bias=False), nn.BatchNorm2d(co)]
    if act: layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    "ResNet basic block; the last BatchNorm starts at zero so each block starts as the identity."
    def __init__(self, ci: int, co: int, stride: int = 1):
        super().__init__()
        self.convs = nn.Sequential(conv_bn(ci, co, stride), conv_bn(co, co, act=False))
        nn.init.zeros_(self.convs[1][1].weight)
        self.shortcut = nn.Identity() if ci == co and stride == 1 else conv_bn(ci, co, stride, k=1, act=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.convs(x) + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """Stem (two stride-2 convolutions: /4) then stages of `BasicBlock`s, each but the first halving
    the resolution. `stem` and `stages` are named so that the sandwich can interleave layers."""
    def __init__(self, in_chans: int = 1, stem_width: int = 32, widths=(32, 64, 128, 256), depths=(1, 1, 1, 1)):
        super().__init__()
        if len(widths) != len(depths): raise ValueError(f"widths {widths} and depths {depths} differ in length")
        self.in_chans, self.widths = in_chans, tuple(widths)
        self.encoder_args = dict(in_chans=in_chans, stem_width=stem_width, widths=tuple(widths), depths=tuple(depths))
        self.stem = nn.Sequential(conv_bn(in_chans, stem_width // 2, 2), conv_bn(stem_width // 2, stem_width, 2))
        stages, ci = [], stem_width
        for i, (w, d) in enumerate(zip(widths, depths)):
            stages.append(nn.Sequential(*[BasicBlock(ci if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1) for j in range(d)]))
            ci = w
        self.stages = nn.ModuleList(stages)
        self.out_channels = widths[-1]
        self.reduction = 4 * 2 ** (len(widths) - 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d): nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, widths[-1], H/32, W/32]
        x = self.stem(x)
        for stage in self.stages: x = stage(x)
        return x


STRIDES = (4, 8, 16, 32)   # the stage outputs every body gives: what the sandwich interleaves with and the pyramid reads


class TimmEncoder(nn.Module):
    """A timm model created with `features_only=True` as the body: its modules grouped into four
    `stages`, each ending at the feature of stride 4, 8, 16 or 32 (the same interface as
    `ResNetEncoder`, with an identity `stem`), widths read from `feature_info`. `weights`: a local
    timm / torchvision state dict of the model (this machine downloads nothing); timm adapts its first
    convolution to `in_chans` and drops the classifier."""
    def __init__(self, name: str, in_chans: int = 1, weights: Path | str | None = None):
        super().__init__()
        import timm
        try: probe = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_chans)
        except Exception as e:
            raise ValueError(f"--backbone {name!r}: timm cannot build it with features_only=True ({type(e).__name__}: {e})") from None
        red = list(probe.feature_info.reduction())
        idx = tuple(red.index(r) for r in STRIDES if r in red)
        if len(idx) != len(STRIDES) or not hasattr(probe, 'return_layers'):
            raise ValueError(f"--backbone {name!r}: features at strides {red}, expected {', '.join(map(str, STRIDES))} from its own modules")
        if weights is not None and not Path(weights).is_file(): raise FileNotFoundError(f"--backbone-weights {weights}: no such file")
        kw = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights))) if weights else dict(pretrained=False)
        try: body = timm.create_model(name, features_only=True, in_chans=in_chans, out_indices=idx, **kw)
        except Exception as e:
            raise ValueError(f"--backbone-weights {weights}: not a state dict of timm's {name} ({type(e).__name__}: {e})") from None
        stages, group = [], []
        for n, m in body.items():                       # the order FeatureListNet runs them in
            group.append((n, m))
            if n in body.return_layers: stages.append(nn.Sequential(OrderedDict(group))); group = []
        self.stem, self.stages = nn.Identity(), nn.ModuleList(stages)
        self.in_chans, self.widths, self.reduction = in_chans, tuple(body.feature_info.channels()), STRIDES[-1]
        self.out_channels = self.widths[-1]
        self.encoder_args = dict(backbone=name, in_chans=in_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages: x = stage(x)
        return x


def create_encoder(encoder_args: dict | None = None, weights: Path | str | None = None) -> nn.Module:
    """The body `encoder_args` names: `backbone` 'resnet' (or absent: `ResNetEncoder` with the rest
    of the arguments over `DEFAULT_ENCODER`) or a timm model name (`TimmEncoder`, with `weights`)."""
    args = dict(encoder_args or {})
    backbone = args.pop('backbone', 'resnet')
    if backbone != 'resnet': return TimmEncoder(backbone, args.get('in_chans', 1), weights)
    if weights is not None: raise ValueError("--backbone-weights loads a timm model's weights: give --backbone NAME (a timm model) too")
    return ResNetEncoder(**dict(DEFAULT_ENCODER, **args))
