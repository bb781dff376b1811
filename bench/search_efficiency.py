"""Search efficiency at equal wall time: Optuna TPE with ASHA pruning against random search without pruning, each
given the same time budget on the embedded sample (all rows at 100 Hz, the demo's space, 2 trials at a time), over
a few seeds. Prints the best validation macro AUC each reached, trials started and epochs trained.
Usage: python bench/search_efficiency.py [--budget 75] [--seeds 0 1] [--max-epochs 8]"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from data_prep.ptbxl import prepare_ptbxl
from search.spec import SearchSpec
from search.tuner import run_search

REPO = Path(__file__).resolve().parents[1]
METHODS = {"TPE + ASHA": {"sampler": "tpe", "asha": True}, "random, no pruning": {"sampler": "random", "asha": False}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--budget", type=float, default=75, help="seconds per search")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--max-epochs", type=int, default=8)
    args = p.parse_args()
    data = prepare_ptbxl(REPO / "sample_data" / "ptbxl", REPO / "prepared" / "ptbxl-100", rate=100)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for method, kw in METHODS.items():
                start = time.perf_counter()
                result = run_search(SearchSpec(data, "classification", num_samples=1000, max_epochs=args.max_epochs,
                                    time_budget_s=args.budget, config=REPO / "configs" / "demo.yaml", seed=seed,
                                    tracking_uri=f"sqlite:///{Path(tmp) / 'mlflow.db'}", storage_path=Path(tmp),
                                    name=f"{kw['sampler']}-{kw['asha']}-{seed}", top_k=0, **kw))
                t = result.table
                rows.append((method, seed, t["best_val_auc"].max(), len(t), int(t["epochs"].sum()),
                             int((t["status"] == "pruned").sum()), time.perf_counter() - start))
    ray.shutdown()
    print(f"\n{args.budget:.0f} s per search, max {args.max_epochs} epochs, {data.name}, 2 trials at a time")
    print(f"{'method':20s} {'seed':>4s} {'best val AUC':>12s} {'trials':>6s} {'epochs':>6s} {'pruned':>6s} {'wall s':>7s}")
    for r in rows:
        print(f"{r[0]:20s} {r[1]:4d} {r[2]:12.4f} {r[3]:6d} {r[4]:6d} {r[5]:6d} {r[6]:7.1f}")
    for method in METHODS:
        best = [r[2] for r in rows if r[0] == method]
        print(f"{method:20s} mean best val AUC {np.mean(best):.4f} over {len(best)} seeds")
    tpe, rnd = ([r[2] for r in rows if r[0] == m] for m in METHODS)
    print(f"ratio (TPE+ASHA / random) of mean best val AUC: {np.mean(tpe) / np.mean(rnd):.3f}")


if __name__ == "__main__":
    main()
