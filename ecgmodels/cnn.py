"""cnn1d: a plain convolution stack, each stage convolution, BatchNorm, ReLU, max-pool halving the length."""
from __future__ import annotations

from torch import nn

from .model import ConcatPool, Trunk, conv_bn_relu, stages
from .registry import register_model


@register_model
def cnn1d(n_leads: int, length: int, depth: int = 4, width: int = 32, kernel: int = 7, dropout: float = 0.1) -> Trunk:
    """``depth`` stages; channels ``width``, 2x, then 4x from the third stage on."""
    named, n_in = [], n_leads
    for i in range(depth):
        n_out = width * 2 ** min(i, 2)
        named.append((f"conv{i + 1}", nn.Sequential(conv_bn_relu(n_in, n_out, kernel), nn.MaxPool1d(2),
                                                    nn.Dropout(dropout))))
        n_in = n_out
    return Trunk(stages(named), ConcatPool(), 2 * n_in)
