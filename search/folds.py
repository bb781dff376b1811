"""Cross-validation inside a trial (config key `cv`): the folds, and the fold ensemble a cv trial keeps.

A cv trial's checkpoint is the ensemble of its K fold models at the best epoch, not one model refitted on all rows
at that epoch count: every improving epoch then leaves a complete, servable checkpoint (ASHA may stop a trial at any
epoch, and a refit would need one more training run after the last report), each member's temperature is fitted
on rows it never trained on (a refit model has no held-out rows to calibrate on), and averaging K models' calibrated
probabilities is itself a variance reduction that a single refit lacks. The cost is K forward passes per prediction.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from data_prep.constants import CLASSES
from data_prep.errors import InputError

REGRESSION_BINS = 5  # quantile bins that stratify a regression target


def strata(labels: pd.DataFrame, rows: np.ndarray, task: str, target: str | None) -> np.ndarray:
    """What the folds are stratified by: the class (single-label), the rarest class a record has (multi-label rows;
    -1 for none), or the quantile bin of the target (regression)."""
    part = labels.iloc[rows]
    if task == "regression":
        values = part[target].to_numpy(np.float64)
        return np.searchsorted(np.quantile(values, np.linspace(0, 1, REGRESSION_BINS + 1)[1:-1]), values)
    hot = part[list(CLASSES)].to_numpy(bool)
    rarity = np.argsort(np.argsort(hot.sum(0)))  # 0 = the rarest class among these rows
    ranked = np.where(hot, rarity, len(CLASSES))
    return np.where(hot.any(1), ranked.argmin(1), -1)


def cv_folds(labels: pd.DataFrame, rows: np.ndarray, config: dict, k: int) -> list[dict[str, list[int]]]:
    """K {"train", "val"} row lists over `rows`: patient-grouped (no patient in two folds) and stratified
    (sklearn StratifiedGroupKFold, shuffled with the config's `seed`, so every trial of a search gets the same
    folds)."""
    if k < 2:
        raise InputError(f"cv {k}: the number of folds must be 1 (no cross-validation) or at least 2")
    groups = labels["patient_id"].to_numpy()[rows]
    if len(np.unique(groups)) < k:
        raise InputError(f"cv {k}: only {len(np.unique(groups))} patients among the {len(rows)} rows to fold")
    y = strata(labels, rows, config["task"], config["target"])
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=int(config["seed"]))
    return [{"train": rows[tr].tolist(), "val": rows[va].tolist()} for tr, va in splitter.split(rows, y, groups)]


def write_ensemble(path: Path, members: list[Path], extra: dict, multi_label: bool) -> None:
    """The fold models' checkpoints (each at its own temperature) as one equally weighted ecgmodels Ensemble
    checkpoint at `path`, which averages their calibrated probabilities."""
    from ecgmodels import load_checkpoint, save_checkpoint
    from ecgmodels.ensemble import Ensemble

    models = [load_checkpoint(m) for m in members]
    save_checkpoint(Ensemble(models, [1.0] * len(models), multi_label), path, extra=extra)
