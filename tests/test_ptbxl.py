"""PTB-XL preparation on real records: labels, lead order, shapes, 12SL mapping, bad input, cache."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import wfdb

from data_prep.constants import CLASSES, LEADS
from data_prep.dataset import open_dataset
from data_prep.errors import InputError
from data_prep.ptbxl import prepare_ptbxl
from search.cli import main
from ptbxl_copies import keep_records, record_path, rewrite_record

FEW = range(1, 21)


def test_labels_signals_and_shape_at_100_hz(ptbxl_root, tmp_path):
    keep_records(ptbxl_root, FEW)
    ds = open_dataset(prepare_ptbxl(ptbxl_root, tmp_path / "ds", workers=2))
    assert ds.signals.shape == (20, 8, 1000) and ds.signals.dtype == np.float32
    first = ds.labels.set_index("record_id").loc[1]
    assert first["NORM"] == 1 and first[list(CLASSES[1:])].sum() == 0 and first["label"] == 0
    raw, fields = wfdb.rdsamp(str(record_path(ptbxl_root, 1)))
    expected = raw[:, [fields["sig_name"].index(lead) for lead in LEADS]].T
    np.testing.assert_allclose(ds.signals[0], expected, atol=1e-6)
    assert ds.manifest["rate"] == 100 and ds.manifest["label_source"] == "extractor"
    assert ds.manifest["normalisation"] == "zscore" and ds.manifest["units"] == "mV"
    assert ds.labels["hr"].between(30, 200).all()


def test_shape_at_500_hz_through_the_cli_with_no_progress_bar_in_a_log(ptbxl_root, tmp_path, capsys):
    keep_records(ptbxl_root, range(1, 41))  # the 40 records that have records500
    assert main(["data", "ptbxl", "--root", str(ptbxl_root), "--out", str(tmp_path / "ds"), "--rate", "500",
                 "--workers", "2"]) == 0
    ds = open_dataset(tmp_path / "ds")
    assert ds.signals.shape == (40, 8, 5000) and ds.manifest["skipped"] == []
    printed = capsys.readouterr()
    assert "\r" not in printed.err + printed.out and "40 ECGs" in printed.out  # stderr is not a terminal here


def test_leads_are_chosen_by_name_not_position(ptbxl_root, tmp_path):
    keep_records(ptbxl_root, [1, 2, 3])
    before = open_dataset(prepare_ptbxl(ptbxl_root, tmp_path / "before", workers=1)).signals[1].copy()
    # record 2 rewritten with its 12 channels reversed and some names in lower case
    rewrite_record(record_path(ptbxl_root, 2), order=list(range(11, -1, -1)), rename={"V1": "v1", "I": "i"})
    assert wfdb.rdheader(str(record_path(ptbxl_root, 2))).sig_name[0] == "V6"
    after = open_dataset(prepare_ptbxl(ptbxl_root, tmp_path / "after", workers=1)).signals[1]
    np.testing.assert_array_equal(before, after)


def test_min_likelihood_drops_uncertain_statements(ptbxl_root, tmp_path):
    keep_records(ptbxl_root, [1, 2])  # record 2 is NORM with likelihood 80
    ds = open_dataset(prepare_ptbxl(ptbxl_root, tmp_path / "ds", min_likelihood=100, workers=1))
    labels = ds.labels.set_index("record_id")
    assert labels.loc[1, "NORM"] == 1 and labels.loc[2, "NORM"] == 0 and labels.loc[2, "label"] == -1


def test_12sl_features_map_to_targets(ptbxl_root, tmp_path):
    keep_records(ptbxl_root, [1, 2, 3])
    features = tmp_path / "ptbxl_plus" / "features"
    features.mkdir(parents=True)
    pd.DataFrame({"ecg_id": [1, 2], "RR_Mean_Global": [800.0, 1000.0], "P_Dur_Global": [100.0, 110.0],
                  "PR_Int_Global": [160.0, 150.0], "QRS_Dur_Global": [90.0, 100.0], "QT_Int_Global": [400.0, 420.0],
                  "QT_IntCorr_Global": [447.0, 420.0]}).to_csv(features / "12sl_features.csv", index=False)
    ds = open_dataset(prepare_ptbxl(ptbxl_root, tmp_path / "ds", features=tmp_path / "ptbxl_plus", workers=1))
    labels = ds.labels.set_index("record_id")
    assert labels.loc[1, ["hr", "pr", "qrs", "qt"]].tolist() == [75.0, 160.0, 90.0, 400.0]
    assert labels.loc[2, "hr"] == 60.0 and labels.loc[2, "qt"] == 420.0
    assert labels.loc[3, ["hr", "pr", "qrs", "qt"]].isna().all()
    assert labels.loc[3, "label_note"] == "not in 12SL features"
    assert ds.manifest["label_source"] == "ptbxl+ 12sl"
    strict = open_dataset(prepare_ptbxl(ptbxl_root, tmp_path / "ds", features=tmp_path / "ptbxl_plus", workers=1,
                                        outlier_sd=0.5))  # two values: each is 0.71 SD from their median
    assert strict.manifest["outlier_sd"] == 0.5 and strict.labels["qt"].isna().all()


def test_missing_root_csv_and_features_are_input_errors(ptbxl_root, tmp_path, capsys):
    with pytest.raises(InputError, match="ptbxl_database.csv"):
        prepare_ptbxl(tmp_path / "nowhere", tmp_path / "ds")
    (ptbxl_root / "scp_statements.csv").unlink()
    with pytest.raises(InputError, match="scp_statements.csv"):
        prepare_ptbxl(ptbxl_root, tmp_path / "ds")
    assert main(["data", "ptbxl", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "ds")]) == 2
    assert "ptbxl_database.csv not found" in capsys.readouterr().err


def _break_records(root):
    """Records 2..7 each broken in one way; 1 and 8 stay good."""
    keep_records(root, range(1, 9))
    record_path(root, 2).with_suffix(".dat").unlink()
    dat = record_path(root, 3).with_suffix(".dat")
    dat.write_bytes(dat.read_bytes()[:5000])
    rewrite_record(record_path(root, 4), fs=250)
    rewrite_record(record_path(root, 5), rename={"V4": "X4"})
    nan = wfdb.rdrecord(str(record_path(root, 6)), physical=False).d_signal.copy()
    nan[100:200, 1] = -32768  # the format-16 code for a missing sample
    rewrite_record(record_path(root, 6), digital=nan)
    flat = wfdb.rdrecord(str(record_path(root, 7)), physical=False).d_signal.copy()
    flat[:, 0] = 0
    rewrite_record(record_path(root, 7), digital=flat)


def test_bad_records_are_skipped_with_reasons(ptbxl_root, tmp_path):
    _break_records(ptbxl_root)
    ds = open_dataset(prepare_ptbxl(ptbxl_root, tmp_path / "ds", workers=2))
    assert ds.labels["record_id"].tolist() == [1, 8]
    reasons = {s["record"]: s["reason"] for s in ds.manifest["skipped"]}
    assert list(reasons) == [2, 3, 4, 5, 6, 7]
    assert "missing file 00002_lr.dat" in reasons[2]
    assert "truncated .dat" in reasons[3]
    assert "250 Hz, expected 100 Hz" in reasons[4]
    assert "missing leads V4" in reasons[5]
    assert "NaN samples in lead II" in reasons[6]
    assert "flat signal in lead I" in reasons[7]


def test_strict_fails_naming_the_record_and_leaves_nothing(ptbxl_root, tmp_path):
    _break_records(ptbxl_root)
    out = tmp_path / "ds"
    with pytest.raises(InputError, match="PTB-XL record 2: missing file 00002_lr.dat"):
        prepare_ptbxl(ptbxl_root, out, strict=True, workers=2)
    assert not out.exists() and list(tmp_path.glob(".ds*")) == []


def test_failed_rebuild_keeps_the_previous_dataset(ptbxl_root, tmp_path):
    keep_records(ptbxl_root, range(1, 9))
    out = prepare_ptbxl(ptbxl_root, tmp_path / "ds", strict=True, workers=1)
    record_path(ptbxl_root, 5).with_suffix(".dat").unlink()
    with pytest.raises(InputError):
        prepare_ptbxl(ptbxl_root, out, strict=True, seed=1, workers=1)
    assert open_dataset(out).manifest["splits"]["seed"] == 0 and len(open_dataset(out).labels) == 8


def test_cache_reuse_and_invalidation(ptbxl_root, tmp_path):
    keep_records(ptbxl_root, FEW)
    out = prepare_ptbxl(ptbxl_root, tmp_path / "ds", workers=1)
    manifest = out / "manifest.json"
    stamp, key = manifest.stat().st_mtime_ns, json.loads(manifest.read_text())["cache_key"]
    prepare_ptbxl(ptbxl_root, out, workers=1)
    assert manifest.stat().st_mtime_ns == stamp  # reused: nothing written
    prepare_ptbxl(ptbxl_root, out, seed=1, workers=1)
    rebuilt = json.loads(manifest.read_text())
    assert rebuilt["cache_key"] != key and rebuilt["splits"]["seed"] == 1
    keep_records(ptbxl_root, range(1, 11))  # a changed input CSV
    assert len(open_dataset(prepare_ptbxl(ptbxl_root, out, seed=1, workers=1)).labels) == 10
    stamp = manifest.stat().st_mtime_ns
    rewrite_record(record_path(ptbxl_root, 3), order=list(range(11, -1, -1)))  # a changed record file
    prepare_ptbxl(ptbxl_root, out, seed=1, workers=1)
    assert manifest.stat().st_mtime_ns != stamp
