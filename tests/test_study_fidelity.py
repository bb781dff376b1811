"""`fidelity: rate` in a study: every search screens at 100 Hz and chooses at 500 Hz, the 100 Hz screens of the
transfer arms start from the 100 Hz screens' backbones, stage 3 runs at 500 Hz, and a rerun trains nothing.

The embedded sample has 500 Hz files for 40 records; the fixture writes the others' 500 Hz files as real wfdb records
(their 100 Hz signals resampled), so the study has enough records to cross-fit."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb
import yaml
from mlflow import MlflowClient
from scipy.signal import resample_poly

from search.study import plan, run_study
from test_study import SMALL_NET

RECORDS = 160


def with_500hz_files(sample: Path, root: Path) -> Path:
    """A copy of the sample's first RECORDS records with a 500 Hz file for each (the real one where it exists)."""
    shutil.copytree(sample, root)
    db = pd.read_csv(root / "ptbxl_database.csv").head(RECORDS)
    db.to_csv(root / "ptbxl_database.csv", index=False)
    for lr, hr in zip(db["filename_lr"], db["filename_hr"]):
        if (root / f"{hr}.hea").exists():
            continue
        low = wfdb.rdrecord(str(root / lr))
        (root / hr).parent.mkdir(parents=True, exist_ok=True)
        wfdb.wrsamp(Path(hr).name, fs=500, units=low.units, sig_name=low.sig_name,
                    p_signal=resample_poly(low.p_signal, 5, 1, axis=0), fmt=["16"] * low.n_sig,
                    write_dir=str(root / Path(hr).parent))
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory, sample_dir):
    tmp = tmp_path_factory.mktemp("fidelity-study")
    root = with_500hz_files(sample_dir / "ptbxl", tmp / "ptbxl")
    cfg = {"name": "fid", "workdir": str(tmp / "work"), "seed": 0, "fidelity": "rate",
           "data": {"ptbxl": {"root": str(root), "rate": 500}},
           "architectures": {"archs": []},
           "pretrain": {"targets": ["qrs"], "sources": ["ptbxl-a"], "num_samples": 1, "max_epochs": 1,
                        "space": SMALL_NET},
           "finetune": {"approaches": ["single"], "sources": ["ptbxl-a"], "num_samples": 1,
                        "max_epochs": 1, "space": {**SMALL_NET, "freeze_depth": 1}},
           "evaluate": {"n_boot": 100, "trees": 50, "folds": 3, "seeds": [0]}}
    config = tmp / "study.yaml"
    config.write_text(yaml.safe_dump(cfg))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return tmp, config, uri, run_study(config, uri)


def test_each_search_screens_at_100_hz_and_chooses_at_500_hz(study):
    tmp, config, uri, result = study
    assert "fidelity rate: each search screens at 100 Hz" in plan(config, uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("study-fid").experiment_id
    for name in ("pretrain-qrs-ptbxl-a", "finetune-single-ptbxl-a"):
        (chosen,) = client.search_runs([experiment], f"tags.`study.search` = '{name}'")
        screen = client.get_run(chosen.data.tags["fidelity.low_search"])
        assert screen.data.tags["study.screen_for"] == chosen.data.tags["study.search_key"]
        assert screen.data.params["data"].endswith("ptbxl-100") and chosen.data.params["data"].endswith("ptbxl-500")
    version = lambda name: client.get_model_version_by_alias(name, "champion")
    assert version("ecg-qrs-ptbxl-a").tags["rate"] == "500" and version("ecg-qrs-ptbxl-a-100hz").tags["rate"] == "100"
    assert version("ecg-cls-single-ptbxl-a").tags["rate"] == "500"
    (single,) = client.search_runs([experiment], "tags.`study.search` = 'finetune-single-ptbxl-a'")
    screen = client.get_run(single.data.tags["fidelity.low_search"])
    assert "ecg-qrs-ptbxl-a-100hz" in screen.data.tags["pretrained.qrs"]  # the 100 Hz screen's own backbone
    assert "ecg-qrs-ptbxl-a/" in single.data.tags["pretrained.qrs"]


def test_stage_3_scores_every_half_b_record_at_500_hz_and_a_rerun_trains_nothing(study):
    tmp, config, uri, first = study
    table = pd.read_csv(first.tables["results.csv"])
    labels = pd.read_parquet(tmp / "work" / "data" / "ptbxl-500" / "labels.parquet")
    cohort = labels[(labels["half"] == "B") & (labels["label"] >= 0)]
    assert "single (qrs)" in set(table["approach"]) and (table["oof_n"] == len(cohort)).all()
    assert "screened its configurations at 100 Hz" in first.tables["tables.md"].read_text()
    for unit in (tmp / "work" / "evaluation" / "units").glob("*.npz"):
        with np.load(unit) as z:
            assert not set(z["rows"]) & (set(z["train_rows"]) | set(z["val_rows"]))
    again = run_study(config, uri)
    assert again.ran == [] and again.retrained == 0 and len(again.reused) == 2
