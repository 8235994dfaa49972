"""Convolutional autoencoder for unsupervised pretraining: the localizer's `ResNetEncoder`, a 1x1
bottleneck, and an upsampling decoder back to the input size. No skip connections: with them a
network can copy its input, which teaches nothing. Trained to reconstruct the clean slice from a
corrupted one (see `callbacks.MaskedCorruption`)."""
from __future__ import annotations

import torch
from torch import nn

from .resnet import DEFAULT_ENCODER, ResNetEncoder, conv_bn

__all__ = ['Decoder', 'Autoencoder', 'create_autoencoder']


class Decoder(nn.Module):
    "1x1 bottleneck, then one nearest-upsample + 3x3 conv block per factor of 2, then a sigmoid image."
    def __init__(self, in_ch: int, out_chans: int, reduction: int = 32, bottleneck: int = 64, widths=None):
        super().__init__()
        n_up = reduction.bit_length() - 1
        if widths is None: widths = tuple(max(8, 128 // 2 ** i) for i in range(n_up))  # 128, 64, 32, 16, 8
        if 2 ** n_up != reduction or n_up != len(widths):
            raise ValueError(f"reduction {reduction} needs {n_up} upsampling widths, got {widths}")
        self.bottleneck = conv_bn(in_ch, bottleneck, k=1)
        blocks, ci = [], bottleneck
        for w in widths:
            blocks += [nn.Upsample(scale_factor=2, mode='nearest'), conv_bn(ci, w)]
            ci = w
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(ci, out_chans, 3, padding=1)

    def forward(self, z):  # [B, C, h, w] -> [B, out_chans, h*reduction, w*reduction] in [0, 1]
        return torch.sigmoid(self.out(self.blocks(self.bottleneck(z))))


class Autoencoder(nn.Module):
    "`encoder` (same class and arguments as the localizer's body) and `decoder`."
    def __init__(self, encoder_args: dict | None = None, bottleneck: int = 64, decoder_widths=None):
        super().__init__()
        self.encoder_args = dict(DEFAULT_ENCODER, **(encoder_args or {}))
        self.encoder = ResNetEncoder(**self.encoder_args)
        self.decoder = Decoder(self.encoder.out_channels, self.encoder.in_chans, self.encoder.reduction, bottleneck,
                               decoder_widths)
        self.model_args = dict(encoder_args=self.encoder_args, bottleneck=bottleneck, decoder_widths=decoder_widths)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def create_autoencoder(in_chans: int = 1, **kwargs) -> Autoencoder:
    "An autoencoder whose encoder is the default localizer body for `in_chans` channels."
    enc = {k: kwargs.pop(k) for k in list(kwargs) if k in DEFAULT_ENCODER}
    return Autoencoder(dict(enc, in_chans=in_chans), **kwargs)
