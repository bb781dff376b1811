"""Stage 3's statistics and reference models: patient-level bootstrap intervals, paired differences, Holm, power.

Everything here works on arrays: `y_true` class indices (n,) (single-label) or multi-hot (n, 5) (multi-label) and
`y_score` (n, 5) probabilities of the classes in CLASSES order, or (S, n, 5) for S retrainings with other seeds (a
metric of such a score is the mean of its S values: what one retraining gets on average). `groups` (n,) are the
patients of the rows: every resample draws patients with replacement and takes all their records, so a patient's
several ECGs never look like independent evidence; without it each row is its own patient. The study adds two
reference rows a reader needs beside its models: the majority-class predictor and a classical model on per-lead
signal features.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
from scipy import stats

from data_prep.constants import CLASSES
from ecgmodels.forest import signal_features  # noqa: F401  (the study's and benches' feature rows)
from search.metrics import accuracy, macro_auc, per_class_auc

SPLITS = ("train", "val", "test")
REFERENCES = ("majority", "classical")  # reference rows: compared with the baseline, outside the Holm family
POWER = 0.8
Metric = Callable[[np.ndarray, np.ndarray], float]
METRICS: dict[str, Metric] = {"acc": accuracy, "auc": macro_auc}


def value(metric: Metric, y_true: np.ndarray, y_score: np.ndarray) -> float:
    """metric of a (n, 5) score, or the mean over seeds of a (S, n, 5) one."""
    if np.ndim(y_score) == 3:
        found = [metric(y_true, s) for s in y_score]
        return float(np.nanmean(found)) if np.isfinite(found).any() else float("nan")
    return metric(y_true, y_score)


def patient_resamples(groups: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """`n_boot` row-index arrays, each the records of as many patients as there are, drawn with replacement (the
    same draws for every model scored with the same groups and seed: paired comparisons)."""
    _, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.default_rng(seed)
    return [np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
            for _ in range(n_boot)]


def _groups(groups: np.ndarray | None, n: int) -> np.ndarray:
    return np.arange(n) if groups is None else np.asarray(groups)


def resampled(y_true: np.ndarray, y_score: np.ndarray, metric: Metric, resamples: list[np.ndarray]) -> np.ndarray:
    """The metric on each resample (NaN where it is undefined, e.g. a class without positives)."""
    seeds = np.ndim(y_score) == 3
    return np.array([value(metric, y_true[i], y_score[:, i] if seeds else y_score[i]) for i in resamples])


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.nanpercentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def bootstrap_ci(y_true: np.ndarray, y_score: np.ndarray, metric: Metric, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95, groups: np.ndarray | None = None) -> tuple[float, float, float]:
    """The metric on all rows and its percentile patient-bootstrap confidence interval: (value, low, high)."""
    values = resampled(y_true, y_score, metric, patient_resamples(_groups(groups, len(y_true)), n_boot, seed))
    return (value(metric, y_true, y_score), *interval(values, level))


def compare(diff: float, diffs: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """A paired difference from its bootstrap replicates: CI, two-sided p-value and the minimal detectable
    difference.

    p is twice the smaller fraction of replicates on either side of zero (the percentile test that agrees with the
    interval), floored at 1/(B+1): B resamples cannot show a smaller p. `mdd` is the smallest true difference this
    n detects with POWER (80%) at the two-sided 1 - level: (z_{1-a/2} + z_power) x the bootstrap SE.
    """
    diffs = diffs[np.isfinite(diffs)]
    lo, hi = interval(diffs, level)
    p = max(1 / (len(diffs) + 1), min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())))
    se = float(diffs.std(ddof=1)) if len(diffs) > 1 else float("nan")
    mdd = (stats.norm.ppf(0.5 + level / 2) + stats.norm.ppf(POWER)) * se
    return {"diff": float(diff), "low": lo, "high": hi, "p": float(p), "se": se, "mdd": float(mdd)}


def paired_bootstrap(y_true: np.ndarray, score: np.ndarray, reference: np.ndarray, metric: Metric = macro_auc,
                     n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                     groups: np.ndarray | None = None) -> dict[str, float]:
    """metric(score) - metric(reference) on the same resampled patients: diff, low, high, p, se, mdd (`compare`).
    Both models are scored on the same resamples, so the records' difficulty cancels out."""
    resamples = patient_resamples(_groups(groups, len(y_true)), n_boot, seed)
    diffs = resampled(y_true, score, metric, resamples) - resampled(y_true, reference, metric, resamples)
    return compare(value(metric, y_true, score) - value(metric, y_true, reference), diffs, level)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (NaN entries are left out of the family)."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    order = idx[np.argsort(p[idx])]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        out[i] = running
    return out


def majority_scores(train_labels: np.ndarray, n: int) -> np.ndarray:
    """The majority-class predictor: every record gets the training class frequencies (argmax = majority class),
    so each class's AUC is 0.5 and its accuracy is the share of the majority class."""
    train_labels = np.asarray(train_labels)
    prior = (train_labels.mean(0) if train_labels.ndim == 2
             else np.bincount(train_labels, minlength=len(CLASSES)) / len(train_labels))
    return np.tile(prior, (n, 1))


