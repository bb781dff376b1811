"""The prepared-dataset contract: write aside then rename, open by memory map, select, describe."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_prep.constants import CLASSES, TARGETS
from data_prep.dataset import DatasetWriter, cache_key, describe, is_current, open_dataset
from data_prep.errors import InputError


def _labels(n: int) -> pd.DataFrame:
    lab = pd.DataFrame({"record_id": range(n), "patient_id": range(n), "half": ["A", "B"] * (n // 2),
                        "split": ["train", "train", "val", "test"] * (n // 4)})
    lab[list(CLASSES)] = 0
    lab["NORM"] = 1
    lab["label"] = [0, -1] * (n // 2)
    for t in TARGETS:
        lab[t] = np.where(np.arange(n) % 4 == 0, np.nan, 100.0)
    return lab


def test_written_rows_round_trip_and_unwritten_rows_are_trimmed(tmp_path):
    rows = np.random.default_rng(0).normal(size=(8, 8, 1000)).astype(np.float32)
    with DatasetWriter(tmp_path / "ds", capacity=10, length=1000) as w:  # two records "skipped"
        w.write(rows[:5])
        w.write(rows[5:])
        w.finish(_labels(8), {"source": "test", "rate": 100, "normalisation": "zscore", "cache_key": "k1"})
    ds = open_dataset(tmp_path / "ds")
    assert isinstance(ds.signals, np.memmap) and not ds.signals.flags.writeable
    np.testing.assert_array_equal(ds.signals, rows)
    assert ds.manifest["count"] == 8 and ds.length == 1000 and len(ds.content_hash) == 16
    assert ds.select("train", "A").tolist() == [0, 4] and ds.select(single_label=True).tolist() == [0, 2, 4, 6]
    assert ds.select(target="qt").tolist() == [1, 2, 3, 5, 6, 7]
    assert is_current(tmp_path / "ds", "k1") and not is_current(tmp_path / "ds", "k2")
    assert "8 ECGs x 8 leads x 1000 samples at 100 Hz" in describe(tmp_path / "ds")
    assert list(tmp_path.iterdir()) == [tmp_path / "ds"]


def test_interrupted_writer_leaves_no_dataset(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with DatasetWriter(tmp_path / "ds", capacity=4, length=10) as w:
            w.write(np.zeros((2, 8, 10), dtype=np.float32))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="not a prepared dataset"):
        open_dataset(tmp_path / "ds")


def test_cache_key_changes_with_options_and_files(tmp_path):
    f = tmp_path / "in.csv"
    f.write_text("a\n1\n")
    key = cache_key({"rate": 100}, [f])
    assert cache_key({"rate": 100}, [f]) == key and cache_key({"rate": 500}, [f]) != key
    f.write_text("a\n1\n2\n")
    assert cache_key({"rate": 100}, [f]) != key
