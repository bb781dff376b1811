"""Ray Tune's overhead: the same short trials (one fixed config, trial numbers 0..N-1, so the same seeds), each on one
torch thread, run by a plain sequential loop of run_trial and by run_search (Ray Tune + OptunaSearch + MLflow
tracking, no pruning) one at a time (the same work: the ratio is the overhead) and two at a time (what a 2-core
machine gains). Ray starts once before the timed searches (its start is printed separately); the plain loop runs
before and after the searches and its mean is the baseline, so a change in machine load shows as their difference.
Usage: python bench/tune_overhead.py [--trials 6] [--epochs 3]"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray

from data_prep.ptbxl import prepare_ptbxl
from search.trainable import run_trial
from search.spec import SearchSpec
from search.tuner import run_search

REPO = Path(__file__).resolve().parents[1]
FIXED = {"arch": "cnn1d", "norm": "zscore", "lr": 3e-3, "weight_decay": 1e-2, "batch_size": 32, "patience": 99,
         "schedule": "constant", "aug": {a: {"p": 0.0, "strength": 0.1} for a in
                                         ("noise", "wander", "scale", "shift", "lead_dropout", "time_mask")},
         "archs": {"cnn1d": {"width": 16, "depth": 4, "kernel": 7, "dropout": 0.1, "head_dropout": 0.5}}}


def plain(data: Path, trials: int, epochs: int, threads: int) -> float:
    """Seconds for the trials one after another in this process, without Ray or MLflow."""
    config = {"data": str(data), "task": "classification", "max_epochs": epochs, "threads": threads,
              "arch": "cnn1d", **{k: v for k, v in FIXED.items() if k not in ("aug", "archs")},
              **{f"arch.{k}": v for k, v in FIXED["archs"]["cnn1d"].items()},
              **{f"aug.{a}.{p}": v for a, d in FIXED["aug"].items() for p, v in d.items()}}
    start = time.perf_counter()
    for n in range(trials):
        with tempfile.TemporaryDirectory() as tmp:
            run_trial({**config, "trial_number": n}, report=lambda *_: None, workdir=tmp)
    return time.perf_counter() - start


def tuned(data: Path, trials: int, epochs: int, concurrent: int, cpus: int, tmp: Path) -> float:
    start = time.perf_counter()
    run_search(SearchSpec(data, "classification", num_samples=trials, max_epochs=epochs, space_overrides=FIXED, asha=False,
               max_concurrent=concurrent, cpus_per_trial=cpus, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
               storage_path=tmp / "ray", name=f"overhead-{concurrent}x{cpus}"))
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    data = prepare_ptbxl(REPO / "sample_data" / "ptbxl", REPO / "prepared" / "ptbxl-100", rate=100)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        print(f"ray.init: {time.perf_counter() - start:.1f} s")
        before = plain(data, args.trials, args.epochs, 1)
        one = tuned(data, args.trials, args.epochs, 1, 1, Path(tmp))
        two = tuned(data, args.trials, args.epochs, 2, 1, Path(tmp))
        after = plain(data, args.trials, args.epochs, 1)
        ray.shutdown()
    base = (before + after) / 2
    rows = [("plain loop (before)", 1, before), ("plain loop (after)", 1, after),
            ("run_search, 1 at a time", 1, one), ("run_search, 2 at a time", 2, two)]
    print(f"\n{args.trials} trials x {args.epochs} epochs (cnn1d width 16, {data.name}), {os.cpu_count()} cores")
    print(f"{'how (1 torch thread per trial)':32s} {'at once':>7s} {'seconds':>8s} {'ratio':>6s} {'s/trial extra':>13s}")
    for how, at_once, secs in rows:
        print(f"{how:32s} {at_once:7d} {secs:8.1f} {secs / base:6.2f} {(secs - base) / args.trials:13.2f}")


if __name__ == "__main__":
    main()
