"""A random forest on per-lead signal features, as a torch module: the zoo's classical member.

On a few hundred ECGs a forest on hand-made features (amplitudes, R peaks, spectral shape) often beats a net, and the
two err differently, so an ensemble holding both beats either. ``Forest.from_sklearn`` copies a fitted
``RandomForestClassifier``'s trees into tensors, so the forest saves and loads like any model (``weights_only``
checkpoints, no pickle) and an ``Ensemble`` can hold it beside nets; ``forward`` computes ``signal_features`` with
NumPy/SciPy on the CPU, walks every tree at once and returns the logits of the trees' mean class probabilities,
divided by its ``temperature``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import signal as sps
from scipy import stats
from torch import nn

from .model import _default_temperature

_FLOOR = 1e-6  # smallest probability: a class no tree votes for keeps a finite logit


def signal_features(signals: np.ndarray, rate: int) -> np.ndarray:
    """Hand-made features of (N, leads, L) ECGs in mV, one row per record.

    Per lead: amplitude statistics of the baseline-removed signal (SD, min, max, 5th/95th percentiles, skewness,
    kurtosis), R peaks found on the absolute signal (median peak amplitude, heart rate, RR spread, median width at
    half prominence in ms as a QRS width proxy, median slope) and relative spectral power in 0.5-5, 5-15, 15-40 Hz.
    """
    bands = ((0.5, 5), (5, 15), (15, 40))
    rows = []
    for record in signals:
        x = np.asarray(record, dtype=np.float64)
        x = x - np.median(x, axis=1, keepdims=True)
        feats = [x.std(1), x.min(1), x.max(1), *np.percentile(x, [5, 95], axis=1), stats.skew(x, axis=1),
                 stats.kurtosis(x, axis=1), np.abs(np.diff(x, axis=1)).max(1) * rate]
        freqs, power = sps.welch(x, fs=rate, nperseg=min(x.shape[1], 2 * rate), axis=1)
        total = power.sum(1) + 1e-12
        feats += [power[:, (freqs >= lo) & (freqs < hi)].sum(1) / total for lo, hi in bands]
        feats += list(np.array([_peak_features(lead, rate) for lead in x]).T)
        rows.append(np.concatenate([np.atleast_1d(f) for f in feats]))
    return np.nan_to_num(np.array(rows, dtype=np.float32))


def _peak_features(lead: np.ndarray, rate: int) -> tuple[float, float, float, float]:
    """Median R amplitude, heart rate (bpm), RR SD (ms) and median peak width (ms) of one baseline-removed lead."""
    a = np.abs(lead)
    peaks, props = sps.find_peaks(a, distance=int(0.3 * rate), prominence=0.5 * np.percentile(a, 99))
    if len(peaks) < 2:
        return np.nan, np.nan, np.nan, np.nan
    rr = np.diff(peaks) / rate
    widths = sps.peak_widths(a, peaks, rel_height=0.5, prominence_data=(props["prominences"], props["left_bases"],
                                                                       props["right_bases"]))[0]
    return float(np.median(lead[peaks])), 60 / float(np.median(rr)), float(rr.std() * 1000), \
        float(np.median(widths) / rate * 1000)


class Forest(nn.Module):
    """The trees of a fitted forest as padded (trees, nodes) tensors; a leaf's ``left`` is -1."""

    frozen = 0  # nothing to freeze: the same door as the nets

    def __init__(self, n_leads: int, length: int, rate: int, n_outputs: int, trees: int, nodes: int, depth: int,
                 n_features: int):
        super().__init__()
        self.register_buffer("left", torch.full((trees, nodes), -1, dtype=torch.long))
        self.register_buffer("right", torch.full((trees, nodes), -1, dtype=torch.long))
        self.register_buffer("feature", torch.zeros((trees, nodes), dtype=torch.long))
        self.register_buffer("threshold", torch.zeros((trees, nodes), dtype=torch.float64))
        self.register_buffer("value", torch.zeros((trees, nodes, n_outputs), dtype=torch.float64))
        self.register_buffer("temperature", torch.ones(()))
        self.register_load_state_dict_pre_hook(_default_temperature)
        self.config = {"name": "forest", "task": "classification", "n_outputs": int(n_outputs),
                       "n_leads": int(n_leads), "length": int(length), "rate": int(rate), "trees": int(trees),
                       "nodes": int(nodes), "depth": int(depth), "n_features": int(n_features)}

    @classmethod
    def from_sklearn(cls, forest: Any, n_leads: int, length: int, rate: int, n_outputs: int) -> "Forest":
        """Copy a fitted single-label ``RandomForestClassifier`` (class indices 0..n_outputs-1 as labels; a class
        it never saw gets probability 0 from every tree)."""
        trees = [e.tree_ for e in forest.estimators_]
        nodes, depth = max(t.node_count for t in trees), max(t.max_depth for t in trees)
        model = cls(n_leads, length, rate, n_outputs, len(trees), nodes, depth, forest.n_features_in_)
        classes = torch.as_tensor(np.asarray(forest.classes_, dtype=np.int64))
        for i, t in enumerate(trees):
            n = t.node_count
            model.left[i, :n] = torch.as_tensor(t.children_left)
            model.right[i, :n] = torch.as_tensor(t.children_right)
            model.feature[i, :n] = torch.as_tensor(t.feature).clamp_min(0)  # a leaf's -2 never indexes
            model.threshold[i, :n] = torch.as_tensor(t.threshold)
            v = torch.as_tensor(t.value[:, 0, :], dtype=torch.float64)
            model.value[i, :n, classes] = v / v.sum(1, keepdim=True).clamp_min(1e-300)
        return model

    def proba(self, features: torch.Tensor) -> torch.Tensor:
        """(N, n_features) -> (N, n_outputs): the trees' mean leaf class frequencies, as sklearn's predict_proba."""
        x = features.to(torch.float32).to(torch.float64)  # sklearn compares float32 features with its thresholds
        trees = torch.arange(self.left.shape[0], device=x.device)[None]
        node = torch.zeros(len(x), self.left.shape[0], dtype=torch.long, device=x.device)
        for _ in range(self.config["depth"]):
            left = self.left[trees, node]
            go_left = torch.gather(x, 1, self.feature[trees, node]) <= self.threshold[trees, node]
            node = torch.where(left < 0, node, torch.where(go_left, left, self.right[trees, node]))
        return self.value[trees, node].mean(1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, n_features) -> (N, n_outputs) float32: log of the trees' mean probabilities over the temperature."""
        return self.temper(self.proba(features))

    def temper(self, proba: torch.Tensor) -> torch.Tensor:
        """Class probabilities (of these trees, or some of them: out of bag) -> logits at this temperature."""
        return (proba.clamp_min(_FLOOR).log() / self.temperature).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = torch.from_numpy(signal_features(x.detach().float().cpu().numpy(), self.config["rate"]))
        return self.logits(feats.to(self.left.device))
