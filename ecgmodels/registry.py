"""The zoo's doors: ``@register_model`` architectures, ``create_model``, ``list_models``, ``default_hparams``."""
from __future__ import annotations

import inspect
from typing import Callable

from .model import HEAD_DROPOUT, ECGModel, Trunk

MODEL_HPARAMS = {"head_dropout": HEAD_DROPOUT, "lead_stats": False}  # every architecture takes these too

_MODELS: dict[str, Callable[..., Trunk]] = {}
_SHAPE_ARGS = ("n_leads", "length")  # every architecture function takes these first, then its hyperparameters


def register_model(fn: Callable[..., Trunk]) -> Callable[..., Trunk]:
    """Register an architecture ``fn(n_leads, length, **hparams) -> Trunk`` under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def _arch(name: str) -> Callable[..., Trunk]:
    if name not in _MODELS:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(list_models())}")
    return _MODELS[name]


def default_hparams(name: str) -> dict:
    """The architecture's searchable hyperparameters with their defaults (``MODEL_HPARAMS`` included)."""
    params = inspect.signature(_arch(name)).parameters
    hparams = {k: p.default for k, p in params.items() if k not in _SHAPE_ARGS}
    return {**hparams, **MODEL_HPARAMS}


def create_model(name: str, task: str = "classification", n_outputs: int | None = None, n_leads: int = 8,
                 length: int = 1000, norm: str = "zscore", **hparams) -> ECGModel:
    """Build architecture ``name`` for ``task`` ("classification": 5 logits by default; "regression": 1 output)."""
    defaults = default_hparams(name)
    unknown = sorted(set(hparams) - set(defaults))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {', '.join(unknown)} for {name}; it takes {', '.join(defaults)}")
    hparams = {**defaults, **hparams}
    arch_kw = {k: v for k, v in hparams.items() if k not in MODEL_HPARAMS}
    trunk = _arch(name)(n_leads, length, **arch_kw)
    return ECGModel(name, trunk, task, n_outputs, n_leads, length, norm, hparams)
