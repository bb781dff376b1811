"""Transfer learning: freezing depth, single- and fused-backbone transfer, learning-rate groups."""
from __future__ import annotations

import copy

from .model import ECGModel, FusedModel

Model = ECGModel | FusedModel


def freeze(model: Model, depth: int) -> Model:
    """Freeze the first ``depth`` backbone stages (of every backbone of a fused model; 0 unfreezes all).

    Frozen stages stop learning and stay in eval mode, so their BatchNorm running statistics do not change even after
    ``model.train()``. Freezing every stage of a backbone also freezes its pool. A fused backbone with fewer stages
    than ``depth`` is frozen whole.
    """
    n = len(model.stage_names)
    if not 0 <= depth <= n:
        raise ValueError(f"freezing depth {depth} is out of range 0..{n} for stages {model.stage_names}")
    model.frozen = depth
    for backbone, pool in model.trunks():
        for i, stage in enumerate(backbone):
            stage.requires_grad_(i >= depth)
        pool.requires_grad_(depth < len(backbone))
    model.train(model.training)
    return model


def single_transfer(pretrained: ECGModel, n_classes: int = 5) -> ECGModel:
    """A classifier made of a copy of ``pretrained``'s normalisation and backbone and a new head (nothing frozen)."""
    model = copy.deepcopy(pretrained)
    model.reset_classifier(n_classes, task="classification")
    return freeze(model, 0)


def fused_transfer(pretrained: dict[str, ECGModel], n_classes: int = 5, depth: int = 0) -> FusedModel:
    """A classifier over copies of several pretrained backbones (e.g. hr, pr, qrs, qt), each frozen to ``depth``."""
    head_dropout = next(iter(pretrained.values())).config["hparams"]["head_dropout"]
    return freeze(FusedModel(pretrained, n_classes, "classification", head_dropout), depth)


def param_groups(model: Model, lr: float, pretrained_lr_mult: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups of trainable parameters: backbone(s) and pools at ``lr * pretrained_lr_mult``, head at ``lr``.

    Groups without trainable parameters are left out.
    """
    head = {id(p) for p in model.head.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"name": "backbone", "params": [p for p in trainable if id(p) not in head], "lr": lr * pretrained_lr_mult},
        {"name": "head", "params": [p for p in trainable if id(p) in head], "lr": lr},
    ]
    return [{**g, "weight_decay": weight_decay} for g in groups if g["params"]]
