"""The two model shapes: ECGModel (norm -> backbone stages -> pool -> head) and FusedModel (several backbones,
one head).

Architectures (one file each) build only a ``Trunk``; the head is shared by all of them (``make_head``).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import nn

from .normalize import Normalise
from .stats import LeadStats

TASKS = {"classification": 5, "regression": 1}  # task -> default number of outputs
HEAD_DROPOUT = 0.5


class Trunk(NamedTuple):
    """What an architecture builds: named backbone stages, a pool to (N, num_features), and that feature count."""
    backbone: nn.Sequential
    pool: nn.Module
    num_features: int


class ConcatPool(nn.Module):
    """(N, C, T) -> (N, 2C): global max pooling and average pooling side by side."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.amax(-1), x.mean(-1)], 1)


def make_head(num_features: int, n_outputs: int, dropout: float = HEAD_DROPOUT) -> nn.Sequential:
    """The InceptionTime head of the PTB-XL benchmark: BN, dropout/2, Linear 128, ReLU, BN, dropout, Linear out."""
    return nn.Sequential(
        nn.BatchNorm1d(num_features), nn.Dropout(dropout / 2), nn.Linear(num_features, 128), nn.ReLU(inplace=True),
        nn.BatchNorm1d(128), nn.Dropout(dropout), nn.Linear(128, n_outputs))


def resolve_task(task: str, n_outputs: int | None) -> int:
    """Check the task name and return the number of outputs (its default when None)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    n_outputs = TASKS[task] if n_outputs is None else int(n_outputs)
    if n_outputs < 1:
        raise ValueError(f"n_outputs must be at least 1, got {n_outputs}")
    return n_outputs


class _HeadedModel(nn.Module):
    """Doors shared by both shapes: forward = forward_head(features), a replaceable head, freezing-aware train().

    The head's outputs are divided by the ``temperature`` buffer (1 until ``calibration.set_temperature``), so the
    logits every caller sees are the calibrated ones; it travels in the state dict like the normalisation, and a
    state dict saved before it existed loads with temperature 1.
    """
    config: dict
    num_features: int
    frozen: int = 0  # set by transfer.freeze: the first `frozen` stages of every backbone are frozen

    def __init__(self):
        super().__init__()
        self.register_buffer("temperature", torch.ones(()))
        self.register_load_state_dict_pre_hook(_default_temperature)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features) / self.temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.features(x))

    def reset_classifier(self, n_outputs: int, task: str | None = None) -> None:
        """Replace the head by a fresh one of the same design with ``n_outputs`` outputs (and optionally a new task)."""
        task = task or self.config["task"]
        n_outputs = resolve_task(task, n_outputs)
        device = next(self.parameters()).device
        self.head = make_head(self.num_features, n_outputs, self.config["hparams"]["head_dropout"]).to(device)
        self.head.train(self.training)
        self.temperature.fill_(1.0)  # a new head is not calibrated
        self.config.update(task=task, n_outputs=n_outputs)

    def train(self, mode: bool = True) -> "_HeadedModel":
        super().train(mode)
        for backbone, _ in self.trunks():
            for stage in backbone[:self.frozen]:
                stage.eval()  # frozen stages keep their BatchNorm statistics (and run dropout-free)
        return self


def _default_temperature(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: a state dict from before the temperature buffer gets temperature 1."""
    state_dict.setdefault(prefix + "temperature", torch.ones(()))


