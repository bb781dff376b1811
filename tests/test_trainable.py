"""One trial end to end on a real prepared PTB-XL sample: metrics, best checkpoint, transfer, faults, early stop,
and a tiny run under real Ray Tune."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data_prep.constants import CLASSES
from data_prep.dataset import open_dataset
from data_prep.errors import InputError
from data_prep.deepfake import prepare_deepfake
from data_prep.ptbxl import prepare_ptbxl
from ecgmodels import create_model, load_checkpoint
from ecgmodels.checkpoint import read_checkpoint
from search import metrics
from search.trainable import run_trial, train_trial

TINY = {"arch": "inception1d", "arch.depth": 6, "arch.filters": 8, "arch.bottleneck": 8, "batch_size": 16,
        "threads": 1, "seed": 3}
CLASSIFICATION_KEYS = {"epoch", "train_loss", "val_loss", "train_acc", "train_auc", "val_acc", "val_auc", "lr",
                       "val_auc_classes", "val_nll", "val_brier", "val_ece", "temperature",
                       "best_val_auc", *(f"val_f1_{c}" for c in CLASSES)}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Path:
    """The first 140 records of the embedded PTB-XL sample, prepared with a seeded 70/10/20 split."""
    root = tmp_path_factory.mktemp("ptbxl") / "root"
    shutil.copytree(sample_dir / "ptbxl", root, ignore=shutil.ignore_patterns("records500"))
    db = pd.read_csv(root / "ptbxl_database.csv")
    db.head(140).to_csv(root / "ptbxl_database.csv", index=False)
    return prepare_ptbxl(root, root.parent / "prepared", split="random", workers=1)


def config(data: Path, **kw) -> dict:
    return {"data": str(data), "task": "classification", "approach": "baseline", "max_epochs": 2, "patience": 5,
            **TINY, **kw}


def collect(into: list) -> callable:
    def report(found: dict, checkpoint_dir: Path | None) -> None:
        into.append((found, checkpoint_dir))
    return report


def val_outputs(model: torch.nn.Module, data: Path, rows: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model.eval()(torch.from_numpy(open_dataset(data).signals[rows])).numpy()


def test_classification_reports_metrics_and_keeps_the_best_epoch(data: Path, tmp_path: Path) -> None:
    reports: list = []
    best = run_trial(config(data, max_epochs=8, patience=1, lr=0.03, norm="global", lead_stats=True),
                     report=collect(reports), workdir=tmp_path)
    assert 2 <= len(reports) < 8  # stopped early: one epoch without improvement
    for found, _ in reports:
        assert CLASSIFICATION_KEYS <= set(found) and all(math.isfinite(v) for v in found.values())
    epochs = [f for f, _ in reports]
    winner = max(epochs, key=lambda f: f["val_auc"])
    assert winner["epoch"] == len(epochs) - 1  # the last epoch did not improve, so the best is not the last
    assert [f["epoch"] for f, d in reports if d is not None][-1] == winner["epoch"]
    assert best["epoch"] == winner["epoch"] and best["val_auc"] == epochs[-1]["best_val_auc"] == winner["val_auc"]

    ckpt = read_checkpoint(tmp_path / "best" / "model.pt")["extra"]
    assert ckpt["epoch"] == winner["epoch"] and ckpt["val_auc"] == winner["val_auc"]
    assert ckpt["classes"] == list(CLASSES) and ckpt["rate"] == 100 and ckpt["task"] == "classification"
    assert ckpt["dataset_hash"] == open_dataset(data).content_hash
    saved = np.load(tmp_path / "best" / "val_predictions.npz")
    assert saved["y_score"].shape == (len(saved["rows"]), 5)
    assert np.array_equal(saved["y_true"], open_dataset(data).labels["label"].to_numpy()[saved["rows"]])
    model = load_checkpoint(tmp_path / "best" / "model.pt")
    assert model.norm.fitted and not torch.equal(model.norm.scale, torch.ones(8))  # "global" fitted on train rows
    assert model.stats is not None and model.config["hparams"]["lead_stats"]  # the trial's setting, checkpointed
    probs = torch.softmax(torch.from_numpy(val_outputs(model, data, saved["rows"])), 1).numpy()
    np.testing.assert_allclose(probs, saved["y_score"], atol=1e-5)


def test_a_trial_is_reproducible(data: Path, tmp_path: Path) -> None:
    cfg = config(data, max_epochs=1, **{"aug.noise.p": 0.5, "aug.noise.strength": 0.05, "aug.shift.p": 0.5,
                                        "aug.shift.strength": 0.1})
    first, second = (run_trial(cfg, report=collect([]), workdir=tmp_path / str(i)) for i in range(2))
    assert first == second
    other = run_trial({**cfg, "trial_number": 1}, report=collect([]), workdir=tmp_path / "other")
    assert other["train_loss"] != first["train_loss"]


def test_multi_label_rows_train_on_multi_hot_targets(data: Path, tmp_path: Path) -> None:
    run_trial(config(data, max_epochs=1, single_label=False), report=collect([]), workdir=tmp_path)
    saved = np.load(tmp_path / "best" / "val_predictions.npz")
    labels = open_dataset(data).labels
    assert len(saved["rows"]) == len(labels.query("split == 'val'")) > (labels.query("split == 'val'").label >= 0).sum()
    np.testing.assert_array_equal(saved["y_true"], labels[list(CLASSES)].to_numpy()[saved["rows"]])


def test_regression_reports_mae_in_units(data: Path, tmp_path: Path) -> None:
    reports: list = []
    searched = {"schedule.warmup_epochs": np.int64(1), "lr": np.float64(1e-3)}  # as a searcher may sample them
    best = run_trial(config(data, task="regression", target="qt", schedule="cosine", **searched),
                     report=collect(reports), workdir=tmp_path)
    assert {"train_mae", "val_mae", "best_val_mae"} <= set(best)
    assert reports[0][0]["lr"] < reports[1][0]["lr"]  # warm-up
    extra = read_checkpoint(tmp_path / "best" / "model.pt")["extra"]  # loads with weights_only
    assert extra["config"]["lr"] == 1e-3
    assert 300 < extra["target_mean"] < 460 and 10 < extra["target_std"] < 100  # QT in ms
    saved = np.load(tmp_path / "best" / "val_predictions.npz")
    qt = open_dataset(data).labels["qt"].to_numpy()[saved["rows"]]
    np.testing.assert_allclose(saved["y_true"], qt, rtol=1e-6)
    assert best["val_mae"] == pytest.approx(np.abs(saved["y_score"] - qt).mean())
    out = val_outputs(load_checkpoint(tmp_path / "best" / "model.pt"), data, saved["rows"])[:, 0]
    np.testing.assert_allclose(out * extra["target_std"] + extra["target_mean"], saved["y_score"], rtol=1e-5)


def pretrained_models(targets: tuple[str, ...]) -> dict:
    """Regression models standing in for pretrained ones (their weights are what must survive)."""
    torch.manual_seed(11)
    return {t: create_model("inception1d", "regression", n_leads=8, length=1000, depth=6, filters=8, bottleneck=8)
            for t in targets}


@pytest.mark.parametrize("approach, targets", [("single", ("qrs",)), ("fused", ("hr", "pr", "qrs", "qt"))])
def test_transfer_starts_from_pretrained_and_keeps_frozen_stages(data: Path, tmp_path: Path, approach: str,
                                                                  targets: tuple[str, ...]) -> None:
    pretrained = pretrained_models(targets)
    before = {t: {k: v.clone() for k, v in m.state_dict().items()} for t, m in pretrained.items()}
    run_trial(config(data, approach=approach, max_epochs=1, freeze_depth=1, pretrained_lr_mult=0.5),
              pretrained=pretrained, report=collect([]), workdir=tmp_path)
    model = load_checkpoint(tmp_path / "best" / "model.pt")
    backbones = model.backbones if approach == "fused" else {targets[0]: model.backbone}
    assert sorted(backbones) == sorted(targets)
    for t, backbone in backbones.items():
        source = pretrained[t].backbone.state_dict()
        for k, v in backbone.state_dict().items():
            if k.startswith("group1."):  # frozen, BatchNorm statistics included
                assert torch.equal(v, source[k]), f"{t} frozen {k} changed"
        assert not torch.equal(backbone.state_dict()["group2.shortcut.0.weight"], source["group2.shortcut.0.weight"])
    for t, m in pretrained.items():  # the caller's models are not touched
        assert all(torch.equal(v, before[t][k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("kind, message", [("nan", r"loss became nan at epoch 2 with lr 0\.001"),
                                           ("raise", "injected fault: trial 4 raised at epoch 2")])
def test_fault_injection_fails_the_trial_with_its_reason(data: Path, tmp_path: Path, kind: str, message: str) -> None:
    fault = {"trials": [0, 4], "epoch": 2, "kind": kind}
    reports: list = []
    with pytest.raises(RuntimeError, match=message):
        run_trial(config(data, trial_number=4, fault=fault), report=collect(reports), workdir=tmp_path / "4")
    assert [f["epoch"] for f, _ in reports] == [1]
    reports.clear()
    run_trial(config(data, trial_number=1, fault=fault), report=collect(reports), workdir=tmp_path / "1")
    assert [f["epoch"] for f, _ in reports] == [1, 2]  # trial 1 is not in the fault's trials


def test_a_dataset_without_the_task_labels_is_an_input_error(asc_dir: Path, tmp_path: Path) -> None:
    fake = prepare_deepfake(tmp_path / "fake", asc_dir=asc_dir, workers=1, rate=100)  # 4 ECGs, intervals only
    with pytest.raises(InputError, match="has no class labels"):
        run_trial(config(fake))
    with pytest.raises(InputError, match="0 val rows for hr"):
        run_trial(config(fake, task="regression", target="hr"))


def test_bad_task_settings_are_input_errors(data: Path) -> None:
    with pytest.raises(InputError, match="no 'st' values"):
        run_trial(config(data, task="regression", target="st"))
    with pytest.raises(InputError, match="0 train rows in half C for classification"):
        run_trial(config(data, half="C"))
    with pytest.raises(InputError, match="needs pretrained models"):
        run_trial(config(data, approach="single"))


def test_train_trial_reports_and_checkpoints_under_ray_tune(data: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from ray import tune

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            tune.with_parameters(train_trial, pretrained=None),
            param_space=config(data, max_epochs=3, lr=tune.grid_search([0.003, 0.03])),
            tune_config=tune.TuneConfig(metric="val_auc", mode="max", max_concurrent_trials=2),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="tiny", verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(
                                          num_to_keep=1, checkpoint_score_attribute="val_auc",
                                          checkpoint_score_order="max")))
        results = tuner.fit()
    finally:
        ray.shutdown()
    assert results.num_errors == 0 and len(results) == 2
    for result in results:
        history = result.metrics_dataframe
        assert list(history["epoch"]) == list(range(1, len(history) + 1))
        best_epoch = int(history.loc[history["val_auc"].idxmax(), "epoch"])
        with result.checkpoint.as_directory() as d:
            assert read_checkpoint(Path(d) / "model.pt")["extra"]["epoch"] == best_epoch
            assert (Path(d) / "val_predictions.npz").is_file()


def test_batchnorm_statistics_are_the_exact_average_over_training_batches_and_frozen_stages_keep_theirs() -> None:
    """Evaluation after a few steps must not use running statistics still near their initial values."""
    from ecgmodels import freeze
    from search.trainable import recalibrate_batchnorm

    torch.manual_seed(0)
    model = freeze(create_model("cnn1d", length=250), 1)
    frozen_bn = next(m for m in model.backbone[0].modules() if isinstance(m, torch.nn.BatchNorm1d))
    free_bn = next(m for m in model.backbone[1].modules() if isinstance(m, torch.nn.BatchNorm1d))
    frozen_before = frozen_bn.running_mean.clone()
    batches = [torch.randn(8, 8, 250) * 0.5 + 0.2 for _ in range(3)]
    seen = []
    hook = free_bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    recalibrate_batchnorm(model, iter(batches))
    hook.remove()
    want = torch.stack([x.mean((0, 2)) for x in seen]).mean(0)  # equal batch sizes: the mean of batch means
    assert torch.allclose(free_bn.running_mean, want, atol=1e-5)
    assert torch.equal(frozen_bn.running_mean, frozen_before)
    assert free_bn.momentum == 0.1


def test_train_metrics_are_clean_and_the_kept_checkpoint_is_calibrated(data: Path, tmp_path: Path) -> None:
    """Train metrics come from the training rows in eval mode without augmentation (here all of them: fewer than
    TRAIN_EVAL_ROWS), at the temperature fitted on the val rows, which the checkpoint keeps."""
    heavy = {"aug.noise.p": 1.0, "aug.noise.strength": 0.5, "aug.time_mask.p": 1.0, "aug.time_mask.strength": 0.5}
    reports: list = []
    best = run_trial(config(data, max_epochs=3, lr=0.01, **heavy), report=collect(reports), workdir=tmp_path)
    ds = open_dataset(data)
    train_rows = ds.select("train", single_label=True)
    model = load_checkpoint(tmp_path / "best" / "model.pt")
    assert float(model.temperature) == pytest.approx(best["temperature"]) and best["temperature"] != 1.0
    probs = torch.softmax(torch.from_numpy(val_outputs(model, data, train_rows)), 1).numpy()
    y_train = ds.labels["label"].to_numpy()[train_rows]
    assert best["train_acc"] == pytest.approx(metrics.accuracy(y_train, probs))
    assert best["train_auc"] == pytest.approx(metrics.macro_auc(y_train, probs), abs=1e-6)

    saved = np.load(tmp_path / "best" / "val_predictions.npz")
    y, s = saved["y_true"], saved["y_score"]
    assert best["val_nll"] == pytest.approx(metrics.nll(y, s)) and best["val_ece"] == pytest.approx(metrics.ece(y, s))
    assert best["val_brier"] == pytest.approx(metrics.brier(y, s))
    uncalibrated = torch.softmax(torch.from_numpy(val_outputs(model, data, saved["rows"])) * best["temperature"], 1)
    assert best["val_nll"] < metrics.nll(y, uncalibrated.numpy().astype(np.float64))  # the fit lowered the NLL
    assert best["val_auc_classes"] == metrics.auc_classes(y, 5)
    assert all({"val_nll", "val_brier", "val_ece", "val_auc_classes", "temperature"} <= set(f) for f, _ in reports)


def test_a_resumed_trial_trains_on_as_an_uninterrupted_one(data: Path, tmp_path: Path) -> None:
    """The checkpoint holds its temperature, but training goes on at temperature 1, resumed or not."""
    cfg = config(data, max_epochs=2, lr=0.01)
    whole: list = []
    run_trial(cfg, report=collect(whole), workdir=tmp_path / "whole")
    run_trial({**cfg, "max_epochs": 1}, report=collect([]), workdir=tmp_path / "first")
    rest: list = []
    run_trial(cfg, report=collect(rest), workdir=tmp_path / "rest", resume_from=tmp_path / "first" / "best")
    assert [f["epoch"] for f, _ in rest] == [2]
    assert rest[0][0]["train_loss"] == pytest.approx(whole[1][0]["train_loss"])
    assert rest[0][0]["val_auc"] == pytest.approx(whole[1][0]["val_auc"])


def test_cv_reports_the_mean_over_patient_grouped_folds_and_keeps_their_ensemble(data: Path, tmp_path: Path) -> None:
    reports: list = []
    best = run_trial(config(data, max_epochs=1, cv=3), report=collect(reports), workdir=tmp_path)
    ds = open_dataset(data)
    everyone = np.sort(np.concatenate([ds.select(s, single_label=True) for s in ("train", "val")]))
    saved = np.load(tmp_path / "best" / "val_predictions.npz")
    assert np.array_equal(np.sort(saved["rows"]), everyone)  # out of fold: every train+val row once
    fold_aucs, patients = [], []
    for i in range(3):
        fold = read_checkpoint(tmp_path / "best" / f"fold_{i}" / "model.pt")["extra"]["config"]["rows"]
        part = np.isin(saved["rows"], fold["val"])
        member = load_checkpoint(tmp_path / "best" / f"fold_{i}" / "model.pt")
        probs = torch.softmax(torch.from_numpy(val_outputs(member, data, saved["rows"][part])), 1).numpy()
        np.testing.assert_allclose(probs, saved["y_score"][part], atol=1e-5)
        fold_aucs.append(metrics.macro_auc(saved["y_true"][part], saved["y_score"][part]))
        patients.append(set(ds.labels["patient_id"].to_numpy()[fold["val"]]))
        assert not patients[-1] & set(ds.labels["patient_id"].to_numpy()[fold["train"]])
    assert not (patients[0] & patients[1]) and not (patients[1] & patients[2])
    assert best["val_auc"] == pytest.approx(np.mean(fold_aucs))
    ensemble = load_checkpoint(tmp_path / "best" / "model.pt")
    assert read_checkpoint(tmp_path / "best" / "model.pt")["extra"]["val_auc"] == best["val_auc"]
    members = [load_checkpoint(tmp_path / "best" / f"fold_{i}" / "model.pt") for i in range(3)]
    rows = everyone[:5]
    mean = np.mean([torch.softmax(torch.from_numpy(val_outputs(m, data, rows)), 1).numpy() for m in members], 0)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(val_outputs(ensemble, data, rows)), 1).numpy(), mean,
                               atol=1e-5)
    with pytest.raises(InputError, match="cv 0"):
        run_trial(config(data, cv=0))
