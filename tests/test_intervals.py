"""The HR/PR/QRS/QT extractor on real ECGs, an ECG of known rate, and unusable signals."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import wfdb

from data_prep.constants import LEADS, TARGETS
from data_prep.intervals import drop_outliers, measure


def _record(sample_dir, ecg_id: int, rate: int) -> np.ndarray:
    kind = "lr" if rate == 100 else "hr"
    raw, fields = wfdb.rdsamp(str(sample_dir / f"ptbxl/records{rate}/00000/{ecg_id:05d}_{kind}"))
    return raw[:, [fields["sig_name"].index(lead) for lead in LEADS]].T.astype(np.float32)


def test_same_record_at_100_and_500_hz_agrees(sample_dir):
    for ecg_id in (1, 9, 17):
        low, high = measure(_record(sample_dir, ecg_id, 100), 100), measure(_record(sample_dir, ecg_id, 500), 500)
        assert abs(low["hr"] - high["hr"]) < 2
        for t in ("pr", "qrs", "qt"):
            assert abs(low[t] - high[t]) <= 20, (ecg_id, t, low[t], high[t])


def test_one_beat_repeated_every_750_ms_is_80_bpm_with_the_same_intervals(sample_dir):
    ecg = _record(sample_dir, 1, 500)
    original = measure(ecg, 500)
    r = 2 * 500  # a beat's R peak near 2 s: take the window R-250 ms .. R+500 ms
    r = r - 150 + int(np.argmax(ecg[1, r - 150:r + 150]))
    beat = ecg[:, r - 125:r + 250]
    tiled = np.tile(beat, (1, 14))[:, :5000]
    found = measure(tiled, 500)
    assert found["hr"] == pytest.approx(80.0, abs=0.5)
    for t in ("pr", "qrs", "qt"):
        assert found[t] == pytest.approx(original[t], abs=20), t
    assert 100 <= found["pr"] <= 220 and 60 <= found["qrs"] <= 120 and 330 <= found["qt"] <= 460


def test_sample_records_sit_near_the_12sl_population(sample_dir):
    """First 40 sample records: means near PTB-XL+ 12SL (HR 74, PR 166, QRS 97, QT 396)."""
    found = pd.DataFrame([measure(_record(sample_dir, i, 100), 100) for i in range(1, 41)])
    assert found["hr"].notna().all() and found[["pr", "qrs", "qt"]].notna().mean().min() >= 0.9
    assert abs(found["hr"].mean() - 74) < 10 and abs(found["pr"].mean() - 166) < 25
    assert abs(found["qrs"].mean() - 97) < 15 and abs(found["qt"].mean() - 396) < 30


def test_unusable_signals_give_nan_with_a_reason():
    flat = measure(np.zeros((8, 5000), dtype=np.float32), 500)
    assert all(np.isnan(flat[t]) for t in TARGETS) and "R peaks" in flat["label_note"]
    noise = measure(np.random.default_rng(0).normal(0, 0.01, (8, 1000)).astype(np.float32), 100)
    assert all(np.isnan(noise[t]) for t in TARGETS) and "plausible RR intervals: too few" in noise["label_note"]


def test_outlier_rule_drops_values_beyond_3_sd_and_notes_them():
    rng = np.random.default_rng(0)
    labels = pd.DataFrame({t: rng.normal(100, 5, 200) for t in TARGETS}).assign(label_note="")
    labels.loc[7, "qt"] = 400.0
    cleaned = drop_outliers(labels)
    assert np.isnan(cleaned.loc[7, "qt"]) and cleaned.loc[7, "label_note"] == "qt: outlier > 3 SD"
    assert cleaned.drop(index=7)["qt"].notna().all() and not np.isnan(labels.loc[7, "qt"])
