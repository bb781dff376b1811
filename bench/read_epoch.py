"""Reading one training epoch from the prepared dataset (memmap) against reading the wfdb files each epoch.

Both read every record once in a shuffled order, in batches of 64, into float32 (batch, 8, L) arrays in mV.
Usage: python bench/read_epoch.py [--root sample_data/ptbxl] [--epochs 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import wfdb

from data_prep.constants import LEADS
from data_prep.dataset import open_dataset
from data_prep.ptbxl import FILENAME, prepare_ptbxl

ROOT = Path(__file__).resolve().parents[1] / "sample_data" / "ptbxl"
BATCH = 64


def wfdb_epoch(paths: list[str], order: np.ndarray) -> float:
    start = time.perf_counter()
    for i in range(0, len(order), BATCH):
        batch = []
        for j in order[i:i + BATCH]:
            signal, fields = wfdb.rdsamp(paths[j])
            batch.append(signal[:, [fields["sig_name"].index(lead) for lead in LEADS]].T)
        np.stack(batch).astype(np.float32)
    return time.perf_counter() - start


def memmap_epoch(signals: np.ndarray, order: np.ndarray) -> float:
    start = time.perf_counter()
    for i in range(0, len(order), BATCH):
        np.asarray(signals[np.sort(order[i:i + BATCH])], dtype=np.float32)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=ROOT)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        ds = open_dataset(prepare_ptbxl(args.root, Path(tmp) / "ds", rate=100))
        db = pd.read_csv(args.root / "ptbxl_database.csv", index_col="ecg_id")
        paths = [str(args.root / f) for f in db.loc[ds.labels["record_id"], FILENAME[ds.rate]]]
        orders = [rng.permutation(len(paths)) for _ in range(args.epochs)]
        plain = min(wfdb_epoch(paths, o) for o in orders)
        mapped = min(memmap_epoch(ds.signals, o) for o in orders)
    print(f"{len(paths)} records at {ds.rate} Hz, best of {args.epochs} epochs")
    print(f"wfdb files each epoch: {plain:.3f} s ({len(paths) / plain:.0f} rec/s)")
    print(f"prepared memmap:       {mapped:.4f} s ({len(paths) / mapped:.0f} rec/s)")
    print(f"ratio memmap / wfdb: {plain / mapped:.0f}x faster")


if __name__ == "__main__":
    main()
