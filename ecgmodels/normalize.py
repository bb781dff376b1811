"""Input normalisation as a module inside the model, so it travels with checkpoints and the registry."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

NORMALISATIONS = ("zscore", "minmax", "global")
_EPS = 1e-6


class Normalise(nn.Module):
    """Normalise raw millivolt ECGs of shape (N, leads, L) per record and lead.

    - ``zscore``: subtract the record's lead mean, divide by its standard deviation.
    - ``minmax``: map the record's lead range onto [0, 1] (what the study did).
    - ``global``: subtract the record's lead median (baseline), divide by a per-lead ``scale`` buffer fitted on the
      training split (``fit`` or ``set_scale``), so relative amplitude between records is kept. ``fitted`` says
      whether that happened (it travels with checkpoints and transfer copies: fit only models that are not fitted).
    """

    def __init__(self, kind: str = "zscore", n_leads: int = 8):
        super().__init__()
        if kind not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {kind!r}; choose one of {', '.join(NORMALISATIONS)}")
        self.kind = kind
        self.register_buffer("scale", torch.ones(n_leads))
        self.register_buffer("fitted", torch.tensor(False))  # True once the global scale was set

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "zscore":
            return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(_EPS)
        if self.kind == "minmax":
            lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
            return (x - lo) / (hi - lo).clamp_min(_EPS)
        return (x - x.median(-1, keepdim=True).values) / self.scale[:, None]

    @torch.no_grad()
    def fit(self, x: np.ndarray | torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Set ``scale`` to the per-lead median over records of the baseline-removed standard deviation.

        Call it once on (a sample of) the training split of the data the model is first trained on; a transferred
        model keeps the scale its backbone was trained with, so do not refit it.
        """
        stds = []
        for i in range(0, len(x), chunk):
            part = torch.as_tensor(np.asarray(x[i:i + chunk]), dtype=torch.float32)
            stds.append((part - part.median(-1, keepdim=True).values).std(-1))
        self.set_scale(torch.cat(stds).median(0).values)
        return self.scale

    def set_scale(self, scale: torch.Tensor) -> None:
        """Set the per-lead scale of the ``global`` normalisation (one positive value per lead)."""
        scale = torch.as_tensor(scale, dtype=self.scale.dtype)
        if scale.shape != self.scale.shape:
            raise ValueError(f"scale has shape {tuple(scale.shape)}, expected one value per lead "
                             f"{tuple(self.scale.shape)}")
        self.scale.copy_(scale.clamp_min(_EPS))
        self.fitted.fill_(True)

    def extra_repr(self) -> str:
        return self.kind
