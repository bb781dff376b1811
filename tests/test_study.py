"""The study end to end on the embedded data with real Ray and MLflow (one trial per search, one epoch, a small
cnn1d; stage 3 cross-fitted over 3 folds x 2 seeds), its resumption, its plan, and its bad-config errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from data_prep.errors import InputError
from search.cli import main
from search.study import load_config, load_registered, plan, run_study

SMALL_NET = {"arch": "cnn1d", "archs": {"cnn1d": {"depth": 3, "width": 16, "kernel": 5}}, "batch_size": 32,
             "schedule": "constant", "norm": "global"}


def write_config(tmp: Path, file: str = "study.yaml", **changes) -> Path:
    cfg = {
        "name": "test", "workdir": str(tmp / "work"), "seed": 0,
        "data": {"ptbxl": {"root": str(tmp / "ptbxl"), "rate": 100}, "deepfake": {"count": 64}},
        "architectures": {"archs": ["cnn1d"], "tasks": ["qrs", "classification"], "num_samples": 1,
                          "max_epochs": 1, "space": SMALL_NET},
        "pretrain": {"targets": ["hr", "pr", "qrs", "qt"], "sources": ["ptbxl-a", "deepfake"], "num_samples": 1,
                     "max_epochs": 1, "space": SMALL_NET},
        "finetune": {"approaches": ["baseline", "single", "fused"], "sources": ["ptbxl-a", "deepfake"],
                     "num_samples": 1, "max_epochs": 1, "space": {**SMALL_NET, "freeze_depth": 2}},
        "evaluate": {"n_boot": 200, "trees": 100, "folds": 3, "seeds": [0, 1]},
    }
    for section, value in changes.items():
        cfg[section] = {**cfg[section], **value} if section != "data" else value
    path = tmp / file
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory, sample_dir):
    """The test study run once (the first run), with its config, tracking URI and the plan printed before it."""
    tmp = tmp_path_factory.mktemp("study")
    shutil.copytree(sample_dir / "ptbxl", tmp / "ptbxl")
    config, uri = write_config(tmp), f"sqlite:///{tmp / 'mlflow.db'}"
    before = plan(config, uri)
    created = sorted(p.name for p in tmp.iterdir())
    result = run_study(config, uri)
    return tmp, config, uri, before, created, result


def test_plan_before_running_lists_everything_to_run_and_creates_nothing(study):
    tmp, _, _, before, created, _ = study
    assert created == ["ptbxl", "study.yaml"]  # no tracking store, no workdir
    assert "15 searches, 15 trials, 0 already done, 15 to run" in before
    assert "pretrain-qrs-deepfake" in before and "-> ecg-qrs-deepfake" in before
    assert "stage 3 evaluate" in before and "  done" not in before
    assert "3 patient-grouped folds x 2 seeds x 5 models = 30 retrainings" in before
    assert "report-only" in before


def test_tables_have_every_approach_and_source_with_patient_intervals_and_holm(study, sample_dir):
    _, _, _, _, _, result = study
    table = pd.read_csv(result.tables["results.csv"])
    assert set(zip(table["approach"], table["source"])) == {
        ("majority", "-"), ("classical", "-"), ("baseline", "-"), ("single (qrs)", "ptbxl-a"),
        ("single (qrs)", "deepfake"), ("fused", "ptbxl-a"), ("fused", "deepfake")}
    labels = pd.read_parquet(next((result.tables["results.csv"].parents[2] / "data").glob("ptbxl-*")) /
                             "labels.parquet")
    cohort = labels[(labels["half"] == "B") & (labels["label"] >= 0)]
    assert (table["oof_n"] == len(cohort)).all()  # every single-label half-B record, out of fold
    majority = table[table["approach"] == "majority"].iloc[0]
    assert majority["oof_auc"] == pytest.approx(0.5)  # no skill is 0.5, not below it (per-fold priors, pooled)
    for metric in ("acc", "auc"):
        assert (table[f"oof_{metric}_low"] <= table[f"oof_{metric}"] + 1e-12).all()
        assert (table[f"oof_{metric}"] <= table[f"oof_{metric}_high"] + 1e-12).all()
    arms = table[~table["approach"].isin(["baseline", "majority", "classical"])]
    assert (arms["seeds"] == 2).all() and arms["seed_auc_sd"].notna().all()
    compared = table[table["approach"] != "baseline"]
    assert (compared["auc_diff_p"] >= 1 / 201 - 1e-9).all() and (compared["auc_diff_p"] <= 1).all()  # B = 200
    assert (arms["auc_diff_p_holm"] >= arms["auc_diff_p"] - 1e-12).all() and (arms["auc_diff_mdd"] > 0).all()
    text = result.tables["tables.md"].read_text()
    answer = text.split("### ")[0]
    assert answer.startswith("## The answer") and answer.count("vs baseline**") == 4
    assert "fused from DeepFake vs baseline" in answer and "Holm-adjusted p" in answer
    assert "Table 3" in text and "Table 4" in text and "Table 5" in text and "What touched what" in text
    assert "no setting differs" in text or "Settings that differ" in text
    per_class = pd.read_csv(result.tables["per_class_auc.csv"])
    assert per_class.loc[0, "n_NORM"] == (cohort["label"] == 0).sum()
    arch = result.tables["architectures.md"].read_text()
    assert "Table 1" in arch and "report-only" in arch and "val over trials" in arch


def test_no_record_is_scored_by_a_model_that_trained_or_early_stopped_on_it(study):
    """Each stage-3 model's own checkpoint record of its training and early-stopping rows against the rows it
    scored: disjoint in records and in patients, and every record scored exactly once per approach and seed."""
    tmp, _, _, _, _, result = study
    units = sorted((tmp / "work" / "evaluation" / "units").glob("*.npz"))
    assert len(units) == 5 * 3 * 2 and result.retrained == 30  # approaches x folds x seeds
    labels = pd.read_parquet(next((tmp / "work" / "data").glob("ptbxl-*")) / "labels.parquet")
    patient = labels["patient_id"].to_numpy()
    cohort = set(np.flatnonzero(((labels["half"] == "B") & (labels["label"] >= 0)).to_numpy()))
    scored: dict[str, list] = {}
    for path in units:
        with np.load(path) as z:
            test, seen = set(z["rows"]), set(z["train_rows"]) | set(z["val_rows"])
            assert test and len(z["val_rows"]) and not test & seen, path.name
            assert not set(patient[list(test)]) & set(patient[list(seen)]), path.name
            assert test | seen <= cohort
            scored.setdefault(path.name.rsplit("-fold", 1)[0], []).extend(z["rows"].tolist())
    assert len(scored) == 10
    for rows in scored.values():
        assert sorted(rows) == sorted(cohort)  # once each


def test_finetuned_models_start_from_the_pretrained_weights(study):
    _, _, uri, _, _, _ = study
    for source in ("ptbxl-a", "deepfake"):
        qrs = load_registered(f"models:/ecg-qrs-{source}@champion", uri)
        single = load_registered(f"models:/ecg-cls-single-{source}@champion", uri)
        assert single.frozen == 2
        for name in single.stage_names[:2]:  # frozen stages: the pretrained checkpoint's tensors, untouched
            for k, v in single.backbone.get_submodule(name).state_dict().items():
                assert torch.equal(v, qrs.backbone.get_submodule(name).state_dict()[k]), (source, name, k)
        fused = load_registered(f"models:/ecg-cls-fused-{source}@champion", uri)
        for target in ("hr", "pr", "qrs", "qt"):
            pre = load_registered(f"models:/ecg-{target}-{source}@champion", uri)
            first = fused.backbones[target][0].state_dict()
            assert all(torch.equal(v, pre.backbone[0].state_dict()[k]) for k, v in first.items()), (source, target)
        first_tensor = {t: next(iter(fused.backbones[t].state_dict().values())) for t in ("hr", "qt")}
        assert not torch.equal(first_tensor["hr"], first_tensor["qt"])  # four distinct backbones


def test_deepfake_finetunes_start_warm_from_the_ptbxl_a_finetune_of_their_approach(study):
    _, _, uri, _, _, _ = study
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("study-test").experiment_id
    run = lambda name: client.search_runs([experiment], f"tags.`study.search` = '{name}'")[0]
    for approach in ("single", "fused"):
        twin, warm = run(f"finetune-{approach}-ptbxl-a"), run(f"finetune-{approach}-deepfake")
        assert "warm_start_trials" not in twin.data.params
        assert warm.data.params["warm_start_trials"] == "1" and warm.data.params["warm_start_enqueued"] == "1"
        reused = client.download_artifacts(warm.info.run_id, "warm_start.json")
        assert twin.info.run_id in Path(reused).read_text()


def test_second_run_reuses_everything_and_trains_nothing(study):
    tmp, config, uri, _, _, first = study
    assert len(first.ran) == 15 and first.reused == []
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    count = lambda: len(client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000))
    runs_before = count()
    again = run_study(config, uri)
    assert again.ran == [] and len(again.reused) == 15 and again.retrained == 0
    assert count() == runs_before  # no new search or trial run
    assert pd.read_csv(again.tables["results.csv"]).equals(pd.read_csv(first.tables["results.csv"]))
    assert "15 already done, 0 to run" in plan(config, uri)
    shutil.rmtree(first.tables["results.csv"].parent)  # the report is gone, the saved retrainings are not
    rebuilt = run_study(config, uri)
    assert rebuilt.retrained == 0
    pd.testing.assert_frame_equal(pd.read_csv(rebuilt.tables["results.csv"]), pd.read_csv(first.tables["results.csv"]))


def test_changed_config_reruns_only_what_it_changes(study):
    tmp, _, uri, _, _, _ = study
    changed = write_config(tmp, "changed.yaml", finetune={"num_samples": 2})
    text = plan(changed, uri)
    assert "20 trials, 10 already done, 10 to run" in text
    for line in text.splitlines():
        if line.strip().startswith(("pretrain-", "arch-")):
            assert line.endswith("done") or "done  ->" in line, line
        if line.strip().startswith("finetune-"):
            assert "to run" in line, line
    from mlflow import MlflowClient

    from search.study.config import searches
    from search.study.run import warm_starts

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("study-test").experiment_id
    previous = {r.data.tags["study.search"]: r.info.run_id for r in client.search_runs(
        [experiment], "tags.`study.stage` = 'finetune'")}
    for s in searches(load_config(changed)):  # a search whose key changed starts from its previous key's trials
        if s.stage == "finetune":
            assert warm_starts(client, experiment, s, {}) == (previous[s.name],)


def test_a_stage_s_cv_reaches_its_searches_and_reruns_only_them(study):
    tmp, config, uri, _, _, _ = study
    from search.study.config import searches

    path = write_config(tmp, "cv.yaml", finetune={"cv": 3})
    cv = load_config(path)
    before = {s.name: s.key for s in searches(load_config(config))}
    for s in searches(cv):
        tuned = s.stage == "finetune"
        assert (s.spec(cv, uri).cv, s.key != before[s.name]) == ((3, True) if tuned else (1, False)), s.name
    for line in plan(path, uri).splitlines():
        if line.strip().startswith("finetune-"):
            assert "to run" in line, line


def test_cli_plan_runs_nothing(study, capsys):
    tmp, config, uri, _, _, _ = study
    assert main(["study", "--config", str(config), "--plan", "--tracking-uri", uri]) == 0
    assert "15 already done" in capsys.readouterr().out


@pytest.mark.parametrize("changes, message", [
    ({"pretrain": {"targets": ["hr", "rr"]}}, "pretrain.targets: unknown 'rr'"),
    ({"finetune": {"approaches": ["baseline", "double"]}}, "finetune.approaches: unknown 'double'"),
    ({"data": {"ptbxl": {"root": "/nowhere"}, "deepfake": {"count": 8}}}, "data.ptbxl.root '/nowhere' is not a PTB-XL"),
    ({"data": {"ptbxl": {"root": "ROOT", "rate": 100}}}, "source deepfake is used but data.deepfake is missing"),
    ({"pretrain": {"targets": ["hr"]}}, "finetune approach single on source ptbxl-a needs pretrained ecg-qrs-ptbxl-a"),
    ({"pretrain": {"num_samples": 0}}, "pretrain.num_samples must be a positive integer"),
    ({"finetune": {"cv": 0}}, "finetune.cv must be a positive integer"),
    ({"finetune": {"space": {"lr": {"low": 0.1, "high": 0.01}}}}, "inverted range"),
    ({"evaluate": {"n_boot": 10, "bootstrap": 3}}, "evaluate.bootstrap: unknown setting"),
    ({"evaluate": {"folds": 2}}, "evaluate.folds 2: cross-fitting needs at least 3 folds"),
    ({"evaluate": {"seeds": [0, 0]}}, "evaluate.seeds must be a list of distinct integers"),
])
def test_bad_config_is_one_input_error_before_anything_runs(tmp_path, sample_dir, changes, message, capsys):
    if "ROOT" in str(changes):
        changes = {"data": {"ptbxl": {"root": str(sample_dir / "ptbxl"), "rate": 100}}}
    else:
        (tmp_path / "ptbxl").symlink_to(sample_dir / "ptbxl")
    config = write_config(tmp_path, **changes)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(config)
    assert main(["study", "--config", str(config), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ecgsearch: error:") and "\n" not in err
    assert not (tmp_path / "work").exists()
