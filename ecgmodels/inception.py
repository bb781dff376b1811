"""inception1d: InceptionTime as in the PTB-XL benchmark (Strodthoff et al. 2021), the study's "1D-CNN"."""
from __future__ import annotations

import torch
from torch import nn

from .model import ConcatPool, Trunk, conv, stages
from .registry import register_model


class InceptionBlock(nn.Module):
    """1x1 bottleneck, three convolutions of decreasing kernel and a max-pool branch, concatenated, BN, ReLU."""

    def __init__(self, n_in: int, filters: int, kernels: list[int], bottleneck: int):
        super().__init__()
        self.bottleneck = conv(n_in, bottleneck, 1)
        self.convs = nn.ModuleList(conv(bottleneck, filters, k) for k in kernels)
        self.pool_branch = nn.Sequential(nn.MaxPool1d(3, 1, padding=1), conv(n_in, filters, 1))
        self.bn_relu = nn.Sequential(nn.BatchNorm1d(filters * (len(kernels) + 1)), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bottleneck(x)
        return self.bn_relu(torch.cat([c(b) for c in self.convs] + [self.pool_branch(x)], 1))


class ResidualGroup(nn.Module):
    """Three inception blocks with a 1x1 conv + BN shortcut around them, ReLU after the sum: one freezing stage."""

    def __init__(self, n_in: int, filters: int, kernels: list[int], bottleneck: int):
        super().__init__()
        n_out = filters * (len(kernels) + 1)
        self.blocks = nn.Sequential(*(InceptionBlock(n_in if i == 0 else n_out, filters, kernels, bottleneck)
                                      for i in range(3)))
        self.shortcut = nn.Sequential(conv(n_in, n_out, 1), nn.BatchNorm1d(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.blocks(x) + self.shortcut(x))


@register_model
def inception1d(n_leads: int, length: int, depth: int = 6, filters: int = 32, kernel: int = 40,
                bottleneck: int = 32) -> Trunk:
    """``depth`` inception blocks (a multiple of 3; each group of 3 with its shortcut is one stage), kernels
    ``kernel``, ``kernel/2``, ``kernel/4`` made odd (40 -> 39, 19, 9); 128 channels at the default ``filters``."""
    if depth < 3 or depth % 3:
        raise ValueError(f"inception1d depth must be a positive multiple of 3, got {depth}")
    kernels = [k if k % 2 else k - 1 for k in (kernel, kernel // 2, kernel // 4)]
    n_out = filters * (len(kernels) + 1)
    groups = [(f"group{i + 1}", ResidualGroup(n_leads if i == 0 else n_out, filters, kernels, bottleneck))
              for i in range(depth // 3)]
    return Trunk(stages(groups), ConcatPool(), 2 * n_out)
