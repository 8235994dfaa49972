"""The earlier experiment's one-box detector, kept as the speed and accuracy baseline of the benchmarks:
six residual blocks at full input resolution (widths 64, 128, 256, 512, 512, 512), each followed by
2x2 max-pooling, then flatten and a linear layer to 4 sigmoid outputs (x1, y1, w, h)."""
import torch
from torch import nn

from .resnet import BasicBlock

__all__ = ['LegacyDetector']


class LegacyDetector(nn.Module):
    def __init__(self, in_chans: int = 1, size: int = 256, widths=(64, 128, 256, 512, 512, 512)):
        super().__init__()
        layers, ci = [], in_chans
        for w in widths:
            layers += [BasicBlock(ci, w), nn.MaxPool2d(2)]
            ci = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(ci * (size // 2 ** len(widths)) ** 2, 4)

    def forward(self, x):  # -> [B, 4] x1,y1,x2,y2 in [-1, 1]
        x1, y1, w, h = self.head(self.body(x).flatten(1)).sigmoid().unbind(1)
        return torch.stack([x1, y1, (x1 + w).clamp(max=1), (y1 + h).clamp(max=1)], 1) * 2 - 1
