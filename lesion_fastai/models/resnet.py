"""The ResNet body shared by the autoencoder's encoder and the localizer, sized for half-resolution CT.

One class, so that pretrained weights move by `load_state_dict(strict=True)`. Output stride 32: a
256 px slice gives an 8 x 8 map. Widths and depths are configurable; the defaults
(stem 32, widths 32/64/128/256, one block per stage) cost about 0.3 GMAC per 256 px slice.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ['conv_bn', 'BasicBlock', 'ResNetEncoder', 'DEFAULT_ENCODER']

DEFAULT_ENCODER = dict(in_chans=1, stem_width=32, widths=(32, 64, 128, 256), depths=(1, 1, 1, 1))


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
