"""Per-lead summary statistics of the raw signal: the "wide" inputs that per-record normalisation hides.

A model built with ``lead_stats=True`` appends them to its pooled backbone features before the head, so amplitude
criteria (e.g. hypertrophy's voltage), slopes and spectral shape reach the classifier whatever ``norm`` did to the
backbone's input. Parameter-free: nothing to train or checkpoint; the head's first BatchNorm scales them.
"""
from __future__ import annotations

import torch
from torch import nn

# Relative spectral power bands as fractions of the Nyquist frequency: 0.5-5, 5-15 and 15-40 Hz at 100 Hz.
BANDS = ((0.01, 0.1), (0.1, 0.3), (0.3, 0.8))
PER_LEAD = 8 + len(BANDS)
_EPS = 1e-6


class LeadStats(nn.Module):
    """(N, leads, L) raw millivolts -> (N, leads * PER_LEAD) features, per lead of the baseline-removed signal:
    SD, min, max, 5th and 95th percentiles, skewness, excess kurtosis, largest sample-to-sample step, and the
    relative power in each of ``BANDS``; each passed through asinh so that outliers stay finite and in range."""

    def __init__(self, n_leads: int):
        super().__init__()
        self.num_features = n_leads * PER_LEAD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x - x.median(-1, keepdim=True).values
        sd = x.std(-1)
        low, high = torch.quantile(x, torch.tensor([0.05, 0.95], device=x.device), dim=-1)
        z = x / sd.clamp_min(_EPS)[..., None]
        power = torch.fft.rfft(x, dim=-1).abs().square()[..., 1:]  # without the DC bin
        f = torch.linspace(0, 1, power.shape[-1] + 1, device=x.device)[1:]
        total = power.sum(-1).clamp_min(_EPS)
        bands = [power[..., (f >= lo) & (f < hi)].sum(-1) / total for lo, hi in BANDS]
        feats = torch.stack([sd, x.amin(-1), x.amax(-1), low, high, z.pow(3).mean(-1), z.pow(4).mean(-1) - 3,
                             x.diff(dim=-1).abs().amax(-1), *bands], -1)
        return torch.asinh(feats).flatten(1)
