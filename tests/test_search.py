"""End to end on a real local Ray (2 CPUs) and a real sqlite MLflow: child runs per trial nested under the search's
run, metrics per epoch, artifacts, an injected failure recorded while the others finish, ASHA pruning. (Inputs that
must fail before Ray starts: test_space.py.)"""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from search.spec import SearchSpec
from search.tuner import SearchResult, run_search
from search_fixtures import local_ray, small_ptbxl, store  # noqa: F401 (fixtures)

TINY = {"arch": "cnn1d", "archs": {"cnn1d": {"width": 8, "depth": 3}}, "batch_size": 32, "patience": 5}


@pytest.fixture(scope="module")
def search(local_ray, small_ptbxl: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[SearchResult, str]:
    """8 tiny trials of 4 epochs, 2 at a time under ASHA; trial 1 raises at its first epoch."""
    tmp = tmp_path_factory.mktemp("search")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    HANDLERS["before"] = signal.getsignal(signal.SIGINT)
    result = run_search(SearchSpec(small_ptbxl, "classification", num_samples=8, max_epochs=4, space_overrides=TINY,
                                   tracking_uri=uri, storage_path=tmp / "ray", name="tiny", seed=1, grace_period=1,
                                   top_k=5, optuna_storage=f"sqlite:///{tmp / 'optuna.db'}",
                                   fault={"trials": [1], "epoch": 1, "kind": "raise"}))
    HANDLERS["after"] = signal.getsignal(signal.SIGINT)
    return result, uri


HANDLERS: dict = {}


def test_ctrl_c_after_a_search_reaches_the_caller_again(search: tuple[SearchResult, str]) -> None:
    """Tune swaps in its own SIGINT handler while it runs; left installed, a Ctrl-C in whatever the caller does
    next (a study's stage 3) would only print Tune's warning. The search puts the caller's handler back."""
    assert HANDLERS["after"] is HANDLERS["before"]


def children(uri: str, result: SearchResult) -> list:
    return MlflowClient(uri).search_runs([result.experiment_id],
                                         f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")


def test_one_child_run_per_trial_nested_under_the_search(search: tuple[SearchResult, str]) -> None:
    result, uri = search
    runs = children(uri, result)
    assert len(runs) == len(result.table) == 8
    assert sorted(int(r.data.tags["trial_number"]) for r in runs) == list(range(8))
    parent = MlflowClient(uri).get_run(result.parent_run_id)
    assert parent.info.run_name == "tiny" and parent.info.status == "FINISHED"
    assert parent.data.tags["approach"] == "baseline" and parent.data.tags["task"] == "classification"
    assert parent.data.tags["dataset_hash"] and parent.data.tags["mlflow.source.git.commit"]
    assert parent.data.params["space.lr"] == "0.0001..0.01 log" and parent.data.params["space.arch"] == "'cnn1d'"
    for run in runs:  # params are the trial's config
        assert run.data.params["arch"] == "cnn1d" and run.data.params["arch.width"] == "8"


def test_failed_trial_is_failed_with_its_reason_while_the_others_finish(search: tuple[SearchResult, str]) -> None:
    result, uri = search
    by_number = {int(r.data.tags["trial_number"]): r for r in children(uri, result)}
    failed = by_number.pop(1)
    assert failed.info.status == "FAILED"
    assert "RuntimeError: injected fault: trial 1 raised at epoch 1" in failed.data.tags["failure_reason"]
    assert all(r.info.status == "FINISHED" for r in by_number.values())
    row = result.table.set_index("trial_number").loc[1]
    assert row["status"] == "failed" and "injected fault" in row["failure_reason"]


def test_metrics_per_epoch_and_asha_stops_some_trials_early(search: tuple[SearchResult, str]) -> None:
    result, uri = search
    client = MlflowClient(uri)
    table = result.table.set_index("trial_number")
    assert (table["status"] == "pruned").any() and (table["status"] == "finished").any()
    for run in children(uri, result):
        row = table.loc[int(run.data.tags["trial_number"])]
        if row["status"] == "failed":
            continue
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")]
        assert steps == list(range(1, int(row["epochs"]) + 1))
        assert {"train_loss", "val_loss", "val_acc", "val_f1_HYP", "best_val_auc", "train_lr"} <= set(run.data.metrics)
        assert run.data.tags["stopped_by"] == ("scheduler" if row["status"] == "pruned" else "trainer")
        if row["status"] == "pruned":
            assert row["epochs"] < 4


def test_artifacts_on_the_top_trials_and_the_search(search: tuple[SearchResult, str]) -> None:
    result, uri = search
    client = MlflowClient(uri)
    best = result.best
    assert best is not None and best["best_val_auc"] == result.table["best_val_auc"].max()
    top = set(result.table.sort_values("best_val_auc", ascending=False)["run_id"][:5])  # the fixture's top_k
    for run in children(uri, result):
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        if run.info.run_id in top:
            assert {"model.pt", "val_predictions.npz", "confusion_matrix.png", "roc_curves.png"} <= names
        else:
            assert "model.pt" not in names
    names = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"trials.csv", "search_space.yaml", "search_views.html", "optuna_study.db", "forest"} <= names
    assert {a.path for a in client.list_artifacts(result.parent_run_id, "forest")} == {
        "forest/model.pt", "forest/val_predictions.npz"}
    assert "features + forest candidate (for promote): val_auc" in result.summary()
    parent = client.get_run(result.parent_run_id)
    assert parent.data.metrics["best_val_auc"] == pytest.approx(best["best_val_auc"])
    assert parent.data.metrics["trials_failed"] == 1
    assert "#/experiments/" in result.summary() and "workflowType=machine_learning" in result.summary()


def test_regression_search_plots_predicted_vs_true(local_ray, small_ptbxl: Path, store: str, tmp_path: Path) -> None:
    result = run_search(SearchSpec(small_ptbxl, "regression", target="qrs", num_samples=2, max_epochs=1,
                                   space_overrides=TINY, tracking_uri=store, storage_path=tmp_path / "ray", top_k=1))
    assert result.metric == "val_mae" and result.best["best_val_mae"] > 0
    names = {a.path for a in MlflowClient(store).list_artifacts(result.best["run_id"])}
    assert {"model.pt", "predicted_vs_true.png"} <= names


def test_the_searcher_learns_each_trials_best_not_its_last(search: tuple[SearchResult, str]) -> None:
    """TPE is told the value of the checkpoint a trial keeps (its best epoch), the one promote ranks by."""
    import optuna

    result, uri = search
    storage = MlflowClient(uri).get_run(result.parent_run_id).data.params["optuna_storage"]
    study = optuna.load_study(study_name="tiny", storage=storage)
    told = {t.number: t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    client, fell = MlflowClient(uri), 0
    for run in children(uri, result):
        number = int(run.data.tags["trial_number"])
        if run.info.status == "FAILED":
            assert number not in told
            continue
        history = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_auc"), key=lambda m: m.step)]
        assert told[number] == pytest.approx(max(history))
        fell += history[-1] < max(history)
    assert fell, "no trial ended below its best epoch, so this search cannot tell best from last"


def test_a_search_that_reaches_its_time_budget_has_finished(local_ray, small_ptbxl: Path, store: str,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from search.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("arch: cnn1d\narchs: {cnn1d: {width: 8, depth: 3}}\nbatch_size: 16\npatience: 100\n")
    code = main(["search", "--data", str(small_ptbxl), "--task", "classification", "--num-samples", "50",
                 "--max-epochs", "40", "--time-budget", "25", "--config", str(space), "--tracking-uri", store,
                 "--storage-path", str(tmp_path / "ray"), "--name", "budgeted"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "stopped by the time budget" in out.out and "interrupted" not in out.err
    client = MlflowClient(store)
    parent = client.search_runs([client.get_experiment_by_name("ecgsearch").experiment_id],
                                "attributes.run_name = 'budgeted'")[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["cv"] == "3"  # the CLI's default on fewer than SMALL_DATA ECGs
    kids = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    ended = {k.data.tags["trial_number"]: (k.info.status, k.data.tags.get("stopped_by"),
                                           k.data.tags.get("failure_reason")) for k in kids}
    assert all(status == "FINISHED" for status, _, _ in ended.values()), ended  # none RUNNING (loaded: none may start)
    assert not kids or any(k.data.tags.get("stopped_by") == "time_budget" for k in kids)


def test_cv_none_means_three_folds_on_small_data_and_a_val_split_on_big(small_ptbxl: Path, store: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import search.spec

    spec = SearchSpec(small_ptbxl, "classification", tracking_uri=store, cv=None)
    assert spec.validate().cv == 3 and spec.replace(cv=2).validate().cv == 2
    assert spec.validate().space.constants["cv"] == 3  # what every trial's config gets
    monkeypatch.setattr(search.spec, "SMALL_DATA", 100)  # 120 ECGs are "big" now
    assert spec.validate().cv == 1
