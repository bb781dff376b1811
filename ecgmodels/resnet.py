"""resnet1d: a small xresnet1d (Bag-of-Tricks ResNet as in the PTB-XL benchmark): three-conv stem, residual stages."""
from __future__ import annotations

import torch
from torch import nn

from .model import ConcatPool, Trunk, conv, conv_bn_relu, stages
from .registry import register_model


class ResBlock(nn.Module):
    """Two convolutions (the second BN zero-initialised, so the block starts as identity) plus an avg-pool/1x1 path."""

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int):
        super().__init__()
        bn = nn.BatchNorm1d(n_out)
        nn.init.zeros_(bn.weight)
        self.convs = nn.Sequential(conv_bn_relu(n_in, n_out, kernel, stride), conv(n_out, n_out, kernel), bn)
        pool = [nn.AvgPool1d(stride, ceil_mode=True)] if stride > 1 else []
        proj = [conv(n_in, n_out, 1), nn.BatchNorm1d(n_out)] if n_in != n_out else []
        self.shortcut = nn.Sequential(*pool, *proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.convs(x) + self.shortcut(x))


@register_model
def resnet1d(n_leads: int, length: int, width: int = 32, depth: int = 4, blocks: int = 1, kernel: int = 5) -> Trunk:
    """Stem (three convolutions, stride 2, then max-pool: 1/4 length) and ``depth`` stages of ``blocks`` residual
    blocks; the first stage keeps the length, each later one halves it; channels ``width``, 2x, then 4x."""
    if kernel % 2 == 0:
        raise ValueError(f"resnet1d kernel must be odd (residual sums need equal lengths), got {kernel}")
    stem = nn.Sequential(conv_bn_relu(n_leads, width, kernel, 2), conv_bn_relu(width, width, kernel),
                         conv_bn_relu(width, width, kernel), nn.MaxPool1d(3, 2, padding=1))
    named, n_in = [("stem", stem)], width
    for i in range(depth):
        n_out = width * 2 ** min(i, 2)
        named.append((f"stage{i + 1}", nn.Sequential(*(
            ResBlock(n_in if b == 0 else n_out, n_out, kernel, 2 if i > 0 and b == 0 else 1) for b in range(blocks)))))
        n_in = n_out
    return Trunk(stages(named), ConcatPool(), 2 * n_in)
