"""A worker node of a real two-node Ray cluster killed (SIGKILL to its whole process group: raylet, trial workers)
while one of its trials is training: Tune retries that trial on the head node from its last checkpoint and the search
finishes with every trial a complete child run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cluster_fixtures import two_node_cluster  # noqa: F401 (fixture)
from search_fixtures import small_ptbxl  # noqa: F401 (fixture)

# about 1 s per epoch (as in test_cluster.py), so the worker node is killed while its trial trains
SPACE = {"arch": "cnn1d", "archs": {"cnn1d": {"width": 64, "depth": 6, "kernel": 9}}, "batch_size": 32, "patience": 9}
WORKER_IP = "127.0.0.2"


def results(storage: Path) -> dict[int, list[dict]]:
    """trial number -> its results as Tune recorded them (result.json)."""
    out = {}
    for path in storage.glob("*/trial_*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["config"]["trial_number"]] = rows
    return out


@pytest.mark.timeout(300)
def test_worker_node_killed_mid_trial_its_trial_finishes_on_the_head(two_node_cluster, small_ptbxl: Path,
                                                                    tmp_path: Path) -> None:
    storage, killed = tmp_path / "ray_results", {}

    def kill_worker_node() -> None:
        """SIGKILL the worker node once a trial there has reported its first epoch."""
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not killed:
            for number, rows in results(storage).items():
                if rows[-1]["node_ip"] == WORKER_IP:
                    os.killpg(two_node_cluster.worker.pid, signal.SIGKILL)
                    killed.update(trial=number, epoch=rows[-1]["epoch"], at=time.monotonic())
                    break
            time.sleep(0.2)

    thread = threading.Thread(target=kill_worker_node, daemon=True)
    thread.start()
    # the driver in a fresh process: one that ran a local Ray before (token auth) gets every actor cancelled here
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    code = (f"from search.spec import SearchSpec; from search.tuner import run_search; "
            f"run_search(SearchSpec({str(small_ptbxl)!r}, 'classification', num_samples=3, "
            f"max_epochs=4, max_concurrent=2, asha=False, space_overrides={SPACE!r}, "
            f"address={two_node_cluster.address!r}, tracking_uri={uri!r}, storage_path={str(storage)!r}, "
            f"max_failures=2, seed=1, top_k=1, name='nodes'))")
    t0 = time.monotonic()
    driver = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                            env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    wall = time.monotonic() - t0
    thread.join(5)
    assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
    assert killed, "no trial ran on the worker node before the search ended"
    print(f"\nfault: worker node killed at trial {killed['trial']} epoch {killed['epoch']}: search {wall:.0f} s, "
          f"{wall - (killed['at'] - t0):.0f} s after the kill")

    rows = results(storage)[killed["trial"]]
    assert rows[0]["node_ip"] == WORKER_IP and rows[-1]["node_ip"] != WORKER_IP  # moved to the head
    epochs = [r["epoch"] for r in rows]
    assert epochs[-1] == 4 and epochs.count(1) == 1, epochs  # continued from its checkpoint, not from scratch
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("ecgsearch").experiment_id],
                                "attributes.run_name = 'nodes'")[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == 3
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(int(r.data.tags["trial_number"]) for r in runs) == [0, 1, 2]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {m.step for m in client.get_metric_history(run.info.run_id, "val_auc")} == {1, 2, 3, 4}