def classical_scores(features: dict[str, np.ndarray], train_labels: np.ndarray, seed: int = 0, n_jobs: int = 1,
                     n_estimators: int = 500) -> dict[str, np.ndarray]:
    """Fit a seeded random forest on the training features and return (n, 5) class probabilities for every split.

    `features` maps split name to its feature rows (`signal_features`) and must hold "train"; multi-hot labels fit
    one output per class. A class absent from training gets probability 0.
    """
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(n_estimators=n_estimators, min_samples_leaf=2, class_weight="balanced_subsample",
                                    random_state=seed, n_jobs=n_jobs).fit(features["train"], train_labels)
    out = {}
    for split, x in features.items():
        full = np.zeros((len(x), len(CLASSES)))
        proba = forest.predict_proba(x)
        if np.ndim(train_labels) == 2:  # one (n, 2) array per class; column of label 1 where it was seen
            for c, (p, seen) in enumerate(zip(proba, forest.classes_)):
                full[:, c] = p[:, list(seen).index(1)] if 1 in seen else 0.0
        else:
            full[:, forest.classes_] = proba
        out[split] = full
    return out


def model_scores(model: "torch.nn.Module", signals: np.ndarray, rows: np.ndarray, multi_label: bool = False,
                 batch: int = 256) -> np.ndarray:
    """(n, 5) probabilities of a classifier on `signals[rows]` (raw mV; the model normalises): softmax, or sigmoid
    per class for a multi-label model. Runs in eval mode, without augmentation, in order of `rows`."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch):
            logits = model(torch.as_tensor(np.asarray(signals[rows[i:i + batch]]), dtype=torch.float32))
            out.append((logits.sigmoid() if multi_label else logits.softmax(1)).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)))


def class_counts(y_true: np.ndarray) -> dict[str, int]:
    """Records per class (positives per class for multi-hot labels)."""
    y = np.asarray(y_true)
    counts = y.sum(0) if y.ndim == 2 else np.bincount(y, minlength=len(CLASSES))
    return {c: int(n) for c, n in zip(CLASSES, counts)}


def score_table(scores: dict[tuple[str, str], dict[str, tuple[np.ndarray, np.ndarray]]], baseline: tuple[str, str],
                n_boot: int = 1000, seed: int = 0, groups: dict[str, np.ndarray] | None = None,
                primary: str = "test") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's results: one row per (approach, source) with accuracy and macro AUC per split and patient-level
    95% CIs, the seed spread, and on the `primary` split the per-class AUC and the paired AUC difference against
    `baseline` with its p-value, Holm-adjusted p (over the non-reference comparisons) and minimal detectable
    difference.

    `scores[(approach, source)][split] = (y_true, y_score)`; every model must be scored on the same `primary`
    records. `groups[split]` are the patients of a split's rows. Returns (results, per_class): results has columns
    approach, source, {split}_n, {split}_{acc,auc}[_low,_high], seeds, seed_auc_{sd,min,max}, auc_diff[_low,_high],
    auc_diff_p, auc_diff_p_holm, auc_diff_mdd; per_class one row per model with a column per class and `n_<class>`.
    """
    groups = groups or {}
    truth = scores[baseline][primary][0]
    splits = [s for s in dict.fromkeys(sp for by in scores.values() for sp in by)]
    draws = {sp: patient_resamples(_groups(groups.get(sp), len(scores[baseline][sp][0])), n_boot, seed)
             for sp in splits if sp in scores[baseline]}
    auc_draws, rows, per_class = {}, [], []
    for key, by_split in scores.items():
        if not np.array_equal(by_split[primary][0], truth):
            raise ValueError(f"{key[0]}/{key[1]} was scored on other {primary} records than {baseline}")
        row = {"approach": key[0], "source": key[1]}
        for split, (y, s) in by_split.items():
            row[f"{split}_n"] = len(y)
            for name, fn in METRICS.items():
                values = resampled(y, s, fn, draws[split])
                row[f"{split}_{name}"] = value(fn, y, s)
                row[f"{split}_{name}_low"], row[f"{split}_{name}_high"] = interval(values)
                if split == primary and name == "auc":
                    auc_draws[key] = values
        s = by_split[primary][1]
        seeds = [macro_auc(truth, x) for x in s] if np.ndim(s) == 3 else [row[f"{primary}_auc"]]
        row.update(seeds=len(seeds), seed_auc_sd=float(np.std(seeds, ddof=1)) if len(seeds) > 1 else np.nan,
                   seed_auc_min=min(seeds), seed_auc_max=max(seeds))
        rows.append(row)
        aucs = np.nanmean([per_class_auc(truth, x) for x in (s if np.ndim(s) == 3 else [s])], axis=0)
        per_class.append({"approach": key[0], "source": key[1], **dict(zip(CLASSES, aucs)),
                          **{f"n_{c}": n for c, n in class_counts(truth).items()}})
    base = next(r for r in rows if (r["approach"], r["source"]) == baseline)[f"{primary}_auc"]
    for key, row in zip(scores, rows):
        if key != baseline:
            d = compare(row[f"{primary}_auc"] - base, auc_draws[key] - auc_draws[baseline])
            row.update({"auc_diff": d["diff"], "auc_diff_low": d["low"], "auc_diff_high": d["high"],
                        "auc_diff_p": d["p"], "auc_diff_mdd": d["mdd"]})
    results = pd.DataFrame(rows)
    if "auc_diff" in results:
        family = results["auc_diff"].notna() & ~results["approach"].isin(REFERENCES)
        results["auc_diff_p_holm"] = np.nan
        results.loc[family, "auc_diff_p_holm"] = holm(results.loc[family, "auc_diff_p"].to_numpy())
    return results, pd.DataFrame(per_class)
