"""rnn: a plain recurrent network (GRU or Elman) over a sequence downsampled by a two-layer convolution stem."""
from __future__ import annotations

import math

import torch
from torch import nn

from .model import ConcatPool, Trunk, conv_bn_relu, stages
from .registry import register_model

CELLS = {"gru": nn.GRU, "elman": nn.RNN}


class Recurrent(nn.Module):
    """One unidirectional recurrent layer on (N, C, T) -> (N, hidden, T), with dropout on its output."""

    def __init__(self, cell: str, n_in: int, hidden: int, dropout: float):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"unknown rnn cell {cell!r}; choose one of {', '.join(CELLS)}")
        self.rnn = CELLS[cell](n_in, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.rnn(x.transpose(1, 2))[0]).transpose(1, 2)


@register_model
def rnn(n_leads: int, length: int, hidden: int = 64, depth: int = 2, width: int = 64, kernel: int = 7,
        steps: int = 125, dropout: float = 0.1, cell: str = "gru") -> Trunk:
    """The lstm's stem (two convolutions of ``width`` channels, each max-pooled by ``round(sqrt(length / steps))``)
    then ``depth`` unidirectional ``cell`` layers ("gru" or "elman": tanh RNN), pooled max + mean over time."""
    f = max(1, round(math.sqrt(length / steps)))
    stem = nn.Sequential(conv_bn_relu(n_leads, width, kernel), nn.MaxPool1d(f),
                         conv_bn_relu(width, width, kernel), nn.MaxPool1d(f))
    named = [("stem", stem)] + [(f"rnn{i + 1}", Recurrent(cell, width if i == 0 else hidden, hidden, dropout))
                                for i in range(depth)]
    return Trunk(stages(named), ConcatPool(), 2 * hidden)
