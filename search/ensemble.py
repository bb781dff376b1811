"""Ensemble selection over a search's top trials: greedy forward selection with replacement (Caruana et al. 2004,
"Ensemble selection from libraries of models") on their validation predictions, and an honest single-vs-ensemble
choice.

A candidate is one trial's `val_predictions.npz` (`y_true`, `y_score` calibrated probabilities or values, `rows`).
The ensemble's prediction is the weighted mean of its members' (what `ecgmodels.Ensemble` computes); classification
is scored by macro AUC with the NLL breaking ties, regression by MAE.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from search import metrics

STEPS = 25  # greedy additions; the best prefix is kept, so more steps only cost time


@dataclass(frozen=True)
class Predictions:
    """One trial's validation predictions, rows in ascending order."""
    y_true: np.ndarray
    y_score: np.ndarray
    rows: np.ndarray

    @classmethod
    def load(cls, path: str | Path) -> "Predictions":
        npz = np.load(path)
        order = np.argsort(npz["rows"], kind="stable")
        return cls(npz["y_true"][order], npz["y_score"][order], npz["rows"][order])

    def take(self, idx: np.ndarray) -> "Predictions":
        return Predictions(self.y_true[idx], self.y_score[idx], self.rows[idx])


@dataclass(frozen=True)
class Selection:
    """Members (indices into the candidates, in the order first picked), their weights (summing to 1) and the
    ensemble's score on the rows it was selected on."""
    members: list[int]
    weights: list[float]
    score: tuple[float, ...]


def common_rows(candidates: list[Predictions]) -> list[Predictions]:
    """The candidates restricted to the rows all of them predicted (the same val split, or the same CV folds)."""
    rows = candidates[0].rows
    for c in candidates[1:]:
        rows = np.intersect1d(rows, c.rows)
    if len(rows) == 0:
        raise ValueError("the trials' validation predictions share no rows; they cannot be ensembled")
    return [c.take(np.searchsorted(c.rows, rows)) for c in candidates]


def score(y_true: np.ndarray, y_score: np.ndarray, task: str) -> tuple[float, ...]:
    """Bigger is better: (macro AUC, -NLL) for classification (AUC -inf where no class has both outcomes), (-MAE,)
    for regression."""
    if task == "regression":
        return (-metrics.mae(y_true, y_score),)
    auc = metrics.macro_auc(y_true, y_score)
    if y_true.ndim == 1:  # float32 probabilities sum to 1 only to 1e-7
        y_score = y_score / y_score.sum(1, keepdims=True)
    return (auc if np.isfinite(auc) else -np.inf, -metrics.nll(y_true, y_score))


def greedy(candidates: list[Predictions], task: str, steps: int = STEPS) -> Selection:
    """Caruana's forward selection with replacement: start empty, add the candidate (again, if it is already in)
    whose addition scores best, `steps` times; keep the best-scoring prefix (the earliest among equals)."""
    candidates = common_rows(candidates)
    y = candidates[0].y_true
    total, picks, best = np.zeros_like(candidates[0].y_score, dtype=np.float64), [], None
    for n in range(1, steps + 1):
        tries = [score(y, (total + c.y_score) / n, task) for c in candidates]
        pick = max(range(len(candidates)), key=lambda i: tries[i])
        total += candidates[pick].y_score
        picks.append(pick)
        if best is None or tries[pick] > best[0]:
            best = (tries[pick], list(picks))
    value, chosen = best
    members = list(dict.fromkeys(chosen))
    return Selection(members, [chosen.count(m) / len(chosen) for m in members], value)


def average(candidates: list[Predictions], selection: Selection) -> np.ndarray:
    """The selected ensemble's prediction on the candidates' common rows."""
    candidates = common_rows(candidates)
    return sum(w * candidates[m].y_score for m, w in zip(selection.members, selection.weights))


def halves(y_true: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of the row positions, each class (argmax of a multi-hot row; none for values) dealt alternately
    after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    strata = y_true.argmax(1) if y_true.ndim == 2 else y_true if y_true.dtype.kind in "iub" else np.zeros(len(y_true))
    first = np.zeros(len(y_true), dtype=bool)
    for s in np.unique(strata):
        idx = rng.permutation(np.flatnonzero(strata == s))
        first[idx[::2]] = True
    return np.flatnonzero(first), np.flatnonzero(~first)


@dataclass(frozen=True)
class Comparison:
    """Held-out scores (mean over the two halves) of the single best trial and of the greedy ensemble, each chosen
    on the other half of the validation rows."""
    single: tuple[float, ...]
    ensemble: tuple[float, ...]

    @property
    def ensemble_wins(self) -> bool:
        return self.ensemble > self.single


def compare(candidates: list[Predictions], task: str, seed: int = 0) -> Comparison:
    """Split-half cross-fitting: on each half of the common validation rows choose the single best candidate and
    the greedy ensemble, score both on the other half; average the two held-out scores. Scoring the ensemble on the
    rows that selected it would flatter it (it is fitted to them); this does not."""
    candidates = common_rows(candidates)
    found, (first, second) = {"single": [], "ensemble": []}, halves(candidates[0].y_true, seed)
    for fit, held in ((first, second), (second, first)):
        on_fit = [c.take(fit) for c in candidates]
        on_held = [c.take(held) for c in candidates]
        y = on_held[0].y_true
        best = max(range(len(candidates)), key=lambda i: score(on_fit[i].y_true, on_fit[i].y_score, task))
        found["single"].append(score(y, on_held[best].y_score, task))
        found["ensemble"].append(score(y, average(on_held, greedy(on_fit, task)), task))
    mean = {k: tuple(float(np.mean(col)) for col in zip(*v)) for k, v in found.items()}
    return Comparison(mean["single"], mean["ensemble"])
