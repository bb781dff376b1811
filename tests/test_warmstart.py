"""Warm start from an earlier search recorded in a real sqlite MLflow store: its trials fitted to a changed space
(dims dropped, values clipped or skipped), added to the Optuna study that OptunaSearch then loads, the best
enqueued first, and the reuse listed on the new search's run."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from data_prep.errors import InputError
from search import warmstart
from search.space import SearchSpace, load_space_config
from search.spec import SearchSpec
from search.tracking import experiment_id
from search_fixtures import store  # noqa: F401

SPACE = {"arch": ["cnn1d", "inception1d"], "archs": {"cnn1d": {"width": [8, 16]}},
         "lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}, "batch_size": [32, 64], "schedule": "constant",
         "norm": "zscore"}
# an earlier search over a wider space: lr up to 0.1, resnet1d, a dim (norm) this space keeps fixed
EARLIER = [({"arch": "cnn1d", "arch.width": "16", "lr": "0.003", "batch_size": "64", "norm": "zscore"}, 0.81),
           ({"arch": "inception1d", "lr": "0.05", "batch_size": "32"}, 0.84),  # lr above the new range
           ({"arch": "resnet1d", "lr": "0.001", "batch_size": "32"}, 0.90),  # an architecture no longer searched
           ({"arch": "cnn1d", "arch.width": "8", "lr": "0.0002", "batch_size": "32"}, 0.70),
           ({"arch": "cnn1d", "arch.width": "8", "lr": "0.001", "batch_size": "32"}, None)]  # failed: no metric


def space() -> SearchSpace:
    return SearchSpace(load_space_config(None, SPACE), "baseline", {"data": "unused", "task": "classification"})


def earlier_search(uri: str, name: str = "earlier") -> str:
    """A finished search as ecgsearch records it: a parent run, a child per trial (params, best_val_auc)."""
    client = MlflowClient(uri)
    experiment = experiment_id(client, uri)  # artifacts beside the store, not in ./mlruns
    parent = client.create_run(experiment, run_name=name).info.run_id
    for number, (params, value) in enumerate(EARLIER):
        child = client.create_run(experiment, run_name=f"trial-{number}", tags={
            "mlflow.parentRunId": parent, "trial_id": f"t{number}", "trial_number": str(number)}).info.run_id
        metrics = [Metric("best_val_auc", value, int(time.time() * 1000), 1)] if value is not None else []
        client.log_batch(child, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(child, "FINISHED" if value is not None else "FAILED")
    client.set_terminated(parent, "FINISHED")
    return parent


def test_a_trial_is_fitted_to_the_new_space() -> None:
    s = space()
    inside = warmstart.fit_trial(s, "r0", EARLIER[0][0], 0.81)
    assert inside.params == {"cnn1d.width": 16, "lr": 0.003, "batch_size": 64, "arch": "cnn1d"}
    assert inside.dropped == ["norm (not searched here)"] and not inside.clipped
    above = warmstart.fit_trial(s, "r1", EARLIER[1][0], 0.84)
    assert "lr" not in above.params and above.point["lr"] == pytest.approx(1e-2)  # reused without it, enqueued clipped
    assert above.clipped == ["lr=0.05 -> 0.01"]
    gone = warmstart.fit_trial(s, "r2", EARLIER[2][0], 0.90)
    assert "arch" not in gone.params and gone.dropped == ["arch=resnet1d (not a choice of the space)"]


def test_seed_adds_the_finished_trials_and_enqueues_the_best(store, tmp_path) -> None:
    earlier_search(store)
    client = MlflowClient(store)
    parent = client.create_run(client.get_experiment_by_name("ecgsearch").experiment_id, run_name="new").info.run_id
    spec = SearchSpec("unused", name="new", warm_start=("earlier",), tracking_uri=store)
    storage = warmstart.seed(spec, space(), client, parent)
    import optuna

    study = optuna.load_study(study_name="new", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert sorted(t.value for t in done) == [0.70, 0.81, 0.84, 0.90]  # the failed trial is not reused
    fixed = [t.system_attrs["fixed_params"] for t in waiting]  # best first: 0.90, 0.84, 0.81
    assert [p.get("arch") for p in fixed] == [None, "inception1d", "cnn1d"] and fixed[1]["lr"] == pytest.approx(1e-2)
    reused = json.loads(Path(client.download_artifacts(parent, "warm_start.json", str(tmp_path))).read_text())
    assert len(reused["searches"]["earlier"]["trials"]) == 4 and len(reused["enqueued"]) == 3
    assert client.get_run(parent).data.params["warm_start_trials"] == "4"

    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space=space(), metric="best_val_auc", mode="max", study_name="new", storage=storage)
    first = searcher.suggest("trial-a")
    assert first["arch"] in ("cnn1d", "inception1d") and first["trial_number"] == 4  # after the 4 reused trials
    assert first["lr"] == pytest.approx(1e-3) and first["batch_size"] == 32  # the enqueued best (0.90)


def test_a_search_of_another_task_is_refused(store) -> None:
    earlier_search(store)
    client = MlflowClient(store)
    with pytest.raises(InputError, match="its trials have no best_val_mae"):
        warmstart.read_search(client, "earlier", space(), "val_mae")
