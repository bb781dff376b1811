"""The zoo: shapes at both rates and tasks, parameter count, overfitting a tiny batch, normalisations."""
from __future__ import annotations

import pytest
import torch

from ecgmodels import NORMALISATIONS, create_model, default_hparams, list_models
from ecgmodels.normalize import Normalise

ARCHS = ["cnn1d", "inception1d", "lstm", "resnet1d", "rnn", "vit1d"]


def test_zoo_lists_every_architecture():
    assert list_models() == ARCHS
    assert default_hparams("inception1d") == {"depth": 6, "filters": 32, "kernel": 40, "bottleneck": 32,
                                              "head_dropout": 0.5, "lead_stats": False}


@pytest.mark.parametrize("name", ["cnn1d", "lstm"])
def test_lead_stats_let_a_zscore_model_see_the_voltage_it_normalises_away(name):
    """Per-record z-scoring makes an ECG and the same ECG at twice the voltage (hypertrophy's criterion) identical
    to the backbone; with lead_stats the head still gets each lead's amplitude, slope and spectral shape."""
    torch.manual_seed(0)
    t = torch.linspace(0, 10, 1000)
    x = torch.stack([torch.sin(2 * torch.pi * 1.2 * t) * (i + 1) * 0.3 for i in range(8)])[None] + 0.01 * torch.randn(
        1, 8, 1000)
    batch = torch.cat([x, 2 * x])
    plain = create_model(name, norm="zscore").eval()
    wide = create_model(name, norm="zscore", lead_stats=True).eval()
    with torch.no_grad():
        assert torch.allclose(*plain.features(batch), atol=1e-4)
        f = wide.features(batch)
    assert wide.num_features == plain.num_features + 8 * 11 == f.shape[1]
    assert torch.allclose(f[0, :plain.num_features], f[1, :plain.num_features], atol=1e-4)
    stats = f[:, plain.num_features:].reshape(2, 8, 11)
    assert torch.allclose(stats[1, :, 0], torch.asinh(2 * torch.sinh(stats[0, :, 0])), atol=1e-4)  # SD doubled
    assert (stats[0, 1:, 0] > stats[0, :-1, 0]).all()  # lead i's amplitude (i + 1) x 0.3 mV, in order
    assert torch.allclose(stats[0, :, 8:].sinh().sum(-1), torch.ones(8), atol=0.05)  # ~all power in 0.5-40 Hz
    assert wide(batch).shape == (2, 5) and not torch.allclose(*wide(batch))


@pytest.mark.parametrize("length", [1000, 5000])
@pytest.mark.parametrize("task,n_outputs,expected", [("classification", None, 5), ("regression", None, 1),
                                                      ("regression", 4, 4)])
@pytest.mark.parametrize("name", ARCHS)
def test_forward_shapes(name, length, task, n_outputs, expected):
    torch.manual_seed(0)
    model = create_model(name, task, n_outputs, length=length).eval()
    x = torch.randn(2, 8, length)
    with torch.no_grad():
        features = model.features(x)
        out = model(x)
    assert features.shape == (2, model.num_features)
    assert out.shape == (2, expected)
    assert torch.equal(out, model.forward_head(features))
    assert len(model.backbone) == len(model.stage_names) >= 2
    assert model.config == {"name": name, "task": task, "n_outputs": expected, "n_leads": 8, "length": length,
                            "norm": "zscore", "hparams": default_hparams(name)}


def test_inception_default_size_matches_the_benchmark():
    model = create_model("inception1d", "regression", n_leads=8)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 506_000) / 506_000 < 0.02, n


def test_hyperparameters_change_the_model_and_bad_ones_are_named():
    small = create_model("cnn1d", depth=2, width=8)
    assert small.stage_names == ["conv1", "conv2"] and small.config["hparams"]["width"] == 8
    with pytest.raises(ValueError, match="widht.*cnn1d"):
        create_model("cnn1d", widht=8)
    with pytest.raises(ValueError, match="unknown architecture 'alexnet'.*inception1d"):
        create_model("alexnet")
    with pytest.raises(ValueError, match="unknown task"):
        create_model("cnn1d", "segmentation")


def test_reset_classifier_turns_a_regressor_into_a_classifier():
    model = create_model("resnet1d", "regression").eval()
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.reset_classifier(5, task="classification")
    assert not model.head.training  # the new head follows the model's mode
    assert model(torch.randn(3, 8, 1000)).shape == (3, 5)
    assert model.config["task"] == "classification" and model.config["n_outputs"] == 5
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone.items())


@pytest.mark.parametrize("name", ARCHS)
def test_every_architecture_overfits_a_tiny_batch(name):
    torch.manual_seed(0)
    model = create_model(name, "classification", length=250)
    x, y = torch.randn(8, 8, 250), torch.arange(8) % 5
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if loss.item() < losses[0] / 2:
            break
    assert losses[-1] < losses[0] / 2, losses


def test_zscore_and_minmax_are_per_record_per_lead():
    x = torch.randn(3, 8, 1000) * torch.rand(3, 8, 1) * 5 + torch.randn(3, 8, 1)
    z = Normalise("zscore")(x)
    torch.testing.assert_close(z.mean(-1), torch.zeros(3, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(-1), torch.ones(3, 8), atol=1e-4, rtol=0)
    m = Normalise("minmax")(x)
    torch.testing.assert_close(m.amin(-1), torch.zeros(3, 8))
    torch.testing.assert_close(m.amax(-1), torch.ones(3, 8))
    # per-record normalisation erases amplitude: a record and its double look the same
    torch.testing.assert_close(Normalise("zscore")(2 * x), z)


def test_global_normalisation_keeps_relative_amplitude_and_removes_baseline():
    torch.manual_seed(0)
    train = torch.randn(50, 8, 1000) * torch.linspace(0.5, 2.0, 8)[:, None]
    norm = Normalise("global")
    assert not norm.fitted
    norm.fit(train.numpy())
    assert norm.fitted
    torch.testing.assert_close(norm.scale, torch.linspace(0.5, 2.0, 8), rtol=0.05, atol=0)
    x = torch.randn(1, 8, 1000)
    small, big = norm(x + 3.0), norm(2 * x - 1.0)  # baseline offsets, amplitude doubled
    torch.testing.assert_close(big, 2 * small, atol=1e-4, rtol=1e-4)
    assert abs(small.median(-1).values).max() < 1e-4
    with pytest.raises(ValueError, match="one value per lead"):
        norm.set_scale(torch.ones(12))
    with pytest.raises(ValueError, match="unknown normalisation 'robust'"):
        create_model("cnn1d", norm="robust")
    assert NORMALISATIONS == ("zscore", "minmax", "global")
