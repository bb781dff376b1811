"""Each augmentation changes what it should, keeps shape and dtype; p = 0 is the identity."""
from __future__ import annotations

import pytest
import torch

from data_prep.errors import InputError
from search.augment import AUGMENTATIONS, Augmenter

RATE, B, C, L = 100, 16, 8, 1000


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(B, C, L, generator=torch.Generator().manual_seed(0)) + 3.0  # no exact zeros


def augment(x: torch.Tensor, name: str, strength: float, p: float = 1.0, seed: int = 0) -> torch.Tensor:
    out = Augmenter({f"aug.{name}.p": p, f"aug.{name}.strength": strength}, RATE, seed)(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    return out


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_p_zero_is_identity_and_p_one_changes_every_row(x: torch.Tensor, name: str) -> None:
    assert augment(x, name, 0.3, p=0.0) is x
    changed = (augment(x, name, 0.3) != x).flatten(1).any(1)
    assert changed.all()
    assert torch.equal(augment(x, name, 0.3, seed=5), augment(x, name, 0.3, seed=5))  # seeded


def test_probability_picks_rows(x: torch.Tensor) -> None:
    changed = (augment(x, "noise", 0.1, p=0.5) != x).flatten(1).any(1)
    assert 0 < changed.sum() < B


def test_noise_sd_is_the_strength(x: torch.Tensor) -> None:
    assert (augment(x, "noise", 0.2) - x).std().item() == pytest.approx(0.2, rel=0.02)


def test_wander_is_slow_and_bounded(x: torch.Tensor) -> None:
    d = augment(x, "wander", 0.5) - x
    assert d.abs().max() <= 0.5 + 1e-5 and d.abs().max() > 0.05
    assert d.diff(dim=-1).abs().max() < 2 * torch.pi * 0.5 * 0.5 / RATE + 1e-4  # at most 0.5 Hz


def test_scale_multiplies_each_lead_within_range(x: torch.Tensor) -> None:
    ratio = augment(x, "scale", 0.2) / x
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), atol=1e-5)
    assert ratio.min() >= 0.8 - 1e-6 and ratio.max() <= 1.2 + 1e-6


def test_shift_rolls_each_row_by_at_most_the_fraction(x: torch.Tensor) -> None:
    out = augment(x, "shift", 0.1)
    for row, orig in zip(out, x):
        lags = [k for k in range(-100, 101) if torch.equal(torch.roll(orig, k, -1), row)]
        assert len(lags) == 1


def test_lead_dropout_zeroes_whole_leads(x: torch.Tensor) -> None:
    out = augment(x, "lead_dropout", 0.25)
    zero = (out == 0).all(-1)
    assert (zero.sum(1) == 2).all()
    assert torch.equal(out[~zero], x[~zero])


def test_time_mask_zeroes_one_window_in_every_lead(x: torch.Tensor) -> None:
    out = augment(x, "time_mask", 0.1)
    masked = out == 0
    assert (masked == masked[:, :1]).all()  # the same window in every lead
    assert (masked[:, 0].sum(-1) == 100).all()
    starts = masked[:, 0].int().diff(dim=-1).eq(1).sum(-1) + masked[:, 0, 0].int()
    assert (starts == 1).all()  # one contiguous window
    assert torch.equal(out[~masked], x[~masked])


def test_unknown_augmentation_is_input_error() -> None:
    with pytest.raises(InputError, match="flip"):
        Augmenter({"aug.flip.p": 0.5}, RATE, 0)
