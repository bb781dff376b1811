"""Freezing, single and fused transfer, learning-rate groups, with real training steps."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ecgmodels import create_model, freeze, fused_transfer, param_groups, single_transfer

TARGETS = ["hr", "pr", "qrs", "qt"]


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.SGD(param_groups(model, lr=0.1), lr=0.1)
    model.train()  # after freezing: frozen stages must stay in eval mode anyway
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _bn_stats(module: nn.Module) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in module.modules() if isinstance(m, nn.BatchNorm1d)]


def test_frozen_stages_and_their_batchnorm_statistics_do_not_change():
    torch.manual_seed(0)
    model = freeze(create_model("resnet1d", length=500), 2)
    assert [s for s in model.stage_names[:2]] == ["stem", "stage1"]
    frozen, live = nn.ModuleList(model.backbone[:2]), nn.ModuleList(model.backbone[2:])
    before_frozen, before_live, before_head = _snapshot(frozen), _snapshot(live), _snapshot(model.head)
    stats_frozen, stats_live = _bn_stats(frozen), _bn_stats(live)
    _train_steps(model, torch.randn(8, 8, 500), torch.arange(8) % 5)
    assert all(torch.equal(v, frozen.state_dict()[k]) for k, v in before_frozen.items())
    assert all(torch.equal(a, b) for a, b in zip(stats_frozen, _bn_stats(frozen)))
    assert not all(torch.equal(a, b) for a, b in zip(stats_live, _bn_stats(live)))
    changed = [k for k, v in before_live.items() if v.is_floating_point() and not torch.equal(v, live.state_dict()[k])]
    assert any(k.endswith("weight") for k in changed)
    assert not torch.equal(before_head["2.weight"], model.head[2].weight)


def test_freeze_depth_bounds_and_unfreezing():
    model = create_model("cnn1d")
    with pytest.raises(ValueError, match=r"freezing depth 5 is out of range 0\.\.4"):
        freeze(model, 5)
    freeze(model, 4)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert [g["name"] for g in param_groups(model, 1e-3)] == ["head"]
    freeze(model, 0)
    assert all(p.requires_grad for p in model.parameters()) and model.train().backbone.training


def test_single_transfer_copies_the_backbone_and_gives_a_new_classifier_head():
    source = create_model("inception1d", "regression", norm="global")
    source.norm.set_scale(torch.full((8,), 0.3))
    model = single_transfer(source, n_classes=5)
    assert model.config["task"] == "classification" and model.eval()(torch.randn(2, 8, 1000)).shape == (2, 5)
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in source.backbone.state_dict().items())
    assert torch.equal(model.norm.scale, source.norm.scale) and model.config["norm"] == "global"
    assert model.backbone[0].blocks[0].bottleneck.weight is not source.backbone[0].blocks[0].bottleneck.weight


def test_param_groups_give_the_pretrained_part_a_lower_learning_rate():
    model = freeze(single_transfer(create_model("resnet1d", "regression")), 1)
    groups = param_groups(model, lr=1e-2, pretrained_lr_mult=0.1, weight_decay=0.01)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("backbone", 1e-3, 0.01), ("head", 1e-2, 0.01)]
    head_ids = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in groups[1]["params"]} == head_ids
    stem_ids = {id(p) for p in model.backbone.stem.parameters()}
    assert not stem_ids & {id(p) for p in groups[0]["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups for p in g["params"]}


def test_fused_model_holds_four_distinct_pretrained_backbones_frozen_to_depth():
    torch.manual_seed(0)
    sources = {t: create_model("cnn1d", "regression", length=500, width=8) for t in TARGETS}
    fused = fused_transfer(sources, n_classes=5, depth=2)
    assert list(fused.backbones) == TARGETS and fused.num_features == 4 * sources["hr"].num_features
    states = {t: _snapshot(fused.backbones[t]) for t in TARGETS}
    for t in TARGETS:
        assert all(torch.equal(v, states[t][k]) for k, v in sources[t].backbone.state_dict().items())
    weights = [states[t]["conv1.0.0.weight"] for t in TARGETS]
    assert all(not torch.equal(a, b) for i, a in enumerate(weights) for b in weights[i + 1:])
    frozen = {t: (_snapshot(fused.backbones[t][:2]), _bn_stats(fused.backbones[t][:2])) for t in TARGETS}
    live = {t: _snapshot(fused.backbones[t][2:]) for t in TARGETS}
    _train_steps(fused, torch.randn(8, 8, 500), torch.arange(8) % 5)
    assert fused(torch.randn(3, 8, 500)).shape == (3, 5)
    for t in TARGETS:
        params, stats = frozen[t]
        assert all(torch.equal(v, fused.backbones[t][:2].state_dict()[k]) for k, v in params.items())
        assert all(torch.equal(a, b) for a, b in zip(stats, _bn_stats(fused.backbones[t][:2])))
        assert not torch.equal(live[t]["conv3.0.0.weight"], fused.backbones[t][2][0][0].weight)
    # the sources are untouched copies
    assert all(torch.equal(v, sources["hr"].backbone.state_dict()[k]) for k, v in states["hr"].items())


def test_fused_model_mixes_architectures_and_rejects_mismatched_inputs():
    sources = {"hr": create_model("cnn1d", "regression"), "qrs": create_model("resnet1d", "regression")}
    fused = fused_transfer(sources, depth=5)  # deeper than cnn1d: cnn1d is frozen whole, resnet1d to 5 stages
    assert len(fused.stage_names) == 5
    assert not any(p.requires_grad for p in fused.backbones["hr"].parameters())
    assert not any(p.requires_grad for p in fused.backbones["qrs"].parameters())
    with pytest.raises(ValueError, match="qrs has n_leads=12"):
        fused_transfer({"hr": create_model("cnn1d"), "qrs": create_model("cnn1d", n_leads=12)})
    with pytest.raises(ValueError, match="qrs has norm='minmax'"):
        fused_transfer({"hr": create_model("cnn1d"), "qrs": create_model("cnn1d", norm="minmax")})
