"""The cluster path for real: an MLflow server on PostgreSQL, a search on a two-node Ray cluster logging to it."""
from __future__ import annotations

import os
import signal

import mlflow
import psycopg
import pytest
from mlflow import MlflowClient

from search.cli import main
from search.server import start_server
from cluster_fixtures import free_port, postgres_uri, two_node_cluster  # noqa: F401 (fixtures)


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


def test_server_cli_fails_cleanly_and_never_prints_the_password(postgres_uri, tmp_path, capsys):
    missing = postgres_uri.replace("postgres@", "postgres:s3cret-pw@") + "_missing"
    code = main(["server", "--backend-store-uri", missing, "--artifacts-destination", str(tmp_path / "a"),
                 "--port", str(free_port())])
    err = capsys.readouterr().err
    assert code == 2
    assert "postgres:***@" in err and "does not exist" in err and "createdb" in err
    assert "s3cret-pw" not in err
