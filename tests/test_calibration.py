"""Calibration travels with the model: a fitted temperature divides the logits and is saved in the checkpoint (old
checkpoints load at 1), and the head's bias starts at the training rows' class prior."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ecgmodels import (create_model, fit_temperature, fused_transfer, init_prior_bias, load_checkpoint,
                       save_checkpoint, set_temperature)
from ecgmodels.calibration import prior


def test_fit_temperature_recovers_the_temperature_that_sharpened_the_logits():
    torch.manual_seed(0)
    z = 2 * torch.randn(4000, 5)
    y = torch.distributions.Categorical(logits=z).sample()  # labels drawn from softmax(z): calibrated at T = 1
    for t in (0.4, 2.5):
        assert fit_temperature(z * t, y) == pytest.approx(t, rel=0.08)  # logits t times too sharp
    multi = torch.bernoulli(torch.sigmoid(z))
    assert fit_temperature(3 * z, multi, multi_label=True) == pytest.approx(3, rel=0.08)


def test_prior_bias_makes_the_untrained_model_predict_the_class_prior():
    y = np.array([0] * 70 + [1] * 15 + [2] * 10 + [3] * 5)  # class 4 absent: a pseudo-count keeps it finite
    x = torch.randn(64, 8, 1000)
    for name in ("cnn1d", "resnet1d"):
        torch.manual_seed(0)
        model = create_model(name)
        init_prior_bias(model, y)
        with torch.no_grad():
            mean = torch.softmax(model.eval()(x), 1).mean(0).numpy()
        np.testing.assert_allclose(mean, prior(y, 5), atol=0.03)
        assert mean[0] > 0.6 and 0 < mean[4] < 0.03

    multi = (np.random.default_rng(0).random((200, 5)) < [0.7, 0.3, 0.2, 0.1, 0.05]).astype(np.float32)
    model = create_model("cnn1d")
    init_prior_bias(model, multi, multi_label=True)
    with torch.no_grad():
        mean = torch.sigmoid(model.eval()(x)).mean(0).numpy()
    np.testing.assert_allclose(mean, multi.mean(0), atol=0.04)

    regressor = create_model("cnn1d", "regression")
    regressor.head[-1].bias.data.fill_(3.0)
    init_prior_bias(regressor, np.zeros(10))
    assert torch.equal(regressor.head[-1].bias, torch.zeros(1))


def test_temperature_divides_the_logits_and_survives_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("cnn1d", width=8).eval()
    x = torch.randn(3, 8, 1000)
    with torch.no_grad():
        plain = model(x)
        set_temperature(model, 2.5)
        assert torch.allclose(model(x), plain / 2.5)
    save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt").eval()
    assert loaded.temperature.item() == 2.5
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="positive"):
        set_temperature(model, 0.0)
    model.reset_classifier(5)  # a new head is not calibrated
    assert model.temperature.item() == 1.0


@pytest.mark.parametrize("fused", [False, True])
def test_a_checkpoint_from_before_the_temperature_loads_at_temperature_one(tmp_path, fused):
    torch.manual_seed(0)
    model = create_model("cnn1d", "regression", width=8)
    if fused:
        model = fused_transfer({"hr": model, "qt": create_model("cnn1d", "regression", width=8)})
    model.eval()
    save_checkpoint(model, tmp_path / "old.pt")
    ckpt = torch.load(tmp_path / "old.pt", weights_only=True)
    del ckpt["state_dict"]["temperature"]  # what a checkpoint written before calibration holds
    torch.save(ckpt, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt").eval()
    x = torch.randn(2, 8, 1000)
    assert loaded.temperature.item() == 1.0
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
