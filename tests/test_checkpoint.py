"""Checkpoints round-trip to identical outputs; backbones load only into a matching architecture."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ecgmodels import (FusedModel, create_model, freeze, fused_transfer, list_models, load_backbone, load_checkpoint,
                       save_checkpoint)
from ecgmodels.checkpoint import read_checkpoint


@pytest.mark.parametrize("name", list_models())
def test_round_trip_gives_identical_outputs(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, "regression", n_outputs=4, length=500, norm="global")
    model.norm.fit(torch.randn(20, 8, 500) * 0.4)
    freeze(model, 1)
    model.eval()
    save_checkpoint(model, tmp_path / "sub" / "model.pt", extra={"epoch": 7, "val_mae": 1.5})
    loaded = load_checkpoint(tmp_path / "sub" / "model.pt").eval()
    x = torch.randn(3, 8, 500)
    assert torch.equal(model(x), loaded(x))
    assert loaded.config == model.config and loaded.frozen == 1
    assert torch.equal(loaded.norm.scale, model.norm.scale) and not torch.equal(loaded.norm.scale, torch.ones(8))
    assert loaded.norm.fitted
    ckpt = torch.load(tmp_path / "sub" / "model.pt", weights_only=True)
    assert ckpt["extra"] == {"epoch": 7, "val_mae": 1.5} == read_checkpoint(tmp_path / "sub" / "model.pt")["extra"]


def test_numpy_hyperparameters_still_load_safely(tmp_path):
    model = create_model("cnn1d", n_leads=np.int64(8), length=np.int64(1000), width=np.int64(8), dropout=np.float64(0.2))
    assert json.loads(json.dumps(model.config)) == model.config
    save_checkpoint(model, tmp_path / "m.pt")
    assert load_checkpoint(tmp_path / "m.pt").config["hparams"]["width"] == 8


def test_fused_round_trip(tmp_path):
    torch.manual_seed(0)
    sources = {t: create_model("cnn1d", "regression", norm="global", width=8) for t in ("hr", "pr", "qrs", "qt")}
    for m in sources.values():
        m.norm.set_scale(torch.linspace(0.1, 0.8, 8))
    fused = fused_transfer(sources, depth=2).eval()
    save_checkpoint(fused, tmp_path / "fused.pt")
    loaded = load_checkpoint(tmp_path / "fused.pt").eval()
    assert isinstance(loaded, FusedModel) and loaded.frozen == 2 and list(loaded.backbones) == list(fused.backbones)
    x = torch.randn(2, 8, 1000)
    assert torch.equal(fused(x), loaded(x))
    assert torch.equal(loaded.norm.scale, torch.linspace(0.1, 0.8, 8))
    assert not any(p.requires_grad for p in loaded.backbones["qt"][:2].parameters())


def test_load_backbone_copies_weights_and_normalisation(tmp_path):
    source = create_model("resnet1d", "regression", norm="global")
    source.norm.set_scale(torch.full((8,), 0.25))
    save_checkpoint(source, tmp_path / "qrs.pt")
    model = load_backbone(create_model("resnet1d", "classification"), tmp_path / "qrs.pt")
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in source.backbone.state_dict().items())
    assert model.config["norm"] == "global" and torch.equal(model.norm.scale, source.norm.scale)
    assert model.eval()(torch.randn(2, 8, 1000)).shape == (2, 5)


def test_load_backbone_names_both_sides_when_they_differ(tmp_path):
    save_checkpoint(create_model("inception1d", "regression"), tmp_path / "qrs.pt")
    with pytest.raises(ValueError, match=r"qrs\.pt \(inception1d with 8 leads.*model of resnet1d with 8 leads"):
        load_backbone(create_model("resnet1d"), tmp_path / "qrs.pt")
    with pytest.raises(ValueError, match=r"inception1d with 8 leads.*inception1d with 12 leads"):
        load_backbone(create_model("inception1d", n_leads=12), tmp_path / "qrs.pt")
    with pytest.raises(ValueError, match=r"'filters': 32.*'filters': 16"):
        load_backbone(create_model("inception1d", filters=16), tmp_path / "qrs.pt")