class ECGModel(_HeadedModel):
    """One architecture: ``norm`` -> ``backbone`` (named stages) -> ``pool`` -> ``head``; with the hyperparameter
    ``lead_stats`` the raw input's per-lead statistics (``LeadStats``) join the pooled features before the head."""

    def __init__(self, name: str, trunk: Trunk, task: str, n_outputs: int | None, n_leads: int, length: int,
                 norm: str, hparams: dict):
        super().__init__()
        n_outputs = resolve_task(task, n_outputs)
        self.norm = Normalise(norm, int(n_leads))
        self.backbone, self.pool, self.num_features = trunk
        self.stats = LeadStats(int(n_leads)) if hparams.get("lead_stats") else None
        self.num_features += self.stats.num_features if self.stats else 0
        self.head = make_head(self.num_features, n_outputs, hparams["head_dropout"])
        self.config = {"name": name, "task": task, "n_outputs": n_outputs, "n_leads": int(n_leads),
                       "length": int(length), "norm": norm,
                       "hparams": {k: v.item() if hasattr(v, "item") else v for k, v in hparams.items()}}

    @property
    def stage_names(self) -> list[str]:
        return list(self.backbone._modules)

    def trunks(self) -> list[tuple[nn.Sequential, nn.Module]]:
        """(backbone, pool) pairs: the pretrained part, the unit of freezing."""
        return [(self.backbone, self.pool)]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Already normalised input -> pooled backbone features."""
        return self.pool(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw millivolts (N, n_leads, L) -> pooled backbone features (and lead statistics): (N, num_features)."""
        pooled = self.encode(self.norm(x))
        return torch.cat([pooled, self.stats(x).to(pooled.dtype)], 1) if self.stats else pooled


class FusedModel(_HeadedModel):
    """Copies of several pretrained backbones (one per key, e.g. hr, pr, qrs, qt) feeding one new head.

    The input is normalised once, by a copy of the first source's normalisation, so all sources must share it.
    """

    def __init__(self, sources: dict[str, ECGModel], n_outputs: int | None = None, task: str = "classification",
                 head_dropout: float = HEAD_DROPOUT):
        super().__init__()
        if not sources:
            raise ValueError("a fused model needs at least one pretrained model")
        first_key, first = next(iter(sources.items()))
        for key, model in sources.items():
            for field in ("n_leads", "length", "norm"):
                if model.config[field] != first.config[field]:
                    raise ValueError(f"cannot fuse: {key} has {field}={model.config[field]!r} but {first_key} has "
                                     f"{first.config[field]!r}")
            if not torch.allclose(model.norm.scale, first.norm.scale, rtol=1e-3):
                raise ValueError(f"cannot fuse: the global normalisation scale of {key} differs from {first_key}'s; "
                                 "fit it on the same training split for every source")
        n_outputs = resolve_task(task, n_outputs)
        self.norm = copy.deepcopy(first.norm)
        self.backbones = nn.ModuleDict({k: copy.deepcopy(m.backbone) for k, m in sources.items()})
        self.pools = nn.ModuleDict({k: copy.deepcopy(m.pool) for k, m in sources.items()})
        self.num_features = sum(m.num_features for m in sources.values())
        self.head = make_head(self.num_features, n_outputs, head_dropout)
        self.config = {"name": "fused", "task": task, "n_outputs": n_outputs, "n_leads": first.config["n_leads"],
                       "length": first.config["length"], "norm": first.config["norm"],
                       "hparams": {"head_dropout": float(head_dropout)},
                       "backbones": {k: copy.deepcopy(m.config) for k, m in sources.items()}}

    @property
    def stage_names(self) -> list[str]:
        """The deepest backbone's stage names: their count is the largest freezing depth."""
        return max((list(b._modules) for b in self.backbones.values()), key=len)

    def trunks(self) -> list[tuple[nn.Sequential, nn.Module]]:
        """(backbone, pool) pairs in key order: the pretrained part, the unit of freezing."""
        return [(self.backbones[k], self.pools[k]) for k in self.backbones]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw millivolts -> every backbone's pooled features, concatenated in key order."""
        x = self.norm(x)
        return torch.cat([self.pools[k](b(x)) for k, b in self.backbones.items()], 1)


def stages(named: list[tuple[str, nn.Module]]) -> nn.Sequential:
    """A backbone: an nn.Sequential of named stages, in order."""
    return nn.Sequential(OrderedDict(named))


def conv(n_in: int, n_out: int, kernel: int, stride: int = 1) -> nn.Conv1d:
    """Bias-free 1-D convolution with 'same' padding (for odd kernels), as in the PTB-XL benchmark models."""
    return nn.Conv1d(n_in, n_out, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False)


def conv_bn_relu(n_in: int, n_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(conv(n_in, n_out, kernel, stride), nn.BatchNorm1d(n_out), nn.ReLU(inplace=True))
