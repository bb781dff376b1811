"""Fidelity across sampling rate: two prepared datasets paired by record id (real wfdb records of the embedded
sample at 100 and 500 Hz), and the 500 Hz search built from a finished 100 Hz search in a real sqlite MLflow store
(top-rung configurations enqueued in order, lineage tags)."""
from __future__ import annotations

import time

import optuna
import pandas as pd
import pandas.testing
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from data_prep.errors import InputError
from data_prep.ptbxl import prepare_ptbxl
from search import fidelity
from search.cli import main
from search.spec import SearchSpec
from search.tracking import experiment_id
from search.tuner import SearchResult
from test_warmstart import space
from search_fixtures import store  # noqa: F401


@pytest.fixture(scope="module")
def both_rates(tmp_path_factory: pytest.TempPathFactory, sample_dir):
    """The sample's records that have a 500 Hz file, prepared at 100 and at 500 Hz; and all 100 Hz records."""
    import shutil

    tmp = tmp_path_factory.mktemp("fidelity")
    root = tmp / "root"
    shutil.copytree(sample_dir / "ptbxl", root)
    db = pd.read_csv(root / "ptbxl_database.csv")
    db[db["filename_hr"].map(lambda f: (root / f"{f}.dat").is_file())].to_csv(root / "ptbxl_database.csv", index=False)
    paired = [prepare_ptbxl(root, tmp / f"p{rate}", rate=rate, split="random", workers=1) for rate in (100, 500)]
    full = tmp / "full"
    shutil.copytree(sample_dir / "ptbxl", full, ignore=shutil.ignore_patterns("records500"))
    db.head(60).to_csv(full / "ptbxl_database.csv", index=False)
    return (*paired, prepare_ptbxl(full, tmp / "other100", split="random", workers=1))


def test_the_same_records_at_both_rates_pair(both_rates) -> None:
    low, high, _ = both_rates
    a, b = fidelity.pair(low, high)
    assert (a.rate, b.rate, a.length, b.length) == (100, 500, 1000, 5000)
    pandas.testing.assert_series_equal(a.labels["split"], b.labels["split"])


def test_a_dataset_resampled_from_500_hz_pairs_with_it_and_holds_the_real_100_hz_signals(both_rates, tmp_path,
                                                                                         capsys) -> None:
    import numpy as np

    real100, high, _ = both_rates
    assert main(["data", "resample", str(high), "--rate", "100", "--out", str(tmp_path / "r100")]) == 0
    assert "at 100 Hz" in capsys.readouterr().out
    derived, source = fidelity.pair(tmp_path / "r100", high)
    real = fidelity.open_dataset(real100)
    pandas.testing.assert_frame_equal(derived.labels, source.labels)  # its labels too (intervals measured at 500 Hz)
    same = ["record_id", "patient_id", "half", "split", "label", "NORM", "MI", "STTC", "CD", "HYP"]
    pandas.testing.assert_frame_equal(derived.labels[same], real.labels[same])
    # PTB-XL's own 100 Hz files are the 500 Hz recordings downsampled: the derived signals agree with them
    # sample by sample (to a few microvolts of filter difference), away from the edges
    a, b = np.asarray(derived.signals)[:, :, 20:-20], np.asarray(real.signals)[:, :, 20:-20]
    assert np.median(np.abs(a - b)) < 0.01 and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    assert main(["data", "resample", str(high), "--rate", "300", "--out", str(tmp_path / "r300")]) == 2
    assert "cannot derive 300 Hz from 500 Hz" in capsys.readouterr().err


def test_datasets_of_other_records_or_rates_are_refused(both_rates) -> None:
    low, high, other = both_rates
    with pytest.raises(InputError, match=r"differ: record \d+ is only in .*other100"):
        fidelity.pair(other, high)
    with pytest.raises(InputError, match="is at 500 Hz, expected 100 Hz"):
        fidelity.pair(high, high)


def test_a_transfer_search_across_rates_needs_its_500_hz_backbones(both_rates, tmp_path, capsys) -> None:
    low, high, _ = both_rates
    base = ["search", "--data", str(low), "--task", "classification", "--approach", "single", "--fidelity", "rate",
            "--fidelity-data", str(high), "--pretrained", "qrs=models:/ecg-qrs@champion", "--num-samples", "2",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--fidelity-pretrained with the same targets at 500 Hz (got none)" in err
    assert main([*base, "--fidelity-pretrained", "qrs"]) == 2
    assert "--fidelity-pretrained 'qrs': write TARGET=URI" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything ran


# a finished 100 Hz search: (params, best_val_auc, stopped_by)
LOW_TRIALS = [({"arch": "cnn1d", "arch.width": "16", "lr": "0.003", "batch_size": "64"}, 0.80, "trainer"),
              ({"arch": "inception1d", "lr": "0.001", "batch_size": "32"}, 0.86, "trainer"),
              ({"arch": "cnn1d", "arch.width": "8", "lr": "0.0002", "batch_size": "32"}, 0.90, "scheduler"),
              ({"arch": "cnn1d", "arch.width": "8", "lr": "0.005", "batch_size": "32"}, 0.75, "trainer")]


def low_search(uri: str) -> str:
    client = MlflowClient(uri)
    experiment = experiment_id(client, uri)  # artifacts beside the store, not in ./mlruns
    parent = client.create_run(experiment, run_name="low").info.run_id
    for number, (params, value, stopped_by) in enumerate(LOW_TRIALS):
        child = client.create_run(experiment, run_name=f"trial-{number}", tags={
            "mlflow.parentRunId": parent, "trial_number": str(number), "stopped_by": stopped_by}).info.run_id
        client.log_batch(child, metrics=[Metric("best_val_auc", value, int(time.time() * 1000), 1)],
                         params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(child, "FINISHED")
    return parent


def test_top_rung_configs_are_retrained_at_500_hz_with_lineage(store, tmp_path) -> None:
    parent = low_search(store)
    client = MlflowClient(store)
    picks = fidelity.top_rung(client, parent, space(), "val_auc", "max", k=2)
    assert [run.data.tags["trial_number"] for run, _ in picks] == ["1", "0"]  # trial 2 was stopped by ASHA
    spec = SearchSpec("low-data", name="low", num_samples=20, tracking_uri=store, warm_start=("x",))
    high = fidelity.high_spec(spec, "high-data", picks, tmp_path)
    assert (high.data, high.name, high.num_samples, high.asha, high.warm_start) == ("high-data", "low-500hz", 2,
                                                                                    False, ())
    study = optuna.load_study(study_name=high.name, storage=high.optuna_storage)
    first, second = study.ask(), study.ask()  # what OptunaSearch does for the 500 Hz search's trials 0 and 1
    assert (first.params, second.params) == ({}, {})  # define-by-run: the fixed values come with each suggestion
    assert first.suggest_categorical("arch", ["cnn1d", "inception1d"]) == "inception1d"
    assert second.suggest_int("cnn1d.width", 8, 16) == 16
    run_500 = client.create_run("0", run_name="trial-0").info.run_id
    table = pd.DataFrame({"trial_number": [0], "run_id": [run_500]})
    high_parent = client.create_run("0", run_name="low-500hz").info.run_id
    result = SearchResult("low-500hz", high_parent, "0", store, "val_auc", "max", table, tmp_path)
    fidelity.tag_lineage(client, parent, result, high.optuna_storage)
    tags = client.get_run(run_500).data.tags
    assert tags["fidelity.from_run"] == picks[0][0].info.run_id and tags["fidelity.from_trial"] == "1"
    assert client.get_run(high_parent).data.tags["fidelity.low_search"] == parent
