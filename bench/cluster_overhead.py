"""What ecgsearch's cluster path adds to Ray Tune's own bookkeeping, in the shape of Ray's bookkeeping release test:
N trials of 1 s (two 0.5 s epochs, sleeping, so the shared cores measure orchestration rather than compute), 2 at a
time, reporting the trial contract's classification metrics each epoch:
  (a) a plain Tuner: random search over a few parameters, no MLflow;
  (b) ecgsearch's path: OptunaSearch (TPE) over ecgsearch's own define-by-run space (configs/search.yaml), the
      TrialRuns callback logging every trial as a child run to an MLflow server on a fresh PostgreSQL database,
      and with --optuna-storage the Optuna study in that database too;
then (b) on two Ray nodes of 1 CPU each against one node of 2 CPUs (trials per hour). Tune's own result files are on
in both. Usage: python bench/cluster_overhead.py [--trials 200] [--optuna-storage] [--parts] [--postgres URI]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # see tests/cluster_fixtures.py: joining nodes lack the token
import psycopg  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
import ray  # noqa: E402
from optuna.samplers import TPESampler  # noqa: E402
from ray import tune  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from data_prep.constants import CLASSES  # noqa: E402
from search import tracking  # noqa: E402
from search.optuna_storage import open_optuna_storage  # noqa: E402
from search.server import start_server  # noqa: E402
from search.space import SearchSpace, load_space_config  # noqa: E402

WORK_S, EPOCHS, AT_ONCE = 1.0, 2, 2
METRICS = ["epoch", "train_loss", "val_loss", "train_acc", "train_auc", "val_acc", "val_auc", "best_val_auc", "lr",
           *(f"val_f1_{c}" for c in CLASSES)]


def fake_trial(config: dict) -> None:
    """Sleeps WORK_S in EPOCHS epochs and reports every contract metric each epoch (values from the config)."""
    x = (hash(str(sorted(config.items()))) % 1000) / 1000
    best = 0.0
    for epoch in range(EPOCHS):
        time.sleep(WORK_S / EPOCHS)
        auc = 0.5 + 0.4 * x * (epoch + 1) / EPOCHS
        best = max(best, auc)
        tune.report({"epoch": epoch, "train_loss": 1 - auc, "val_loss": 1.1 - auc, "train_acc": auc, "train_auc": auc,
                     "val_acc": auc, "val_auc": auc, "best_val_auc": best, "lr": 1e-3,
                     **{f"val_f1_{c}": auc * 0.9 for c in CLASSES}})


def tuner(trials: int, storage: Path, name: str, **tune_kw) -> float:
    """Seconds for tuner.fit() of `trials` fake trials, 2 at a time, 1 CPU each (reused actors, as run_search)."""
    callbacks, param_space = tune_kw.pop("callbacks", []), tune_kw.pop("param_space", None)
    t = tune.Tuner(tune.with_resources(fake_trial, {"cpu": 1}), param_space=param_space,
                   tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=AT_ONCE, reuse_actors=True,
                                               **tune_kw),
                   run_config=tune.RunConfig(name=name, storage_path=str(storage), callbacks=callbacks, verbose=0))
    start = time.perf_counter()
    results = t.fit()
    seconds = time.perf_counter() - start
    assert not results.errors, results.errors
    return seconds


RANDOM = {"lr": tune.loguniform(1e-4, 1e-2), "batch_size": tune.choice([32, 64]),
          "arch": tune.choice(["inception1d", "resnet1d", "cnn1d"]), "weight_decay": tune.loguniform(1e-5, 1e-1)}


def ecgsearch_path(trials: int, storage: Path, name: str, optuna: bool = True, optuna_uri: str | None = None,
                   server_url: str | None = None) -> tuple[float, str | None]:
    """Seconds for the trials with OptunaSearch over ecgsearch's space (else random search) and, given a server,
    the TrialRuns callback logging to it; and the parent run id."""
    kw: dict = {"param_space": RANDOM}
    if optuna:
        space = SearchSpace(load_space_config(), "baseline", {"data": "unused", "task": "classification",
                                                              "max_epochs": EPOCHS, "seed": 0, "threads": 1})
        kw = {"search_alg": OptunaSearch(space=space, metric="val_auc", mode="max", sampler=TPESampler(seed=0),
                                         study_name=name,
                                         storage=open_optuna_storage(optuna_uri) if optuna_uri else None)}
    if server_url is None:
        return tuner(trials, storage, name, **kw), None
    client = MlflowClient(server_url)
    experiment = tracking.experiment_id(client, server_url, "cluster-overhead")
    parent = client.create_run(experiment, run_name=name).info.run_id
    seconds = tuner(trials, storage, name, callbacks=[tracking.TrialRuns(client, experiment, parent, "val_auc",
                                                                         trials, set())], **kw)
    client.set_terminated(parent)
    return seconds, parent


def lost(db_uri: str, parent: str, trials: int) -> tuple[int, int]:
    """(child runs, child runs missing any metric point) of a parent run, counted in the database."""
    with psycopg.connect(db_uri) as conn:
        rows = conn.execute(
            "SELECT t.run_uuid, m.key, count(DISTINCT m.step) FROM tags t JOIN metrics m ON m.run_uuid = t.run_uuid "
            "WHERE t.key = 'mlflow.parentRunId' AND t.value = %s GROUP BY t.run_uuid, m.key", (parent,)).fetchall()
    points: dict[str, dict[str, int]] = {}
    for run, key, n in rows:
        points.setdefault(run, {})[key] = n
    incomplete = sum(any(points[r].get(k, 0) != EPOCHS for k in METRICS) for r in points)
    return len(points), incomplete + (trials - len(points))


def on_cluster(nodes: int, cpus_each: int, tmp: Path) -> Cluster:
    """Ray nodes in this process's care, each with its own temp dir (not the machine's shared /tmp/ray)."""
    dirs = [tempfile.mkdtemp(prefix="rn", dir=tmp) for _ in range(nodes)]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_each, "include_dashboard": False,
                                                            "temp_dir": dirs[0]})
    for d in dirs[1:]:
        cluster.add_node(num_cpus=cpus_each, temp_dir=d)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    return cluster


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--optuna-storage", action="store_true", help="keep (b)'s Optuna study in the PostgreSQL database")
    p.add_argument("--parts", action="store_true", help="also time OptunaSearch alone and MLflow alone")
    p.add_argument("--postgres", default=os.environ.get("ECGSEARCH_POSTGRES_URI",
                                                        "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = p.parse_args()
    n = args.trials
    study = " + study in PostgreSQL" if args.optuna_storage else ""
    db = f"ecgsearch_bench_{uuid.uuid4().hex[:8]}"
    db_uri = urlunsplit(urlsplit(args.postgres)._replace(path=f"/{db}"))
    with psycopg.connect(args.postgres, autocommit=True) as admin, tempfile.TemporaryDirectory() as tmp:
        admin.execute(f'CREATE DATABASE "{db}"')
        server = start_server(db_uri, Path(tmp) / "artifacts", port=5000 + os.getpid() % 1000)
        try:
            optuna_uri = db_uri if args.optuna_storage else None
            cluster = on_cluster(1, AT_ONCE, Path(tmp))
            a, _ = ecgsearch_path(n, Path(tmp) / "ray", "plain", optuna=False)
            b, parent = ecgsearch_path(n, Path(tmp) / "ray", "one-node", optuna_uri=optuna_uri, server_url=server.url)
            parts = [(f"  of which OptunaSearch alone{study}",
                      ecgsearch_path(n, Path(tmp) / "ray", "optuna-only", optuna_uri=optuna_uri)[0]),
                     ("  of which MLflow alone (random search + TrialRuns)",
                      ecgsearch_path(n, Path(tmp) / "ray", "mlflow-only", optuna=False, server_url=server.url)[0]),
                     ] if args.parts else []
            ray.shutdown()
            cluster.shutdown()
            cluster = on_cluster(AT_ONCE, 1, Path(tmp))
            b2, parent2 = ecgsearch_path(n, Path(tmp) / "ray", "two-nodes", optuna_uri=optuna_uri,
                                         server_url=server.url)
            ray.shutdown()
            cluster.shutdown()
            checks = [lost(db_uri, parent, n), lost(db_uri, parent2, n)]
        finally:
            server.stop()
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

    ideal = n * WORK_S / AT_ONCE
    print(f"\n{n} trials of {WORK_S:.0f} s ({EPOCHS} epochs, {len(METRICS)} metrics each), {AT_ONCE} at a time; "
          f"ideal {ideal:.0f} s; slot-seconds per trial = wall x {AT_ONCE} / {n}")
    print(f"{'how':78s} {'wall s':>7s} {'s/trial':>7s} {'ratio':>6s} {'trials/h':>8s}")
    for how, secs in [("(a) plain Tuner, random search, no MLflow, 1 node x 2 CPU", a),
                      (f"(b) OptunaSearch + MLflow server on PostgreSQL{study}, 1 node x 2 CPU", b), *parts,
                      (f"(b) the same on 2 nodes x 1 CPU", b2)]:
        print(f"{how:78s} {secs:7.1f} {secs * AT_ONCE / n:7.2f} {secs / a:6.2f} {n / secs * 3600:8.0f}")
    print(f"ecgsearch adds {(b - a) * AT_ONCE / n:.2f} s per trial over (a) ({(b / a - 1) * 100:.0f}%); "
          f"two nodes / one node trials per hour: {b / b2:.2f}")
    for name, (runs, incomplete) in zip(("one node", "two nodes"), checks):
        print(f"{name}: {runs} of {n} child runs, {incomplete} missing a metric point "
              f"(each should hold {len(METRICS)} metrics x {EPOCHS} epochs)")


if __name__ == "__main__":
    main()
