"""Evaluation metrics as plain functions of numpy arrays, shared by the trainer and the study's evaluation.

Classification labels are class indices (n,) or multi-hot (n, k); scores are (n, k) probabilities. Multi-hot labels
make the calibration metrics (nll, brier, ece) score each class's probability as its own binary prediction.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import brier_score_loss, log_loss

from data_prep.constants import CLASSES

ECE_BINS = 15


def one_hot(y: np.ndarray, k: int) -> np.ndarray:
    """(n,) class indices -> (n, k) 0/1; (n, k) multi-hot passes through."""
    y = np.asarray(y)
    return y.astype(np.int64) if y.ndim == 2 else np.eye(k, dtype=np.int64)[y]


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN if one side is empty."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    ranks = np.empty(len(s))
    first = np.r_[0, np.flatnonzero(np.diff(s)) + 1]  # start of each run of equal scores
    last = np.r_[first[1:], len(s)]
    ranks[order] = np.repeat((first + last + 1) / 2, last - first)  # mid-rank, 1-based
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_class_auc(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC of each class; NaN for a class with no positives (or no negatives) in `y_true`."""
    truth = one_hot(y_true, y_score.shape[1])
    return np.array([binary_auc(truth[:, c], y_score[:, c]) for c in range(y_score.shape[1])])


def macro_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Macro one-vs-rest AUC, averaged over the classes that have both positives and negatives in `y_true`.

    A small validation split can lack a rare class (HYP); such a class has no AUC and is left out of the mean
    rather than failing the evaluation, so compare values only over splits that hold the same classes.
    NaN if no class qualifies.
    """
    aucs = per_class_auc(y_true, y_score)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def auc_classes(y_true: np.ndarray, k: int) -> int:
    """How many of the k classes `macro_auc` averages over: those with both positives and negatives in `y_true`."""
    positives = one_hot(y_true, k).sum(0)
    return int(((positives > 0) & (positives < len(y_true))).sum())


def predict(y_score: np.ndarray, multi_label: bool = False) -> np.ndarray:
    """Hard predictions: argmax (single-label) or 0/1 at probability 0.5 (multi-label)."""
    return (y_score >= 0.5).astype(np.int64) if multi_label else y_score.argmax(1)


def accuracy(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Fraction of rows predicted exactly (argmax for class indices, all k labels at 0.5 for multi-hot)."""
    multi = np.ndim(y_true) == 2
    hit = predict(y_score, multi) == y_true
    return float((hit.all(1) if multi else hit).mean())


def f1_per_class(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """F1 of each class one-vs-rest (0 where the class is neither present nor predicted)."""
    k = y_score.shape[1]
    multi = np.ndim(y_true) == 2
    truth, pred = one_hot(y_true, k).astype(bool), one_hot(predict(y_score, multi), k).astype(bool)
    tp = (truth & pred).sum(0)
    denom = truth.sum(0) + pred.sum(0)
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute error, in the units of the inputs."""
    return float(np.mean(np.abs(np.asarray(y_pred, dtype=np.float64) - np.asarray(y_true, dtype=np.float64))))


def nll(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Negative log-likelihood (log loss, natural log) per row; for multi-hot labels the mean binary log loss of the
    k classes."""
    k = y_score.shape[1]
    if np.ndim(y_true) == 2:
        return float(np.mean([log_loss(y_true[:, c], y_score[:, c], labels=[0, 1]) for c in range(k)]))
    return float(log_loss(y_true, _normalised(y_score), labels=list(range(k))))


def brier(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Multi-class Brier score: the mean over rows of the squared distance between the probabilities and the
    one-hot (or multi-hot) truth, summed over classes (0 = perfect, 2 = worst)."""
    k = y_score.shape[1]
    if np.ndim(y_true) == 2:
        return float(sum(brier_score_loss(y_true[:, c], y_score[:, c], labels=[0, 1]) for c in range(k)))
    return float(brier_score_loss(y_true, _normalised(y_score), labels=list(range(k)), scale_by_half=False))


def _normalised(y_score: np.ndarray) -> np.ndarray:
    """Rows rescaled to sum to 1 exactly (float32 softmax is off by ~1e-7, which sklearn warns about)."""
    return y_score / y_score.sum(1, keepdims=True)


def ece(y_true: np.ndarray, y_score: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: rows binned into `bins` equal-width bins of [0, 1] by their top probability (the
    confidence of their argmax prediction), the row-weighted mean of |accuracy - mean confidence| over the bins
    (Guo et al. 2017). Multi-hot labels: the mean over classes of that class's binary ECE (bins of its
    probability, |fraction positive - mean probability|)."""
    if np.ndim(y_true) == 2:
        return float(np.mean([_binned_gap(y_score[:, c], y_true[:, c], bins) for c in range(y_score.shape[1])]))
    return _binned_gap(y_score.max(1), y_score.argmax(1) == y_true, bins)


def ece_if_calibrated(y_score: np.ndarray, draws: int = 1000, seed: int = 0) -> np.ndarray:
    """The ECEs a perfectly calibrated model making these predictions would show: single-label classes drawn from
    each row's own probabilities, `draws` times (consistency resampling, Broecker & Smith 2007). On a few hundred
    rows binned ECE is biased upwards, so an observed ECE is judged against this spread, not against 0."""
    rng = np.random.default_rng(seed)
    p = _normalised(np.asarray(y_score, np.float64))
    cumulative = p.cumsum(1)
    found = np.empty(draws)
    for i in range(draws):
        drawn = (rng.random((len(p), 1)) > cumulative).sum(1).clip(max=p.shape[1] - 1)
        found[i] = ece(drawn, p)
    return found


def _binned_gap(confidence: np.ndarray, outcome: np.ndarray, bins: int = ECE_BINS) -> float:
    """sum over equal-width bins of (rows in bin / n) * |mean outcome - mean confidence| in that bin."""
    which = np.clip((np.asarray(confidence) * bins).astype(np.int64), 0, bins - 1)  # 1.0 falls in the last bin
    gap = np.bincount(which, np.asarray(outcome, np.float64) - confidence, minlength=bins)
    return float(np.abs(gap).sum() / len(confidence))


def classification(prefix: str, y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    """A split's logged classification metrics: `<prefix>_acc`, `<prefix>_auc`, and for "val" also the classes the
    AUC covers, per-class F1, NLL, Brier score and ECE (what a trial's checkpoint and the forest candidate hold)."""
    found = {f"{prefix}_acc": accuracy(y_true, y_score), f"{prefix}_auc": macro_auc(y_true, y_score)}
    if prefix == "val":
        found["val_auc_classes"] = auc_classes(y_true, len(CLASSES))
        found.update({f"val_f1_{c}": float(f) for c, f in zip(CLASSES, f1_per_class(y_true, y_score))})
        found.update(val_nll=nll(y_true, y_score), val_brier=brier(y_true, y_score), val_ece=ece(y_true, y_score))
    return found
