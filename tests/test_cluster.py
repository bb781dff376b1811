"""The cluster path for real: an MLflow server on PostgreSQL, a search on a two-node Ray cluster logging to it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import psycopg
import pytest
from mlflow import MlflowClient

from search.cli import main
from search.optuna_storage import open_optuna_storage
from search.server import start_server
from search.spec import SearchSpec
from search.tuner import run_search
from cluster_fixtures import free_port, postgres_uri, two_node_cluster  # noqa: F401 (fixtures)
from search_fixtures import small_ptbxl  # noqa: F401 (fixture)


def test_server_on_postgres_keeps_runs_and_proxies_artifacts(postgres_uri, tmp_path):
    destination = tmp_path / "artifacts"
    server = start_server(postgres_uri, destination, port=free_port())
    try:
        assert server.url.startswith("http://127.0.0.1:")
        client = MlflowClient(server.url)
        exp = client.create_experiment("cluster-check")
        run = client.create_run(exp).info
        for step in range(3):
            client.log_metric(run.run_id, "val_auc", 0.5 + step / 10, step=step)
        (tmp_path / "note.txt").write_text("from a worker")
        client.log_artifact(run.run_id, str(tmp_path / "note.txt"))
        client.set_terminated(run.run_id)
        assert run.artifact_uri.startswith("mlflow-artifacts:/")  # uploaded over HTTP, not written by the client

        history = MlflowClient(server.url).get_metric_history(run.run_id, "val_auc")
        assert [m.value for m in history] == pytest.approx([0.5, 0.6, 0.7])
        assert (destination / exp / run.run_id / "artifacts" / "note.txt").read_text() == "from a worker"
        with psycopg.connect(postgres_uri) as conn:  # the runs are in PostgreSQL, not in some fallback store
            assert conn.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (run.run_id,)).fetchone() == (1,)
    finally:
        server.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(server.process.pid, 0)  # the server's whole process group is gone


def test_server_cli_serves_until_terminated(postgres_uri, tmp_path):
    port = free_port()
    cli = subprocess.Popen([sys.executable, "-m", "search.cli", "server", "--backend-store-uri", postgres_uri,
                            "--artifacts-destination", str(tmp_path / "artifacts"), "--port", str(port)],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert f"MLflow tracking server on http://127.0.0.1:{port}" in cli.stdout.readline()
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200
    finally:
        cli.terminate()  # what `kill` of a backgrounded `ecgsearch server` does
        assert cli.wait(30) == 143
    with pytest.raises(urllib.error.URLError):  # the MLflow server went with it
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)


def test_server_cli_fails_cleanly_and_never_prints_the_password(postgres_uri, tmp_path, capsys):
    missing = postgres_uri.replace("postgres@", "postgres:s3cret-pw@") + "_missing"
    code = main(["server", "--backend-store-uri", missing, "--artifacts-destination", str(tmp_path / "a"),
                 "--port", str(free_port())])
    err = capsys.readouterr().err
    assert code == 2
    assert "postgres:***@" in err and "does not exist" in err and "createdb" in err
    assert "s3cret-pw" not in err


# Trials of about 1 s per epoch: a warm actor on the head finishes a trial in well under a second, so shorter trials
# could all run there, one after another, while the worker node is still starting its actor.
SPACE = {"arch": "cnn1d", "archs": {"cnn1d": {"width": 64, "depth": 6, "kernel": 9}}, "batch_size": 32, "patience": 9}


def trial_nodes(storage: Path) -> dict[int, str]:
    """trial number -> the node IP Tune recorded in each of its results (result.json of every trial dir)."""
    nodes = {}
    for path in storage.glob("trial_*/result.json"):
        results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        assert len({r["node_ip"] for r in results}) == 1
        nodes[results[0]["config"]["trial_number"]] = results[0]["node_ip"]
    return nodes


def test_search_on_two_nodes_logs_every_trial_and_the_study_to_postgres(two_node_cluster, postgres_uri, small_ptbxl, tmp_path):
    server = start_server(postgres_uri, tmp_path / "artifacts", port=free_port())
    try:
        result = run_search(SearchSpec(
            small_ptbxl, "classification", num_samples=4, max_epochs=4, max_concurrent=2, asha=False,
            space_overrides=SPACE, address=two_node_cluster.address, tracking_uri=server.url,
            storage_path=tmp_path / "ray_results", top_k=4, seed=1, optuna_storage=postgres_uri))
        nodes = trial_nodes(result.storage)
        assert sorted(nodes) == [0, 1, 2, 3]
        assert set(nodes.values()) == set(two_node_cluster.node_ips), nodes  # on the head and on the worker

        client = MlflowClient(server.url)
        children = client.search_runs([result.experiment_id],
                                      f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
        assert sorted(int(r.data.tags["trial_number"]) for r in children) == [0, 1, 2, 3]
        for run in children:
            assert run.info.status == "FINISHED"
            assert {"val_auc", "val_loss", "train_loss", "best_val_auc"} <= set(run.data.metrics)
            assert len({m.step for m in client.get_metric_history(run.info.run_id, "val_auc")}) == 4  # every epoch
            logged = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"model.pt", "val_predictions.npz"} <= logged
            files = tmp_path / "artifacts" / result.experiment_id / run.info.run_id / "artifacts"
            assert (files / "model.pt").stat().st_size > 0  # uploaded through the server into its destination

        # The Optuna study that chose the configs lives in the same database, beside MLflow's tables, and holds each
        # trial's best val_auc (the kept checkpoint's)
        study = optuna.load_study(study_name=result.name, storage=open_optuna_storage(postgres_uri))
        best = {int(r.data.tags["trial_number"]): r.data.metrics["best_val_auc"] for r in children}
        assert {t.number: t.value for t in study.trials} == pytest.approx(best)
    finally:
        server.stop()
