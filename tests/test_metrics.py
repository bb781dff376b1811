"""search.metrics against scikit-learn on known arrays."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, roc_auc_score

from search.metrics import (accuracy, auc_classes, binary_auc, brier, ece, ece_if_calibrated, f1_per_class, macro_auc,
                            mae, nll, per_class_auc)


@pytest.fixture
def scored() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    s = rng.random((300, 5)) + 0.8 * np.eye(5)[y]  # informative but imperfect
    s[:, 1] = np.round(s[:, 1], 1)  # many ties in one class
    return y, s / s.sum(1, keepdims=True)


def test_auc_accuracy_f1_equal_sklearn(scored: tuple[np.ndarray, np.ndarray]) -> None:
    y, s = scored
    assert macro_auc(y, s) == pytest.approx(roc_auc_score(y, s, multi_class="ovr", average="macro"), abs=1e-12)
    assert per_class_auc(y, s)[1] == pytest.approx(roc_auc_score(y == 1, s[:, 1]), abs=1e-12)
    assert accuracy(y, s) == pytest.approx(accuracy_score(y, s.argmax(1)))
    np.testing.assert_allclose(f1_per_class(y, s), f1_score(y, s.argmax(1), average=None, labels=range(5)))


def test_macro_auc_skips_a_class_absent_from_the_split(scored: tuple[np.ndarray, np.ndarray]) -> None:
    y, s = scored
    keep = y != 4  # a small val split without HYP
    expected = np.mean([roc_auc_score(y[keep] == c, s[keep, c]) for c in range(4)])
    assert np.isnan(per_class_auc(y[keep], s[keep])[4])
    assert macro_auc(y[keep], s[keep]) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(binary_auc(np.zeros(5, bool), np.arange(5.0)))


def test_multi_hot_labels(scored: tuple[np.ndarray, np.ndarray]) -> None:
    y, s = scored
    multi = np.eye(5, dtype=int)[y]
    multi[::7, 2] = 1  # some rows carry a second class
    assert macro_auc(multi, s) == pytest.approx(roc_auc_score(multi, s, average="macro"), abs=1e-12)
    np.testing.assert_allclose(f1_per_class(multi, s), f1_score(multi, s >= 0.5, average=None, zero_division=0))
    assert accuracy(multi, s) == pytest.approx(accuracy_score(multi, s >= 0.5))


def test_mae_in_units() -> None:
    y, p = np.array([60.0, 80.0, 100.0]), np.array([62.0, 77.0, 100.0])
    assert mae(y, p) == pytest.approx(mean_absolute_error(y, p)) == pytest.approx(5 / 3)


def test_auc_classes_counts_the_classes_macro_auc_covers(scored: tuple[np.ndarray, np.ndarray]) -> None:
    y, _ = scored
    assert auc_classes(y, 5) == 5
    assert auc_classes(y[y != 4], 5) == 4
    assert auc_classes(np.zeros(10, int), 5) == 0  # NORM only: no class has both positives and negatives


def test_nll_and_brier_equal_their_definitions(scored: tuple[np.ndarray, np.ndarray]) -> None:
    y, s = scored
    truth = np.eye(5)[y]
    assert nll(y, s) == pytest.approx(-np.log(s[np.arange(len(y)), y]).mean())
    assert brier(y, s) == pytest.approx(((s - truth) ** 2).sum(1).mean())
    assert nll(y[:3], s[:3]) == pytest.approx(-np.log(s[np.arange(3), y[:3]]).mean())  # classes absent: still 5
    multi = truth.astype(int)
    multi[::7, 2] = 1
    s = np.clip(s, 0.01, 0.99)  # the rounded class has zeros, whose log sklearn clips
    assert nll(multi, s) == pytest.approx(-(multi * np.log(s) + (1 - multi) * np.log(1 - s)).mean())
    assert brier(multi, s) == pytest.approx(((s - multi) ** 2).sum(1).mean())


def test_ece_is_zero_for_calibrated_confidence_and_the_gap_for_overconfidence() -> None:
    rng = np.random.default_rng(1)
    n = 200_000
    conf = rng.uniform(0.2, 1.0, n)  # top probability; the rest spread over the other 4 classes
    s = np.column_stack([conf, *([(1 - conf) / 4] * 4)])
    correct = rng.random(n) < conf  # right exactly as often as it claims
    y = np.where(correct, 0, 1 + rng.integers(0, 4, n))
    assert ece(y, s) < 0.005
    assert ece(np.where(rng.random(n) < conf - 0.1, 0, 1), s) == pytest.approx(0.1, abs=0.005)  # 10 points overconfident
    one = np.array([[0.95, 0.05, 0, 0, 0], [0.6, 0.4, 0, 0, 0]])
    assert ece(np.array([0, 1]), one, bins=15) == pytest.approx((abs(1 - 0.95) + abs(0 - 0.6)) / 2)


def test_a_calibrated_model_s_ece_on_400_rows_is_far_from_zero_and_inside_its_consistency_range() -> None:
    rng = np.random.default_rng(2)
    n = 400
    s = rng.dirichlet(np.full(5, 0.7), n)  # varied confidence, as a 5-class model's
    truth = lambda: (rng.random((n, 1)) > s.cumsum(1)).sum(1).clip(max=4)  # noqa: E731 (labels drawn from s)
    null = ece_if_calibrated(s, draws=300, seed=3)
    assert 0.03 < np.median(null) < 0.09  # binned ECE of a perfectly calibrated model, biased upwards at this n
    low, high = np.quantile(null, [0.05, 0.95])
    inside = [low <= ece(truth(), s) <= high for _ in range(40)]
    assert 0.75 <= np.mean(inside) <= 1.0  # labels drawn from s: inside the 90% range about 90% of the time
    sharp = s ** 2 / (s ** 2).sum(1, keepdims=True)  # the same ranking, overconfident
    worst = ece(truth(), sharp)
    assert worst > np.quantile(ece_if_calibrated(sharp, draws=300, seed=3), 0.95)
