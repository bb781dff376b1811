"""Stage 3 of the study: scores with bootstrap confidence intervals, paired comparisons, reference models, tables.

Everything here works on arrays: `y_true` class indices (n,) (single-label) or multi-hot (n, 5) (multi-label) and
`y_score` (n, 5) probabilities of the classes in CLASSES order. The study gets the scores of its fine-tuned models on each split and adds two reference rows a reader
needs beside them: the majority-class predictor and a classical model on per-lead signal features.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from scipy import signal as sps
from scipy import stats

from data_prep.constants import CLASSES
from search.metrics import accuracy, macro_auc, per_class_auc

SPLITS = ("train", "val", "test")
Metric = Callable[[np.ndarray, np.ndarray], float]
METRICS: dict[str, Metric] = {"acc": accuracy, "auc": macro_auc}


def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) row indices drawn with replacement, the same for every model scored with the same seed."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ci(y_true: np.ndarray, y_score: np.ndarray, metric: Metric, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """The metric on all rows and its percentile bootstrap confidence interval: (value, low, high).

    Resamples where the metric is undefined (NaN, e.g. no positives of any class) are left out.
    """
    values = np.array([metric(y_true[i], y_score[i]) for i in _resamples(len(y_true), n_boot, seed)])
    lo, hi = np.nanpercentile(values, [50 * (1 - level), 50 * (1 + level)])
    return metric(y_true, y_score), float(lo), float(hi)


def paired_bootstrap(y_true: np.ndarray, score: np.ndarray, reference: np.ndarray, metric: Metric = macro_auc,
                     n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """metric(score) - metric(reference) on the same records, its bootstrap CI and a two-sided p-value.

    Both models are scored on the same resampled rows each time, so the records' difficulty cancels out. The p-value
    is twice the smaller fraction of resampled differences on either side of zero (the percentile test that agrees
    with the interval: p < 1 - level exactly when the interval excludes zero).
    """
    diffs = np.array([metric(y_true[i], score[i]) - metric(y_true[i], reference[i])
                      for i in _resamples(len(y_true), n_boot, seed)])
    diffs = diffs[np.isfinite(diffs)]
    lo, hi = np.percentile(diffs, [50 * (1 - level), 50 * (1 + level)])
    p = min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean()))
    return {"diff": metric(y_true, score) - metric(y_true, reference), "low": float(lo), "high": float(hi),
            "p": float(p)}


def majority_scores(train_labels: np.ndarray, n: int) -> np.ndarray:
    """The majority-class predictor: every record gets the training class frequencies (argmax = majority class),
    so each class's AUC is 0.5 and its accuracy is the share of the majority class."""
    train_labels = np.asarray(train_labels)
    prior = (train_labels.mean(0) if train_labels.ndim == 2
             else np.bincount(train_labels, minlength=len(CLASSES)) / len(train_labels))
    return np.tile(prior, (n, 1))


def signal_features(signals: np.ndarray, rate: int) -> np.ndarray:
    """Hand-made features of (N, leads, L) ECGs in mV, one row per record.

    Per lead: amplitude statistics of the baseline-removed signal (SD, min, max, 5th/95th percentiles, skewness,
    kurtosis), R peaks found on the absolute signal (median peak amplitude, heart rate, RR spread, median width at
    half prominence in ms as a QRS width proxy, median slope) and relative spectral power in 0.5-5, 5-15, 15-40 Hz.
    """
    bands = ((0.5, 5), (5, 15), (15, 40))
    rows = []
    for record in signals:
        x = np.asarray(record, dtype=np.float64)
        x = x - np.median(x, axis=1, keepdims=True)
        feats = [x.std(1), x.min(1), x.max(1), *np.percentile(x, [5, 95], axis=1), stats.skew(x, axis=1),
                 stats.kurtosis(x, axis=1), np.abs(np.diff(x, axis=1)).max(1) * rate]
        freqs, power = sps.welch(x, fs=rate, nperseg=min(x.shape[1], 2 * rate), axis=1)
        total = power.sum(1) + 1e-12
        feats += [power[:, (freqs >= lo) & (freqs < hi)].sum(1) / total for lo, hi in bands]
        feats += list(np.array([_peak_features(lead, rate) for lead in x]).T)
        rows.append(np.concatenate([np.atleast_1d(f) for f in feats]))
    return np.nan_to_num(np.array(rows, dtype=np.float32))


def _peak_features(lead: np.ndarray, rate: int) -> tuple[float, float, float, float]:
    """Median R amplitude, heart rate (bpm), RR SD (ms) and median peak width (ms) of one baseline-removed lead."""
    a = np.abs(lead)
    peaks, props = sps.find_peaks(a, distance=int(0.3 * rate), prominence=0.5 * np.percentile(a, 99))
    if len(peaks) < 2:
        return np.nan, np.nan, np.nan, np.nan
    rr = np.diff(peaks) / rate
    widths = sps.peak_widths(a, peaks, rel_height=0.5, prominence_data=(props["prominences"], props["left_bases"],
                                                                       props["right_bases"]))[0]
    return float(np.median(lead[peaks])), 60 / float(np.median(rr)), float(rr.std() * 1000), \
        float(np.median(widths) / rate * 1000)


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


