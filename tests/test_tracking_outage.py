"""The MLflow tracking server stopped for 20 s in the middle of a search and started again on the same port (sqlite
backend): the driver's MLflow client retries (MLflow's HTTP retries: 7, backoff factor 2, about 4 minutes in all), the
trials keep training meanwhile, and afterwards every trial has every epoch's metrics."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cluster_fixtures import free_port
from search.server import start_server
from search.spec import SearchSpec
from search.tuner import run_search
from search_fixtures import local_ray, small_ptbxl  # noqa: F401 (fixtures)

TINY = {"arch": "cnn1d", "archs": {"cnn1d": {"width": 8, "depth": 3}}, "batch_size": 32, "patience": 5}
OUTAGE_S = 20


@pytest.mark.timeout(300)
def test_server_down_for_20_s_mid_search_loses_no_metric(local_ray, small_ptbxl: Path, tmp_path: Path) -> None:
    backend, port = f"sqlite:///{tmp_path / 'mlflow.db'}", free_port()
    servers = [start_server(backend, tmp_path / "artifacts", port=port)]
    outage: dict[str, float] = {}

    def stop_and_restart() -> None:
        """Once the first epoch of any trial is logged: stop the server, wait 20 s, start it on the same port."""
        client = MlflowClient(servers[0].url)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            experiments = [e.experiment_id for e in client.search_experiments()]
            if experiments and client.search_runs(experiments, "metrics.val_auc >= 0"):
                break
            time.sleep(0.3)
        servers[0].stop()
        outage["down"] = time.monotonic()
        time.sleep(OUTAGE_S)
        servers.append(start_server(backend, tmp_path / "artifacts", port=port))
        outage["up"] = time.monotonic()

    thread = threading.Thread(target=stop_and_restart, daemon=True)
    try:
        thread.start()
        t0 = time.monotonic()
        result = run_search(SearchSpec(small_ptbxl, "classification", num_samples=3, max_epochs=3, space_overrides=TINY,
                            asha=False, tracking_uri=servers[0].url, storage_path=tmp_path / "ray", top_k=1))
        wall = time.monotonic() - t0
        thread.join(60)
        assert outage["up"] - outage["down"] >= OUTAGE_S and outage["down"] - t0 < wall  # it was down mid-search
        print(f"\nfault: tracking server down {outage['up'] - outage['down']:.0f} s mid-search: search {wall:.0f} s")

        client = MlflowClient(servers[-1].url)
        runs = client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
        assert sorted(int(r.data.tags["trial_number"]) for r in runs) == [0, 1, 2]
        for run in runs:
            assert run.info.status == "FINISHED"
            for name in ("val_auc", "val_loss", "train_loss", "best_val_auc"):
                steps = {m.step for m in client.get_metric_history(run.info.run_id, name)}
                assert steps == {1, 2, 3}, (run.data.tags["trial_number"], name, steps)
        assert client.get_run(result.parent_run_id).info.status == "FINISHED"
        assert "model.pt" in {a.path for a in client.list_artifacts(result.best["run_id"])}
    finally:
        for server in servers:
            server.stop()
