"""lstm: bidirectional LSTM layers over a sequence downsampled by a two-layer convolution stem."""
from __future__ import annotations

import math

import torch
from torch import nn

from .model import ConcatPool, Trunk, conv_bn_relu, stages
from .registry import register_model


class BiLSTM(nn.Module):
    """One bidirectional LSTM layer on (N, C, T) -> (N, 2*hidden, T), with dropout on its output."""

    def __init__(self, n_in: int, hidden: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(n_in, hidden, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.lstm(x.transpose(1, 2))[0]).transpose(1, 2)


@register_model
def lstm(n_leads: int, length: int, hidden: int = 64, depth: int = 2, width: int = 64, kernel: int = 7,
         steps: int = 125, dropout: float = 0.1) -> Trunk:
    """Stem: two convolutions of ``width`` channels, each max-pooled by ``f = round(sqrt(length / steps))``, so the
    LSTM sees about ``steps`` time steps at any rate (111 at length 1000, 138 at 5000); then ``depth`` BiLSTM layers."""
    f = max(1, round(math.sqrt(length / steps)))
    stem = nn.Sequential(conv_bn_relu(n_leads, width, kernel), nn.MaxPool1d(f),
                         conv_bn_relu(width, width, kernel), nn.MaxPool1d(f))
    named = [("stem", stem)] + [(f"lstm{i + 1}", BiLSTM(width if i == 0 else 2 * hidden, hidden, dropout))
                                for i in range(depth)]
    return Trunk(stages(named), ConcatPool(), 4 * hidden)
