"""search.metrics against scikit-learn on known arrays."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, roc_auc_score

from search.metrics import accuracy, binary_auc, f1_per_class, macro_auc, mae, per_class_auc


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