def score_table(scores: dict[tuple[str, str], dict[str, tuple[np.ndarray, np.ndarray]]], baseline: tuple[str, str],
                n_boot: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's results: one row per (approach, source) with accuracy and macro AUC per split and 95% CIs, the
    test per-class AUC and the paired test-AUC difference against `baseline` (an (approach, source) key of `scores`).

    `scores[(approach, source)][split] = (y_true, y_score)`; every model must be scored on the same test records.
    Returns (results, per_class): results has columns approach, source, {split}_{acc,auc}[_low,_high],
    auc_diff[_low,_high], auc_diff_p; per_class has one row per model and a column per class (test split).
    """
    truth = scores[baseline]["test"][0]
    rows, per_class = [], []
    for (approach, source), by_split in scores.items():
        if not np.array_equal(by_split["test"][0], truth):
            raise ValueError(f"{approach}/{source} was scored on other test records than {baseline}")
        row = {"approach": approach, "source": source}
        for split in SPLITS:
            if split not in by_split:
                continue
            y, s = by_split[split]
            row[f"{split}_n"] = len(y)
            for name, fn in METRICS.items():
                row[f"{split}_{name}"], row[f"{split}_{name}_low"], row[f"{split}_{name}_high"] = \
                    bootstrap_ci(y, s, fn, n_boot, seed)
        if (approach, source) != baseline:
            d = paired_bootstrap(truth, by_split["test"][1], scores[baseline]["test"][1], macro_auc, n_boot, seed)
            row.update({"auc_diff": d["diff"], "auc_diff_low": d["low"], "auc_diff_high": d["high"],
                        "auc_diff_p": d["p"]})
        rows.append(row)
        per_class.append({"approach": approach, "source": source,
                          **dict(zip(CLASSES, per_class_auc(truth, by_split["test"][1])))})
    return pd.DataFrame(rows), pd.DataFrame(per_class)


def _ci(row: pd.Series, col: str) -> str:
    if col not in row or pd.isna(row[col]):
        return "-"
    return f"{row[col]:.3f} [{row[col + '_low']:.3f}, {row[col + '_high']:.3f}]"


def markdown_tables(results: pd.DataFrame, per_class: pd.DataFrame) -> str:
    """Table 3 (accuracy) and Table 4 (macro AUC) per approach and source with 95% CIs, the paired comparison
    against the baseline and the test per-class AUC, as Markdown."""
    def table(title: str, header: list[str], body: list[list[str]]) -> list[str]:
        return [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                *("| " + " | ".join(r) + " |" for r in body), ""]

    key = [[r.approach, r.source] for r in results.itertuples()]
    n = {s: int(results[f"{s}_n"].max()) for s in SPLITS if f"{s}_n" in results}
    out = []
    for number, metric, title in ((3, "acc", "accuracy"), (4, "auc", "macro AUC (one-vs-rest)")):
        out += table(f"Table {number}: {title}, 95% bootstrap CI",
                     ["approach", "source", *(f"{s} (n={n[s]})" for s in n)],
                     [k + [_ci(r, f"{s}_{metric}") for s in n] for k, (_, r) in zip(key, results.iterrows())])
    diffs = results.dropna(subset=["auc_diff"]) if "auc_diff" in results else results.iloc[:0]
    out += table("Test macro AUC minus the baseline's, paired bootstrap on the same test records",
                 ["approach", "source", "difference [95% CI]", "p"],
                 [[r["approach"], r["source"], _ci(r, "auc_diff"), f"{r['auc_diff_p']:.3f}"]
                  for _, r in diffs.iterrows()])
    out += table("Test AUC per class", ["approach", "source", *CLASSES],
                 [[r["approach"], r["source"], *("-" if pd.isna(r[c]) else f"{r[c]:.3f}" for c in CLASSES)]
                  for _, r in per_class.iterrows()])
    return "\n".join(out)


def plot_auc(results: pd.DataFrame, path: Path) -> Path:
    """Test macro AUC with its 95% CI per approach and source (a horizontal error-bar chart), saved as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{a} / {s}" for a, s in zip(results["approach"], results["source"])]
    y = np.arange(len(results))[::-1]
    err = [results["test_auc"] - results["test_auc_low"], results["test_auc_high"] - results["test_auc"]]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(results) + 1.2))
    ax.errorbar(results["test_auc"], y, xerr=err, fmt="o", capsize=3)
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_yticks(y, labels)
    ax.set_xlabel(f"test macro AUC, 95% bootstrap CI (n={int(results['test_n'].max())})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: pd.DataFrame, per_class: pd.DataFrame, out: Path) -> list[Path]:
    """Write results.csv, per_class_auc.csv, tables.md and test_auc.png into `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / "results.csv", index=False)
    per_class.to_csv(out / "per_class_auc.csv", index=False)
    (out / "tables.md").write_text(markdown_tables(results, per_class))
    return [out / "results.csv", out / "per_class_auc.csv", out / "tables.md", plot_auc(results, out / "test_auc.png")]
