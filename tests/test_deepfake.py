"""DeepFake: seeded generation with the bundled GAN, and the published .asc files with MUSE ground truth."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_prep.constants import CLASSES
from data_prep.dataset import open_dataset
from data_prep.deepfake import prepare_deepfake, read_asc
from data_prep.errors import InputError


def test_same_seed_same_ecgs_other_seed_other_ecgs(tmp_path):
    a = open_dataset(prepare_deepfake(tmp_path / "a", count=4, seed=3, workers=1))
    b = open_dataset(prepare_deepfake(tmp_path / "b", count=4, seed=3, workers=2))
    c = open_dataset(prepare_deepfake(tmp_path / "c", count=4, seed=4, workers=1))
    assert a.signals.shape == (4, 8, 5000) and a.rate == 500
    np.testing.assert_array_equal(a.signals, b.signals)
    assert not np.allclose(a.signals, c.signals)
    peak = np.abs(a.signals).max(axis=(1, 2))
    assert ((peak > 0.3) & (peak < 10)).all()  # millivolts, not microvolts or raw GAN output
    lab = a.labels
    assert (lab["half"] == "").all() and (lab["label"] == -1).all() and (lab[list(CLASSES)] == 0).all().all()
    assert lab["patient_id"].tolist() == [0, 1, 2, 3] and lab["hr"].between(40, 150).all()
    assert a.manifest["source"] == "deepfake" and a.manifest["label_source"] == "extractor"


def test_100_hz_is_the_500_hz_ecg_resampled_with_labels_measured_at_500_hz(tmp_path):
    high = open_dataset(prepare_deepfake(tmp_path / "a", count=4, seed=3, workers=1))
    low = open_dataset(prepare_deepfake(tmp_path / "b", count=4, seed=3, workers=1, rate=100))
    assert low.signals.shape == (4, 8, 1000) and low.rate == 100
    for x, y in zip(low.signals, high.signals[:, :, ::5]):  # the same waveform, anti-aliased
        assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.98
    pd.testing.assert_frame_equal(low.labels, high.labels)


def test_generated_split_is_seeded_80_10_10(tmp_path):
    lab = open_dataset(prepare_deepfake(tmp_path / "a", count=40, seed=0, workers=2)).labels
    assert lab["split"].value_counts().to_dict() == {"train": 32, "val": 4, "test": 4}


def test_asc_files_with_ground_truth(asc_dir, tmp_path):
    truth = tmp_path / "truth.csv"
    pd.DataFrame({"patid": [101, 102, 103], "avgrrinterval": [1000, 800, 750], "pr": [160, 150, 140],
                  "qrs": [90, 95, 100], "qt": [400, 390, 380]}).to_csv(truth, index=False)
    ds = open_dataset(prepare_deepfake(tmp_path / "ds", asc_dir=asc_dir, ground_truth=truth, workers=1))
    lab = ds.labels.set_index("record_id")
    assert list(lab.index) == ["101", "102", "103", "124"]
    assert lab.loc["102", ["hr", "pr", "qrs", "qt"]].tolist() == [75.0, 150.0, 95.0, 390.0]
    assert lab.loc["124", ["hr", "pr", "qrs", "qt"]].isna().all()
    assert lab.loc["124", "label_note"] == "not in ground truth"
    first_row = np.loadtxt(asc_dir / "101.asc", max_rows=1)  # integer microvolts, leads I, II, V1..V6
    np.testing.assert_allclose(ds.signals[0, :, 0], first_row / 1000, rtol=1e-6)
    assert ds.manifest["label_source"] == "muse"


def test_asc_without_ground_truth_uses_the_extractor(asc_dir, tmp_path):
    ds = open_dataset(prepare_deepfake(tmp_path / "ds", asc_dir=asc_dir, workers=1))
    assert ds.manifest["label_source"] == "extractor" and ds.labels["qt"].between(300, 500).all()


def test_bad_asc_is_skipped_or_fails_under_strict(asc_dir, tmp_path):
    lines = (asc_dir / "102.asc").read_text().splitlines()
    (asc_dir / "102.asc").write_text("\n".join(lines[:3000]) + "\n")
    ds = open_dataset(prepare_deepfake(tmp_path / "ds", asc_dir=asc_dir, workers=1))
    assert ds.labels["record_id"].tolist() == ["101", "103", "124"]
    assert ds.manifest["skipped"] == [{"record": "102.asc", "reason": "3000 rows x 8 columns, expected 5000 x 8",
                                       "check": "record file"}]
    assert ds.manifest["checks"]["records_skipped"] == 1
    with pytest.raises(InputError, match="DeepFake file 102.asc: 3000 rows"):
        prepare_deepfake(tmp_path / "strict", asc_dir=asc_dir, strict=True, workers=1)
    with pytest.raises(InputError, match="3000 rows"):
        read_asc(asc_dir / "102.asc")


def test_bad_arguments_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="exactly one"):
        prepare_deepfake(tmp_path / "ds")
    with pytest.raises(InputError, match="not a directory"):
        prepare_deepfake(tmp_path / "ds", asc_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .asc files"):
        prepare_deepfake(tmp_path / "ds", asc_dir=tmp_path / "empty")
    with pytest.raises(InputError, match="overlaps the input"):
        prepare_deepfake(tmp_path / "empty" / "ds", asc_dir=tmp_path / "empty")


def test_outlier_rule_drops_only_the_far_label_and_is_a_new_dataset(asc_dir, tmp_path):
    from search.cli import main

    truth = tmp_path / "truth.csv"
    pd.DataFrame({"patid": [101, 102, 103, 124], "avgrrinterval": [1000, 800, 750, 900], "pr": [160, 150, 140, 155],
                  "qrs": [90, 94, 92, 200], "qt": [400, 390, 380, 395]}).to_csv(truth, index=False)
    out = tmp_path / "ds"
    args = ["data", "deepfake", "--asc-dir", str(asc_dir), "--ground-truth", str(truth), "--out", str(out),
            "--workers", "1"]
    assert main(args) == 0
    assert open_dataset(out).labels["qrs"].notna().all()
    assert main(args + ["--drop-outliers", "1"]) == 0  # 4 records: 3 SD can never be reached, 1 SD can
    ds = open_dataset(out)
    lab = ds.labels.set_index("record_id")
    assert lab["qrs"].isna().tolist() == [False, False, False, True]
    assert lab.loc["124", "label_note"] == "qrs: outlier > 1 SD" and lab.loc["124", "qt"] == 395
    assert ds.manifest["outlier_sd"] == 1.0
