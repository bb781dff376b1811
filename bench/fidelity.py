"""Two fidelities against 500 Hz only, at equal wall time, on the same records at both rates (default: the 488
records of ../shared/data/ptbxl-sample, read in place and prepared into a temporary directory, or --cache DIR):
  (a) a 500 Hz search under ASHA for --budget seconds;
  (b) a 100 Hz search under ASHA for --low-share of the budget, then its top-rung configurations retrained at 500 Hz
      (search/fidelity.py: enqueued in order, FIFO) for the rest of the budget.
Printed: the best 500 Hz val AUC of each, and the wall time each needed to reach (a)'s best (for (b) counted from the
start of its 100 Hz search). The space: inception1d and cnn1d, small, with lr, batch size and width searched.
Goal (issue 13): (b) reaches (a)'s best in at most half the time.
Usage: python bench/fidelity.py [--root PTBXL_DIR] [--budget 600] [--low-share 0.4] [--epochs 6] [--cache DIR]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray

from data_prep.ptbxl import prepare_ptbxl
from search import fidelity
from search.spec import SearchSpec
from search.tuner import run_search
from warm_start import trajectory

REPO = Path(__file__).resolve().parents[1]
SPACE = {"arch": ["inception1d", "cnn1d"], "archs": {"inception1d": {"depth": 3, "filters": [8, 16]},
                                                     "cnn1d": {"width": [8, 16, 32], "depth": 3}},
         "batch_size": [32, 64], "lr": {"low": 1.0e-4, "high": 3.0e-2, "log": True}, "patience": 4,
         "schedule": "constant", "norm": "zscore"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "ptbxl-sample"))
    p.add_argument("--budget", type=float, default=600.0, help="wall seconds of each arm")
    p.add_argument("--low-share", type=float, default=0.4, help="share of (b)'s budget spent at 100 Hz")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--cache", default=None, help="where the prepared datasets are kept between runs")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = Path(args.cache) if args.cache else tmp
        low_data, high_data = (prepare_ptbxl(args.root, cache / f"ptbxl-{r}", rate=r, workers=2) for r in (100, 500))
        fidelity.pair(low_data, high_data)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        base = SearchSpec(high_data, num_samples=200, max_epochs=args.epochs, space_overrides=SPACE, top_k=0,
                          tracking_uri=uri, storage_path=tmp / "ray", grace_period=1, seed=0,
                          address=ray.get_runtime_context().gcs_address)
        only = trajectory(uri, run_search(base.replace(name="high-only", time_budget_s=args.budget)))
        start = time.time()
        low = run_search(base.replace(data=low_data, name="two", time_budget_s=args.budget * args.low_share))
        inputs = base.replace(data=low_data, name="two").validate()
        picks = fidelity.top_rung(inputs.client, low.parent_run_id, inputs.space, low.metric, low.mode, k=8)
        retrain = fidelity.high_spec(base.replace(name="two"), high_data, picks, tmp)
        left = max(30.0, args.budget - (time.time() - start))
        two = run_search(retrain.replace(time_budget_s=left))
        fidelity.tag_lineage(inputs.client, low.parent_run_id, two, retrain.optuna_storage)
        two_t = trajectory(uri, two, since=start)
        ray.shutdown()
    target = only["auc"].max()
    hit_a = only[only["auc"] >= target]["seconds"].min()
    hit_b = two_t[two_t["auc"] >= target]["seconds"].min() if len(two_t) else float("nan")
    print(f"\nbudget {args.budget:.0f} s per arm, {args.low_share:.0%} of (b)'s at 100 Hz; up to {args.epochs} epochs; "
          f"2 trials at a time on 2 shared cores")
    print("| arm | 500 Hz trials | best 500 Hz val AUC | s to reach (a)'s best |\n|---|---:|---:|---:|")
    print(f"| (a) 500 Hz only | {len(only)} | {target:.4f} | {hit_a:.0f} |")
    print(f"| (b) 100 Hz ({len(low.table)} trials) then {len(picks)} top-rung at 500 Hz | {len(two_t)} | "
          f"{two_t['auc'].max():.4f} | {'not reached' if hit_b != hit_b else f'{hit_b:.0f}'} |")
    if hit_b == hit_b:
        print(f"time to (a)'s best, (b)/(a): {hit_b / hit_a:.2f} (goal <= 0.5)")


if __name__ == "__main__":
    main()
