"""Splits: patient-disjoint, superclass-stratified A/B halves, then train/val/test inside each half."""
from __future__ import annotations

import numpy as np
import pandas as pd

from data_prep.constants import CLASSES

SPLIT_METHODS = ("strat_fold", "random")
FOLD_SPLITS = {**{f: "train" for f in range(1, 9)}, 9: "val", 10: "test"}  # PTB-XL's recommended folds
RANDOM_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


def assign_halves(meta: pd.DataFrame, seed: int) -> pd.Series:
    """'A' or 'B' per row: every patient in one half; patients grouped by the set of superclasses of their records,
    shuffled with `seed` inside each group and dealt alternately, so each half gets about half of every group."""
    rng = np.random.default_rng(seed)
    strata = (meta.groupby("patient_id")[list(CLASSES)].max()
              .apply(lambda r: "+".join(c for c in CLASSES if r[c]) or "none", axis=1))
    half = {}
    for _, patients in sorted(strata.groupby(strata)):
        order = rng.permutation(patients.index.to_numpy())
        first = rng.integers(2)  # which half gets the odd patient out
        for i, p in enumerate(order):
            half[p] = "AB"[(i + first) % 2]
    return meta["patient_id"].map(half)


def random_split(groups: pd.Series, seed: int, fractions: dict[str, float] = RANDOM_FRACTIONS) -> pd.Series:
    """Split rows by group (a row's patient) into `fractions` of rows, seeded; a group never spans two splits."""
    rng = np.random.default_rng(seed)
    sizes = groups.value_counts()
    order = sizes.index.to_numpy()[rng.permutation(len(sizes))]
    position = sizes[order].cumsum().to_numpy() / len(groups)  # share of rows up to and including each group
    bounds = np.cumsum(list(fractions.values()))
    names = np.array(list(fractions))[np.minimum(np.searchsorted(bounds, position - 1e-9), len(bounds) - 1)]
    return groups.map(dict(zip(order, names)))


def assign_splits(meta: pd.DataFrame, method: str, seed: int) -> pd.DataFrame:
    """`meta` (patient_id, strat_fold, NORM..HYP) with columns `half` (A/B) and `split` (train/val/test) added."""
    if method not in SPLIT_METHODS:
        raise ValueError(f"split method must be one of {SPLIT_METHODS}, got {method!r}")
    meta = meta.assign(half=assign_halves(meta, seed))
    if method == "strat_fold":
        meta["split"] = meta["strat_fold"].map(FOLD_SPLITS)
    else:
        meta["split"] = pd.concat([random_split(g["patient_id"], seed) for _, g in meta.groupby("half")])
    return meta


def split_counts(labels: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Rows per half and split, for the manifest."""
    return {h or "-": g["split"].value_counts().to_dict() for h, g in labels.groupby("half")}
