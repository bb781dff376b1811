"""What each fault costs a search: trials lost, trials duplicated, epochs trained twice and extra wall time against
the same search without the fault, in the same run (real processes, real Ray, sqlite MLflow, 2 CPUs).

    python bench/faults.py [--trials 8] [--epochs 3]

Faults: the driver killed with SIGKILL (its process group) after 3 trials ended, then `ecgsearch resume`; Ctrl-C
(SIGINT to the driver) after 3 trials ended, then `ecgsearch resume`; two trials' processes dying at epoch 2
(max_failures 1: retried from their checkpoints); the MLflow server stopped for 20 s after the first epoch is logged.
Driver-side times include each driver's start (Python imports, Ray start: about 15 s).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
SPACE = "arch: cnn1d\narchs: {cnn1d: {width: 8, depth: 3}}\nbatch_size: 32\npatience: 5\n"


def prepare(tmp: Path) -> Path:
    """The first 120 records of the embedded PTB-XL sample at 100 Hz (as the tests use)."""
    from data_prep.ptbxl import prepare_ptbxl

    root = tmp / "root"
    shutil.copytree(REPO / "sample_data" / "ptbxl", root, ignore=shutil.ignore_patterns("records500"))
    db = pd.read_csv(root / "ptbxl_database.csv")
    db.head(120).to_csv(root / "ptbxl_database.csv", index=False)
    return prepare_ptbxl(root, tmp / "prepared", split="random", workers=1)


def cli(args: list[str], stop_after: int | None = None, sig: int | None = None) -> float:
    """Run `ecgsearch ARGS` in its own process group; with `sig`, send it once `stop_after` trials ended (SIGKILL to
    the whole group, SIGINT to the driver). Returns the wall time."""
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "search.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ended = 0
    for line in p.stdout:
        ended += re.match(r"\[\d+/\d+\] trial", line) is not None
        if sig is not None and ended == stop_after:
            os.killpg(p.pid, sig) if sig == signal.SIGKILL else p.send_signal(sig)
            sig = None
    p.wait()
    return time.monotonic() - t0


def count(uri: str, trials: int) -> tuple[int, int, int]:
    """(trials lost, trials duplicated, epochs logged twice) from the search's child runs in MLflow."""
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.trial_id != ''")
    numbers = [int(r.data.tags["trial_number"]) for r in runs]
    finished = {int(r.data.tags["trial_number"]) for r in runs if r.info.status == "FINISHED"}
    twice = sum(len(h) - len({m.step for m in h})
                for h in (client.get_metric_history(r.info.run_id, "val_auc") for r in runs))
    return trials - len(finished), len(numbers) - len(set(numbers)), twice


def search_args(data: Path, work: Path, uri: str, trials: int, epochs: int) -> list[str]:
    (work / "space.yaml").write_text(SPACE)
    return ["search", "--data", str(data), "--task", "classification", "--num-samples", str(trials), "--max-epochs",
            str(epochs), "--config", str(work / "space.yaml"), "--tracking-uri", uri, "--storage-path",
            str(work / "ray"), "--name", "bench", "--seed", "1"]


def in_process_search(data: Path, work: Path, uri: str, trials: int, epochs: int, fault: dict | None) -> float:
    """run_search in a fresh interpreter (with max_failures 1 and an optional fault); its wall time."""
    code = (f"from search.spec import SearchSpec; from search.tuner import run_search; "
            f"run_search(SearchSpec({str(data)!r}, 'classification', num_samples={trials}, "
            f"max_epochs={epochs}, config={str(work / 'space.yaml')!r}, tracking_uri={uri!r}, "
            f"storage_path={str(work / 'ray')!r}, seed=1, max_failures=1, fault={fault!r}))")
    (work / "space.yaml").write_text(SPACE)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)
    return time.monotonic() - t0


def outage_search(data: Path, work: Path, trials: int, epochs: int, down_s: float | None) -> tuple[float, str]:
    """A search logging to an MLflow server (sqlite backend); with `down_s`, the server is stopped that long once the
    first epoch is logged, then started again on the same port."""
    from cluster_fixtures import free_port
    from search.server import start_server

    backend, port = f"sqlite:///{work / 'server.db'}", free_port()
    servers = [start_server(backend, work / "artifacts", port=port)]

    def outage() -> None:
        client = MlflowClient(servers[0].url)
        while not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id],
                                                                                        "metrics.val_auc >= 0")]:
            time.sleep(0.3)
        servers[0].stop()
        time.sleep(down_s)
        servers.append(start_server(backend, work / "artifacts", port=port))

    if down_s:
        threading.Thread(target=outage, daemon=True).start()
    try:
        wall = cli(search_args(data, work, servers[0].url, trials, epochs))
    finally:
        for s in servers:
            s.stop()
    return wall, backend


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args()
    n, e = a.trials, a.epochs
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prepare(tmp)

        def work(name: str) -> tuple[Path, str]:
            (tmp / name).mkdir()
            return tmp / name, f"sqlite:///{tmp / name / 'mlflow.db'}"

        w, uri = work("baseline")
        base = cli(search_args(data, w, uri, n, e))
        rows.append(("none (baseline CLI search)", *count(uri, n), base, 0.0))
        for name, sig in (("driver SIGKILL, then resume", signal.SIGKILL), ("Ctrl-C, then resume", signal.SIGINT)):
            w, uri = work(name.split(",")[0].replace(" ", "-"))
            wall = cli(search_args(data, w, uri, n, e), stop_after=3, sig=sig)
            wall += cli(["resume", "bench", "--tracking-uri", uri])
            rows.append((name, *count(uri, n), wall, wall - base))

        w, uri = work("crash-base")
        crash_base = in_process_search(data, w, uri, n, e, None)
        w, uri = work("crash")
        wall = in_process_search(data, w, uri, n, e, {"trials": [0, 1], "epoch": 2, "kind": "exit"})
        rows.append(("2 trial processes die at epoch 2 (max_failures 1)", *count(uri, n), wall, wall - crash_base))

        w, _ = work("server-base")
        server_base, _ = outage_search(data, w, n, e, None)
        w, _ = work("server-down")
        wall, backend = outage_search(data, w, n, e, 20)
        rows.append(("MLflow server down 20 s (+ its restart)", *count(backend, n), wall, wall - server_base))

    table = pd.DataFrame(rows, columns=["fault", "trials lost", "trials duplicated", "epochs trained twice",
                                        "wall s", "extra wall s"])
    print(f"{n} trials of up to {e} epochs (tiny cnn1d, 120 records), 2 at a time, on {os.cpu_count()} CPUs")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.0f}"))
    print(f"baselines: CLI search {base:.0f} s, run_search with max_failures 1 {crash_base:.0f} s, "
          f"search logging to an MLflow server {server_base:.0f} s")


if __name__ == "__main__":
    main()
