"""MLflow writes off the driver's loop (search/runlog.py) against a real sqlite store: everything queued arrives, in
order per run; a failed write is raised at flush; the client survives Tune's pickling; a resumed search's child run
gets back the epochs Tune recorded that the killed driver had not yet written."""
from __future__ import annotations

import json
import pickle
import time

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from search.runlog import BackgroundClient
from search.tracking import TrialRuns
from search_fixtures import store  # noqa: F401


def new_run(client: MlflowClient, **tags: str) -> str:
    experiment = client.get_experiment_by_name("x") or client.get_experiment(client.create_experiment("x"))
    return client.create_run(experiment.experiment_id, tags=tags).info.run_id


def test_every_queued_write_arrives_in_order(store) -> None:
    client = MlflowClient(store)
    runs = [new_run(client), new_run(client)]
    writer = BackgroundClient(client)
    now = int(time.time() * 1000)
    for step in range(1, 31):  # more than one log_batch of metrics would hold once merged
        for run in runs:
            writer.log_batch(run, metrics=[Metric(f"m{i}", step + i, now, step) for i in range(40)])
    for run in runs:
        writer.set_tag(run, "state", "finished")
        writer.set_terminated(run, "FINISHED")
    writer.flush()
    for run in runs:
        got = client.get_run(run)
        assert got.info.status == "FINISHED" and got.data.tags["state"] == "finished"
        assert [m.step for m in client.get_metric_history(run, "m39")] == list(range(1, 31))
        assert got.data.metrics["m0"] == 30  # the last step's value: ordered within the run


def test_a_failed_write_is_raised_at_flush(store) -> None:
    writer = BackgroundClient(MlflowClient(store))
    writer.set_tag("0" * 32, "k", "v")  # no such run
    with pytest.raises(RuntimeError, match="an MLflow write failed in the background"):
        writer.flush()
    writer.flush()  # raised once; the writer goes on


def test_trial_runs_pickle_with_their_writer(store) -> None:
    client = MlflowClient(store)
    runs = pickle.loads(pickle.dumps(TrialRuns(client, "0", "parent", "val_auc", 1, set())))
    run = new_run(client)
    runs.client.set_tag(run, "after", "unpickling")
    runs.client.flush()
    assert client.get_run(run).data.tags["after"] == "unpickling"


def test_reattach_logs_the_epochs_tune_recorded_but_mlflow_lacks(store, tmp_path) -> None:
    client = MlflowClient(store)
    results = [{"epoch": e, "training_iteration": e, "train_loss": 1.0 / e, "val_auc": 0.5 + e / 10,
                "time_this_iter_s": 1.0} for e in (1, 2, 3)]
    (tmp_path / "result.json").write_text("".join(json.dumps(r) + "\n" for r in results))  # as Tune writes it
    run = new_run(client, trial_id="t0", trial_number="0", trial_dir=str(tmp_path))
    now = int(time.time() * 1000)
    client.log_batch(run, metrics=[Metric("train_loss", 1.0, now, 1), Metric("val_auc", 0.6, now, 1)])  # epoch 1 only
    runs = TrialRuns(client, "0", "parent", "val_auc", 1, set())
    runs.reattach(client.get_run(run))
    runs.client.flush()
    assert [m.step for m in client.get_metric_history(run, "val_auc")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run, "train_loss")] == [1, 2, 3]  # epoch 1 not twice
    assert runs.trials[0]["run_id"] == run
