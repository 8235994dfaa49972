"""Convolutional autoencoder for unsupervised pretraining: the detector's `ResNetEncoder`, a
multi-scale bottleneck, and an upsampling decoder back to the input size.

The code is small: narrow 1x1 projections of the last three stages (default 4, 8 and 64 channels at
strides 8, 16 and 32: 2,560 numbers for a 128 px slice of 16,384 pixels, 6.4x fewer). A single
stride-32 code (tried first) reconstructs anatomy but no lesion-sized detail, so the encoder never
learns to represent it; the narrow fine-scale codes make the early stages encode local detail
compactly. There are no full-width skip connections (they would let the network copy its input),
and training reconstructs the clean slice from a masked, noisy one (`callbacks.MaskedCorruption`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import ENCODER_KEYS, conv_bn, create_encoder

__all__ = ['CODE_CHANNELS', 'Decoder', 'Autoencoder', 'create_autoencoder']

CODE_CHANNELS = (64, 8, 4)   # the default codes at strides 32, 16, 8 (module docstring)


class Decoder(nn.Module):
    """Bottleneck codes of the last three stages (coarsest first in `code_channels` order: stride 32,
    16, 8; a fourth number adds a code of the first stage, at stride 4), decoded by nearest-upsample +
    3x3 conv blocks, each code joining at its own scale; a sigmoid image of `out_chans` channels at
    the input size. `features` gives the blocks' outputs, which the decoder sandwich reads."""
    def __init__(self, stage_widths, out_chans: int, reduction: int = 32, code_channels=CODE_CHANNELS, widths=None):
        super().__init__()
        n_up = reduction.bit_length() - 1
        if widths is None: widths = tuple(max(8, 128 // 2 ** i) for i in range(n_up))  # 128, 64, 32, 16, 8
        if 2 ** n_up != reduction or n_up != len(widths) or len(code_channels) > min(4, len(stage_widths)):
            raise ValueError(f"reduction {reduction} needs {n_up} upsampling widths (got {widths}) and at most "
                             f"{min(4, len(stage_widths))} codes (got {code_channels})")
        self.codes = nn.ModuleList([conv_bn(w, c, k=1) for w, c in zip(reversed(stage_widths), code_channels)])
        blocks, ci = [], code_channels[0]
        for i, w in enumerate(widths):
            extra = code_channels[i + 1] if i + 1 < len(code_channels) else 0   # the next finer code joins after upsampling
            blocks.append(conv_bn(ci + extra, w))
            ci = w
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Conv2d(ci, out_chans, 3, padding=1)
        self.widths, self.reduction = tuple(widths), reduction

    def blocks_to(self, stride: int) -> int:
        "How many blocks decode down to `stride` (block i outputs stride reduction / 2 ** (i + 1))."
        n = (self.reduction // stride).bit_length() - 1
        if not 0 < n <= len(self.blocks) or self.reduction // 2 ** n != stride:
            raise ValueError(f"the decoder has no block at stride {stride} (reduction {self.reduction}, {len(self.blocks)} blocks)")
        return n

    def features(self, feats, n_blocks: int | None = None, adapters=None) -> list:
        """The outputs of the first `n_blocks` decoder blocks (default all), coarsest first; with
        `adapters` (one module per block) each block's output passes through its adapter before the
        next block reads it: 3FabRec's interleaved transfer layers."""
        codes = [proj(f) for proj, f in zip(self.codes, reversed(feats))]   # coarsest first
        x, out = codes[0], []
        for i, block in enumerate(self.blocks[:n_blocks]):
            x = F.interpolate(x, scale_factor=2, mode='nearest')
            if i + 1 < len(codes): x = torch.cat([x, codes[i + 1]], 1)
            x = block(x)
            if adapters is not None: x = adapters[i](x)
            out.append(x)
        return out

    def forward(self, feats):  # stage outputs, finest first -> [B, out_chans, H, W] in [0, 1]
        return torch.sigmoid(self.out(self.features(feats)[-1]))


class Autoencoder(nn.Module):
    "`encoder` (same class and arguments as the detector's body: resnet or a timm model) and `decoder`."
    def __init__(self, encoder_args: dict | None = None, code_channels=CODE_CHANNELS, decoder_widths=None, backbone_weights=None):
        super().__init__()
        self.encoder = create_encoder(encoder_args, backbone_weights)
        self.encoder_args = self.encoder.encoder_args
        self.decoder = Decoder(self.encoder.widths, self.encoder.in_chans, self.encoder.reduction, tuple(code_channels),
                               decoder_widths)
        self.model_args = dict(encoder_args=self.encoder_args, code_channels=tuple(code_channels), decoder_widths=decoder_widths)

    def code_size(self, size: int) -> int:
        "Numbers in the bottleneck code of a size x size slice."
        return sum(c * (size // (self.encoder.reduction // 2 ** i)) ** 2 for i, c in enumerate(self.model_args['code_channels']))

    def forward(self, x):
        x, feats = self.encoder.stem(x), []
        for stage in self.encoder.stages:
            x = stage(x)
            feats.append(x)
        return self.decoder(feats)


def create_autoencoder(in_chans: int = 1, **kwargs) -> Autoencoder:
    "An autoencoder whose encoder is the default detector body for `in_chans` channels."
    enc = {k: kwargs.pop(k) for k in list(kwargs) if k in ENCODER_KEYS}
    return Autoencoder(dict(enc, in_chans=in_chans), **kwargs)
