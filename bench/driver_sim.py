"""Can the driver keep up with 32 trials at once? A simulation of a cluster on this machine: one local Ray with 32
logical CPUs, N trials that sleep through 10 epochs of 1 s each (so the cores measure the driver, not compute) and
report the trial contract's full classification metric set every epoch, 32 at a time:
  (a) a plain Tuner: random search over a few parameters, no MLflow, FIFO (Ray Tune's own bookkeeping);
  (b) ecgsearch's driver: OptunaSearch (TPE) over ecgsearch's define-by-run space (configs/search.yaml), FIFO, and
      the TrialRuns callback logging every trial as a child run to an MLflow server (search/server.py) on a fresh
      PostgreSQL database (created and dropped here).
Printed: trials per hour against the ideal (32 slots / 10 s per trial), the driver's CPU seconds per report, the
latency of each MLflow and Optuna call the driver makes, and whether every child run holds every metric of every
epoch (counted in the database). FIFO so that every trial runs its 10 epochs (ASHA would stop some).

Usage: python bench/driver_sim.py [--trials 320] [--slots 32] [--epochs 10] [--epoch-s 1]
       [--arms plain,background,waiting]
       python bench/driver_sim.py --trials 64      # a quick run (about 2 minutes)
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import ray
from mlflow import MlflowClient
from optuna.samplers import TPESampler
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from data_prep.constants import CLASSES
from search import tracking
from search.server import start_server
from search.space import SearchSpace, load_space_config

RANDOM = {"lr": tune.loguniform(1e-4, 1e-2), "batch_size": tune.choice([32, 64]),
          "arch": tune.choice(["inception1d", "resnet1d", "cnn1d"]), "weight_decay": tune.loguniform(1e-5, 1e-1)}


def contract_result(epoch: int, auc: float, best: float) -> dict:
    """What the trainable reports for a classification epoch (search/trainable.py's contract)."""
    return {"epoch": epoch, "train_loss": 1 - auc, "val_loss": 1.1 - auc, "train_acc": auc, "train_auc": auc,
            "val_acc": auc, "val_auc": auc, "best_val_auc": best, "lr": 1e-3,
            **{f"val_f1_{c}": auc * 0.9 for c in CLASSES}}


# the MLflow metric names TrialRuns logs for each report (with Tune's time_this_iter_s)
LOGGED = sorted(m.key for m in tracking.epoch_metrics({**contract_result(1, 0.5, 0.5), "time_this_iter_s": 1.0,
                                                      "training_iteration": 1}))


def sleeping_trial(config: dict) -> None:
    """Sleeps config['epoch_s'] per epoch for config['epochs'] epochs, reporting every contract metric each epoch
    (epochs counted from 1, as the trainable does)."""
    x = (hash(str(sorted(config.items()))) % 1000) / 1000
    best, epochs = 0.0, int(config["epochs"])
    for epoch in range(1, epochs + 1):
        time.sleep(float(config["epoch_s"]))
        auc = 0.5 + 0.4 * x * epoch / epochs
        best = max(best, auc)
        tune.report(contract_result(epoch, auc, best))


class Latency:
    """Seconds per call, by call name."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)

    def timed(self, name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls[name].append(time.perf_counter() - start)
        return call

    def rows(self, prefix: str) -> list[str]:
        out = []
        for name, secs in sorted(self.calls.items()):
            ms = sorted(s * 1000 for s in secs)
            out.append(f"  {prefix}.{name:24s} {len(ms):6d} calls  median {statistics.median(ms):7.1f} ms  "
                       f"p95 {ms[int(0.95 * (len(ms) - 1))]:7.1f} ms  total {sum(ms) / 1000:6.1f} s")
        return out


class TimedClient:
    """An MlflowClient whose every call the driver makes is timed."""

    def __init__(self, client: MlflowClient, latency: Latency):
        self._client, self._latency = client, latency

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        return self._latency.timed(name, attr) if callable(attr) else attr


class TimedOptunaSearch(OptunaSearch):
    """OptunaSearch whose calls from Tune's loop are timed (suggest, and the result/complete bookkeeping)."""

    latency: Latency

    def suggest(self, trial_id: str) -> Any:
        return self.latency.timed("suggest", super().suggest)(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.latency.timed("on_trial_result", super().on_trial_result)(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.latency.timed("on_trial_complete", super().on_trial_complete)(trial_id, result, error)


class WaitingTrialRuns(tracking.TrialRuns):
    """TrialRuns with every MLflow write waiting for the store in Tune's loop (as before search/runlog.py)."""

    client = property(lambda self: self._client, lambda self, client: setattr(self, "_client", client))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        pass


def run(args: argparse.Namespace, storage: Path, name: str, server_url: str | None = None,
        optuna_latency: Latency | None = None, mlflow_latency: Latency | None = None, waiting: bool = False) -> dict:
    """One Tuner.fit of the sleeping trials; wall seconds, driver CPU seconds, and the parent run id when logged."""
    constants = {"epochs": args.epochs, "epoch_s": args.epoch_s}
    callbacks, parent, kw, param_space = [], None, {}, None
    if server_url is None:
        param_space = {**RANDOM, **constants}
    else:
        space = SearchSpace(load_space_config(), "baseline", {"data": "unused", "task": "classification",
                                                              "max_epochs": args.epochs, "seed": 0, "threads": 1,
                                                              **constants})
        searcher = TimedOptunaSearch(space=space, metric="val_auc", mode="max", sampler=TPESampler(seed=0),
                                     study_name=name)
        searcher.latency = optuna_latency
        kw["search_alg"] = searcher
        client = TimedClient(MlflowClient(server_url), mlflow_latency)
        experiment = tracking.experiment_id(client._client, server_url, "driver-sim")
        parent = client._client.create_run(experiment, run_name=name).info.run_id
        runs = WaitingTrialRuns if waiting else tracking.TrialRuns
        callbacks = [runs(client, experiment, parent, "val_auc", args.trials, set())]
    tuner = tune.Tuner(
        tune.with_resources(sleeping_trial, {"cpu": 1}), param_space=param_space,
        tune_config=tune.TuneConfig(num_samples=args.trials, max_concurrent_trials=args.slots, reuse_actors=True,
                                    **kw),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), callbacks=callbacks, verbose=0))
    cpu0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    results = tuner.fit()
    wall, cpu1 = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    assert not results.errors, results.errors
    if parent:
        client._client.set_terminated(parent)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {"wall": wall, "cpu": cpu, "parent": parent}


def completeness(db_uri: str, parent: str, trials: int, epochs: int) -> tuple[int, int]:
    """(child runs, child runs missing any metric of any epoch), counted in the database."""
    with psycopg.connect(db_uri) as conn:
        rows = conn.execute(
            "SELECT t.run_uuid, m.key, count(DISTINCT m.step) FROM tags t JOIN metrics m ON m.run_uuid = t.run_uuid "
            "WHERE t.key = 'mlflow.parentRunId' AND t.value = %s GROUP BY t.run_uuid, m.key", (parent,)).fetchall()
    points: dict[str, dict[str, int]] = defaultdict(dict)
    for run_id, key, n in rows:
        points[run_id][key] = n
    incomplete = sum(any(points[r].get(k, 0) != epochs for k in LOGGED) for r in points)
    return len(points), incomplete + (trials - len(points))


def group_cpu(pgid: int) -> float:
    """CPU seconds of the live processes of a process group (the MLflow server and its workers), from /proc."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # after the command name: state, ppid, pgrp, ..., utime (12th), stime (13th)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


ARMS = {"plain": "(a) plain Tuner, random search, no MLflow",
        "background": "(b) OptunaSearch + TrialRuns (writes in the background) -> MLflow on PostgreSQL",
        "waiting": "(c) the same, every MLflow write waited for in Tune's loop"}


def report(args: argparse.Namespace, arm: str, r: dict) -> str:
    """An arm's row (trials per hour against the ideal, driver CPU per report) and, when it logged to MLflow, its
    latencies per call and completeness."""
    ideal = args.slots / (args.epochs * args.epoch_s) * 3600
    reports, rate = args.trials * args.epochs, args.trials / r["wall"] * 3600
    lines = [f"{ARMS[arm]:82s} {r['wall']:7.1f} {rate:8.0f} {rate / ideal:7.2f} {r['cpu'] / reports * 1000:20.2f}"]
    if arm != "plain":
        runs, incomplete = r["check"]
        lines += [f"{ARMS[arm][:3]} MLflow server CPU {r['server_cpu']:.1f} s ({r['server_cpu'] / reports * 1000:.2f}"
                  " ms per report); latency per call the driver made:",
                  *r["latency"][1].rows("mlflow"), *r["latency"][0].rows("optuna"),
                  f"{ARMS[arm][:3]} child runs: {runs} of {args.trials}; {incomplete} missing a metric of an epoch "
                  f"(each should hold {len(LOGGED)} metrics x {args.epochs} epochs)"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=320)
    p.add_argument("--slots", type=int, default=32, help="logical CPUs of the local Ray = trials at once")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--epoch-s", type=float, default=1.0)
    p.add_argument("--arms", default="plain,background", help=f"which of {','.join(ARMS)} to run, in order")
    p.add_argument("--postgres", default=os.environ.get("ECGSEARCH_POSTGRES_URI",
                                                        "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = p.parse_args()
    db = f"ecgsearch_driver_sim_{uuid.uuid4().hex[:8]}"
    db_uri = urlunsplit(urlsplit(args.postgres)._replace(path=f"/{db}"))
    header = (f"{args.trials} trials x {args.epochs} epochs of {args.epoch_s:g} s, {args.slots} at a time on one local "
              f"Ray of {args.slots} logical CPUs ({os.cpu_count()} real cores, shared); {len(LOGGED)} metrics per "
              f"report; ideal {args.slots / (args.epochs * args.epoch_s) * 3600:.0f} trials/h "
              f"({args.slots} / {args.epochs * args.epoch_s:g} s)\n"
              f"{'how':82s} {'wall s':>7s} {'trials/h':>8s} {'x ideal':>7s} {'driver CPU ms/report':>20s}")
    done: dict[str, dict] = {}
    with psycopg.connect(args.postgres, autocommit=True) as admin, tempfile.TemporaryDirectory() as tmp:
        admin.execute(f'CREATE DATABASE "{db}"')
        server = start_server(db_uri, Path(tmp) / "artifacts", port=5000 + os.getpid() % 1000)
        try:
            ray.init(address="local", num_cpus=args.slots, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR", _temp_dir=tempfile.mkdtemp(prefix="ray", dir=tmp))
            for arm in args.arms.split(","):
                if arm == "plain":
                    done[arm] = run(args, Path(tmp) / "ray", arm)
                else:
                    latency, server_cpu = (Latency(), Latency()), group_cpu(server.process.pid)
                    done[arm] = run(args, Path(tmp) / "ray", arm, server.url, *latency, waiting=arm == "waiting")
                    done[arm].update(latency=latency, server_cpu=group_cpu(server.process.pid) - server_cpu,
                                     check=completeness(db_uri, done[arm]["parent"], args.trials, args.epochs))
                print(f"\n{header}\n{report(args, arm, done[arm])}", flush=True)  # each arm as it ends
            ray.shutdown()
        finally:
            server.stop()
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    print(f"\n{header}\n" + "\n".join(report(args, arm, r).splitlines()[0] for arm, r in done.items()))


if __name__ == "__main__":
    main()
