"""vit1d: a transformer encoder over non-overlapping time patches of all leads, with a class token."""
from __future__ import annotations

import torch
from torch import nn

from .model import Trunk, stages
from .registry import register_model


class PatchEmbed(nn.Module):
    """(N, leads, L) -> (N, 1 + L // patch, dim): linear patch projection, class token, learned positions."""

    def __init__(self, n_leads: int, length: int, patch: int, dim: int, dropout: float):
        super().__init__()
        self.proj = nn.Conv1d(n_leads, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + length // patch, dim) * 0.02)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).transpose(1, 2)
        return self.drop(torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos)


class ClassToken(nn.Module):
    """(N, T, dim) -> (N, dim): the final LayerNorm applied to the class token."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x[:, 0])


@register_model
def vit1d(n_leads: int, length: int, dim: int = 64, depth: int = 4, heads: int = 4, patches: int = 50,
          mlp_ratio: int = 2, dropout: float = 0.1) -> Trunk:
    """Patches of ``length // patches`` samples (0.2 s at the defaults, at any rate), ``depth`` pre-norm blocks."""
    patch = length // patches
    if patch < 1 or dim % heads:
        raise ValueError(f"vit1d needs 1 <= patches <= length and dim divisible by heads; got patches={patches}, "
                         f"length={length}, dim={dim}, heads={heads}")
    named = [("embed", PatchEmbed(n_leads, length, patch, dim, dropout))] + [
        (f"block{i + 1}", nn.TransformerEncoderLayer(dim, heads, dim * mlp_ratio, dropout, activation="gelu",
                                                     batch_first=True, norm_first=True)) for i in range(depth)]
    return Trunk(stages(named), ClassToken(dim), dim)
