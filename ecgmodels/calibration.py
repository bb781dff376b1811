"""Calibration that belongs to the model: the head's bias starts at the class prior, and one temperature fitted on
held-out rows divides its logits (the ``temperature`` buffer of both model shapes, saved with the checkpoint).

    init_prior_bias(model, y_train)            # before training
    t = fit_temperature(val_logits, y_val)     # after the best epoch, on outputs at temperature 1
    set_temperature(model, t)                  # model(x) now returns logits / t
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

T_RANGE = (0.05, 20.0)  # a fitted temperature is clipped to this range (a degenerate fit cannot zero the logits)


def nll(logits: torch.Tensor, y: torch.Tensor, multi_label: bool = False) -> torch.Tensor:
    """Mean negative log-likelihood of labels under logits: softmax cross-entropy, or per-label binary
    cross-entropy for multi-hot `y`."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
    return F.cross_entropy(logits, y.long())


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, multi_label: bool = False) -> float:
    """The temperature T minimising the NLL of ``logits / T`` (logits are the model's outputs at T = 1; `y` class
    indices, or multi-hot with ``multi_label``), by LBFGS over log T. Classification only."""
    logits = torch.as_tensor(logits).detach().double().cpu()
    y = torch.as_tensor(y).detach().cpu()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nll(logits / log_t.exp(), y, multi_label)
        loss.backward()
        return loss

    opt.step(closure)
    t = math.exp(log_t.item())
    return float(min(max(t, T_RANGE[0]), T_RANGE[1])) if math.isfinite(t) else 1.0


def set_temperature(model: nn.Module, t: float) -> None:
    """Make ``model(x)`` return its head's logits divided by ``t`` (a positive number)."""
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a positive number, got {t}")
    model.temperature.fill_(float(t))


def prior(y_train: np.ndarray | torch.Tensor, n_classes: int, multi_label: bool = False) -> np.ndarray:
    """Per-class frequency of the training rows with one pseudo-count (Laplace), so an absent class is not -inf:
    P(class) for class indices, P(label present) for multi-hot rows."""
    y = np.asarray(torch.as_tensor(y_train).cpu())
    if multi_label:
        return (y.sum(0) + 1.0) / (len(y) + 2.0)
    counts = np.bincount(y.astype(np.int64), minlength=n_classes)[:n_classes]
    return (counts + 1.0) / (counts.sum() + n_classes)


@torch.no_grad()
def init_prior_bias(model: nn.Module, y_train: np.ndarray | torch.Tensor, multi_label: bool = False) -> None:
    """Set the bias of the head's last Linear to what a constant predictor of the training rows would output: the
    log class prior (softmax), the log-odds of each label (sigmoid, ``multi_label``), or 0 (regression, whose target
    is trained standardised)."""
    last = [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1]
    if model.config["task"] == "regression":
        last.bias.zero_()
        return
    p = torch.as_tensor(prior(y_train, last.out_features, multi_label), dtype=last.bias.dtype)
    last.bias.copy_(torch.log(p) - torch.log1p(-p) if multi_label else torch.log(p))
