"""Warm start against cold. Per seed: an earlier search E (cold), then the new search twice on the same data, cold
(C) and warm-started from E's finished trials (W: `SearchSpec(warm_start=(E,))`, its top 3 enqueued first). Printed
per seed: C's best val AUC and the trials and seconds C needed to reach it, and the trials and seconds W needed to
reach the same value ("-" if it never did); then the means over seeds. Every search: a small cnn1d space (lr, width,
batch size, augmentation), ASHA, TPE after 4 random trials, 2 trials at a time on 1 CPU each.
Usage: python bench/warm_start.py [--data DIR] [--trials 8] [--epochs 3] [--seeds 3]
(without --data: the embedded sample's first 120 records at 100 Hz, prepared into a temporary directory)
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import ray
from mlflow import MlflowClient

from search.spec import SearchSpec
from search.tuner import run_search

REPO = Path(__file__).resolve().parents[1]
SPACE = {"arch": "cnn1d", "archs": {"cnn1d": {"width": [8, 16, 32], "depth": 3}}, "batch_size": [16, 32, 64],
         "lr": {"low": 1.0e-4, "high": 3.0e-2, "log": True}, "patience": 5, "schedule": "constant", "norm": "zscore"}


def sample_subset(tmp: Path, records: int = 120) -> Path:
    from data_prep.ptbxl import prepare_ptbxl

    root = tmp / "root"
    shutil.copytree(REPO / "sample_data" / "ptbxl", root, ignore=shutil.ignore_patterns("records500"))
    db = pd.read_csv(root / "ptbxl_database.csv")
    db.head(records).to_csv(root / "ptbxl_database.csv", index=False)
    return prepare_ptbxl(root, tmp / "prepared", split="random", workers=2)


def trajectory(uri: str, result, since: float | None = None) -> pd.DataFrame:
    """The search's trials in the order they ended: best val AUC, and seconds from the search's start (or from
    `since`, a time.time())."""
    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    runs = client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    rows = [{"end": r.info.end_time, "auc": r.data.metrics.get("best_val_auc", float("nan"))} for r in runs]
    table = pd.DataFrame(rows).sort_values("end").reset_index(drop=True)
    table["seconds"] = (table["end"] - (since * 1000 if since else parent.info.start_time)) / 1000
    table["trials"] = table.index + 1
    return table


def reach(table: pd.DataFrame, target: float) -> tuple[int | None, float | None]:
    hit = table[table["auc"] >= target - 1e-12]
    return (None, None) if hit.empty else (int(hit["trials"].iloc[0]), float(hit["seconds"].iloc[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data or sample_subset(tmp)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # one Ray for all
        base = SearchSpec(data, num_samples=args.trials, max_epochs=args.epochs, space_overrides=SPACE,
                          tracking_uri=uri, storage_path=tmp / "ray", grace_period=1, n_startup_trials=4, top_k=0,
                          address=ray.get_runtime_context().gcs_address)
        for seed in range(args.seeds):
            earlier = run_search(base.replace(seed=seed, name=f"earlier-{seed}"))
            cold = trajectory(uri, run_search(base.replace(seed=100 + seed, name=f"cold-{seed}")))
            warm = trajectory(uri, run_search(base.replace(seed=100 + seed, name=f"warm-{seed}",
                                                           warm_start=(earlier.name,))))
            target = cold["auc"].max()
            rows.append({"seed": seed, "target": target, "cold": reach(cold, target), "warm": reach(warm, target),
                         "warm_best": warm["auc"].max()})
        ray.shutdown()
    print(f"\n{args.trials} trials per search, up to {args.epochs} epochs, 2 at a time; target = the cold search's "
          "best val AUC")
    print("| seed | cold best | cold: trials, s to reach it | warm: trials, s to reach it | warm best |")
    print("|---:|---:|---:|---:|---:|")
    fmt = lambda r: "-" if r[0] is None else f"{r[0]}, {r[1]:.0f} s"  # noqa: E731
    for r in rows:
        print(f"| {r['seed']} | {r['target']:.4f} | {fmt(r['cold'])} | {fmt(r['warm'])} | {r['warm_best']:.4f} |")
    reached = [r for r in rows if r["warm"][0] is not None]
    cold_t = sum(r["cold"][0] for r in rows) / len(rows)
    cold_s = sum(r["cold"][1] for r in rows) / len(rows)
    if reached:
        warm_t = sum(r["warm"][0] for r in reached) / len(reached)
        warm_s = sum(r["warm"][1] for r in reached) / len(reached)
        print(f"mean: cold {cold_t:.1f} trials / {cold_s:.0f} s; warm {warm_t:.1f} trials / {warm_s:.0f} s "
              f"(reached in {len(reached)} of {len(rows)} seeds): warm/cold trials {warm_t / cold_t:.2f}, "
              f"seconds {warm_s / cold_s:.2f}")
    else:
        print(f"mean: cold {cold_t:.1f} trials / {cold_s:.0f} s; warm never reached the cold best")


if __name__ == "__main__":
    main()
