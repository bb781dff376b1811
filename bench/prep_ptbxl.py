"""PTB-XL preparation throughput (records/s) against a plain per-record wfdb loop, in the same run.

The plain loop only reads each record and picks the 8 leads (no labels, no checks, nothing written). Preparation
validates each record, labels it and writes the memmapped dataset: with 12SL labels (a PTB-XL+-format file, so no
extractor work: the like-for-like comparison) and with the extractor measuring HR/PR/QRS/QT (the demo's path).
Usage: python bench/prep_ptbxl.py [--root sample_data/ptbxl] [--workers 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import wfdb

from data_prep.constants import LEADS
from data_prep.ptbxl import FILENAME, prepare_ptbxl

ROOT = Path(__file__).resolve().parents[1] / "sample_data" / "ptbxl"


def plain_loop(root: Path, rate: int, ids: list[int]) -> float:
    db = pd.read_csv(root / "ptbxl_database.csv", index_col="ecg_id")
    start = time.perf_counter()
    for f in db.loc[ids, FILENAME[rate]]:
        signal, fields = wfdb.rdsamp(str(root / f))
        signal[:, [fields["sig_name"].index(lead) for lead in LEADS]].T.astype("float32")
    return len(ids) / (time.perf_counter() - start)


def prepared(root: Path, rate: int, ids: list[int], workers: int, twelve_sl: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "root"
        subset.mkdir()
        for name in ("records100", "records500", "scp_statements.csv"):
            (subset / name).symlink_to(root / name)
        db = pd.read_csv(root / "ptbxl_database.csv")
        db[db["ecg_id"].isin(ids)].to_csv(subset / "ptbxl_database.csv", index=False)
        features = Path(tmp) / "12sl_features.csv"
        pd.DataFrame({"ecg_id": ids, "RR_Mean_Global": 800.0, "PR_Int_Global": 160.0, "QRS_Dur_Global": 90.0,
                      "QT_Int_Global": 400.0}).to_csv(features, index=False)
        start = time.perf_counter()
        prepare_ptbxl(subset, Path(tmp) / "out", rate=rate, workers=workers, features=features if twelve_sl else None)
        return len(ids) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=ROOT)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    db = pd.read_csv(args.root / "ptbxl_database.csv")
    cases = {100: db["ecg_id"].tolist(),
             500: [i for i, f in zip(db["ecg_id"], db["filename_hr"]) if (args.root / f"{f}.dat").exists()]}
    w = args.workers
    print(f"{'rate':>5} {'records':>8} {'plain wfdb':>11} {'12SL x1':>8} {f'12SL x{w}':>8} {'ratio':>6} "
          f"{'extract x1':>11} {f'extract x{w}':>11} {'ratio':>6}   (records/s)")
    for rate, ids in cases.items():
        base = plain_loop(args.root, rate, ids)
        runs = [prepared(args.root, rate, ids, n, sl) for sl in (True, False) for n in (1, w)]
        print(f"{rate:>5} {len(ids):>8} {base:>11.1f} {runs[0]:>8.1f} {runs[1]:>8.1f} {runs[1] / base:>6.2f} "
              f"{runs[2]:>11.1f} {runs[3]:>11.1f} {runs[3] / base:>6.2f}")
    print(f"ratio = preparation with {w} workers / plain wfdb loop (read only, nothing written)")


if __name__ == "__main__":
    main()
