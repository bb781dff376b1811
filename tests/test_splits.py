"""Halves and splits on the real sample's metadata: patient-disjoint, stratified, seeded."""
from __future__ import annotations

import pandas as pd
import pytest

from data_prep.constants import CLASSES
from data_prep.ptbxl import read_database
from data_prep.splits import assign_splits


@pytest.fixture(scope="module")
def meta(sample_dir) -> pd.DataFrame:
    root = sample_dir / "ptbxl"
    return read_database(root / "ptbxl_database.csv", root / "scp_statements.csv", 0.0)[0]


@pytest.mark.parametrize("method", ["strat_fold", "random"])
def test_patients_never_cross_halves_or_splits(meta, method):
    out = assign_splits(meta, method, seed=0)
    assert set(out["half"]) == {"A", "B"} and set(out["split"]) == {"train", "val", "test"}
    assert (out.groupby("patient_id")["half"].nunique() == 1).all()
    assert (out.groupby("patient_id")["split"].nunique() == 1).all()


def test_halves_are_stratified_by_superclass(meta):
    out = assign_splits(meta, "strat_fold", seed=0)
    for c in CLASSES:
        a, b = (out.loc[out["half"] == h, c].sum() for h in "AB")
        assert abs(a - b) <= max(3, 0.2 * (a + b)), (c, a, b)
    assert abs((out["half"] == "A").sum() - (out["half"] == "B").sum()) <= 0.1 * len(out)


def test_strat_fold_split_follows_the_folds(meta):
    out = assign_splits(meta, "strat_fold", seed=0)
    assert (out.loc[out["strat_fold"] <= 8, "split"] == "train").all()
    assert (out.loc[out["strat_fold"] == 9, "split"] == "val").all()
    assert (out.loc[out["strat_fold"] == 10, "split"] == "test").all()


def test_random_split_is_about_70_10_20_in_each_half(meta):
    out = assign_splits(meta, "random", seed=0)
    for _, half in out.groupby("half"):
        share = half["split"].value_counts(normalize=True)
        assert share["train"] == pytest.approx(0.7, abs=0.05)
        assert share["val"] == pytest.approx(0.1, abs=0.05)
        assert share["test"] == pytest.approx(0.2, abs=0.05)


@pytest.mark.parametrize("method", ["strat_fold", "random"])
def test_deterministic_per_seed_and_different_for_another(meta, method):
    first, again, other = (assign_splits(meta, method, seed=s) for s in (0, 0, 1))
    pd.testing.assert_frame_equal(first, again)
    assert (first["half"] != other["half"]).any()
    if method == "random":
        assert (first["split"] != other["split"]).any()
