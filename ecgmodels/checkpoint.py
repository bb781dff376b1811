"""Checkpoints: the model's JSON-able config, its state dict (normalisation and temperature buffers included) and
caller extras, loaded with ``torch.load(weights_only=True)``; an Ensemble's holds its members'."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .ensemble import Ensemble
from .forest import Forest
from .model import ECGModel, FusedModel
from .registry import create_model
from .transfer import freeze

Model = ECGModel | FusedModel | Ensemble | Forest


def save_checkpoint(model: Model, path: str | Path, extra: dict | None = None) -> None:
    """Write ``{"config", "frozen", "state_dict", "extra"}`` to ``path`` (atomically; tensors moved to CPU).

    ``extra`` must hold only plain values and tensors, so that it loads with ``weights_only=True``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"config": model.config, "frozen": model.frozen, "state_dict": state, "extra": extra or {}}, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict (``config``, ``frozen``, ``state_dict``, ``extra``), loaded safely onto the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def build(config: dict) -> Model:
    """A freshly initialised model of this config (a model's ``config`` or a checkpoint's)."""
    if config["name"] == "ensemble":
        return Ensemble([build(c) for c in config["members"]], config["weights"], config["multi_label"])
    if config["name"] == "forest":
        return Forest(*(config[k] for k in ("n_leads", "length", "rate", "n_outputs", "trees", "nodes", "depth",
                                            "n_features")))
    if config["name"] == "fused":
        sources = {k: build(c) for k, c in config["backbones"].items()}
        return FusedModel(sources, config["n_outputs"], config["task"], config["hparams"]["head_dropout"])
    return create_model(config["name"], config["task"], config["n_outputs"], config["n_leads"], config["length"],
                        config["norm"], **config["hparams"])


def load_checkpoint(path: str | Path) -> Model:
    """Rebuild the saved model (ECGModel, FusedModel, Forest or Ensemble) with its weights, normalisation,
    temperature and freezing depth."""
    ckpt = read_checkpoint(path)
    model = build(ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return _refreeze(model, ckpt["frozen"])


def _refreeze(model: Model, frozen: int | list) -> Model:
    """Freeze a model to its saved depth (an ensemble's members each to theirs)."""
    if isinstance(model, Ensemble):
        for member, depth in zip(model.members, frozen):
            _refreeze(member, depth)
        return model
    return model if isinstance(model, Forest) else freeze(model, frozen)


def _describe(config: dict) -> str:
    return f"{config['name']} with {config['n_leads']} leads at length {config['length']}"


def load_backbone(model: ECGModel, path: str | Path) -> ECGModel:
    """Load the normalisation, backbone and pool of the checkpoint at ``path`` into ``model``; its head is kept.

    The checkpoint must hold the same architecture, lead count and length (and shape-changing hyperparameters).
    """
    ckpt = read_checkpoint(path)
    src, dst = ckpt["config"], model.config
    if "fused" in (src["name"], dst["name"]):
        raise ValueError(f"load_backbone copies one backbone; checkpoint {path} holds {src['name']}, "
                         f"the model is {dst['name']}")
    if any(src[k] != dst[k] for k in ("name", "n_leads", "length")):
        raise ValueError(f"cannot load the backbone of checkpoint {path} ({_describe(src)}) into a model of "
                         f"{_describe(dst)}")
    state = ckpt["state_dict"]
    try:
        for part in ("norm", "backbone", "pool"):
            prefix = part + "."
            getattr(model, part).load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    except RuntimeError as err:
        raise ValueError(f"cannot load the backbone of checkpoint {path} ({src['name']} {src['hparams']}) into "
                         f"{dst['name']} {dst['hparams']}: {err}") from None
    model.norm.kind = dst["norm"] = src["norm"]
    return model
