"""Validate the HR/PR/QRS/QT extractor: mean +- SD on the 488 real sample records and on generated DeepFake ECGs,
next to the published reference distributions, and against a plain neurokit2 baseline (lead II, `dwt` delineation,
median over beats, no rejection), in the same run. Also the cost (records/s, wall time, with --workers processes).

References (issue 2): PTB-XL+ 12SL population HR 74+-17, PR 166+-29, QRS 97+-20, QT 396+-40;
DeepFake MUSE ground truth HR 69.8+-7.6, PR 158+-17, QRS 92+-9, QT 395+-21.
Usage: python bench/intervals.py [--fakes 300] [--workers 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.constants import LEADS, TARGETS
from data_prep.dataset import open_dataset
from data_prep.deepfake import generate
from data_prep.intervals import measure
from data_prep.parallel import ordered_map
from data_prep.ptbxl import prepare_ptbxl

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "ptbxl"
REFERENCE = {"PTB-XL sample (100 Hz) vs 12SL": {"hr": (74, 17), "pr": (166, 29), "qrs": (97, 20), "qt": (396, 40)},
             "DeepFake generated (500 Hz) vs MUSE": {"hr": (69.8, 7.6), "pr": (158, 17), "qrs": (92, 9),
                                                     "qt": (395, 21)}}


def plain_dwt(job: tuple[np.ndarray, int]) -> dict[str, float]:
    """The obvious use of neurokit2: lead II, dwt delineation, medians over beats, nothing rejected."""
    import neurokit2 as nk

    ecg, rate = job
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            signals, info = nk.ecg_process(ecg[LEADS.index("II")], sampling_rate=rate, method="neurokit")
            r = np.asarray(info["ECG_R_Peaks"])
            _, w = nk.ecg_delineate(signals["ECG_Clean"].to_numpy(), r, sampling_rate=rate, method="dwt")
        except Exception:
            return {t: np.nan for t in TARGETS}
    f = {k: np.asarray(w[k], dtype=float) for k in ("ECG_P_Onsets", "ECG_R_Onsets", "ECG_R_Offsets", "ECG_T_Offsets")}
    ms = 1000.0 / rate
    return {"hr": 60000.0 / (np.median(np.diff(r)) * ms),
            "pr": np.nanmedian(f["ECG_R_Onsets"] - f["ECG_P_Onsets"]) * ms,
            "qrs": np.nanmedian(f["ECG_R_Offsets"] - f["ECG_R_Onsets"]) * ms,
            "qt": np.nanmedian(f["ECG_T_Offsets"] - f["ECG_R_Onsets"]) * ms}


def ours(job: tuple[np.ndarray, int]) -> dict:
    return measure(*job)


def run(jobs: list, fn, workers: int) -> tuple[pd.DataFrame, float]:
    start = time.perf_counter()
    with ordered_map(workers) as imap:
        found = pd.DataFrame(list(imap(fn, jobs)))
    return found, len(jobs) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fakes", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ptbxl = open_dataset(prepare_ptbxl(SAMPLE, f"{tmp}/ds", workers=args.workers))
        real = [(np.array(x), 100) for x in ptbxl.signals]
    fakes = [(x, 500) for batch in generate(args.fakes, seed=0) for x in batch]
    print(f"{'':<38} {'n':>4} " + " ".join(f"{t:>14}" for t in TARGETS) + f" {'records/s':>10}")
    for (name, ref), jobs in zip(REFERENCE.items(), (real, fakes)):
        print(f"{name}  reference      " + " ".join(f"{m:>7.1f} +-{s:>4.0f}" for m, s in ref.values()))
        for label, fn in (("extractor", ours), ("plain nk dwt", plain_dwt)):
            found, cost = run(jobs, fn, args.workers)
            cells = " ".join(f"{found[t].mean():>7.1f} +-{found[t].std():>4.0f}" for t in TARGETS)
            print(f"  {label:<36} {len(found):>4} {cells} {cost:>10.1f}")
            print(f"  {'':<36} {'':>4} " + " ".join(f"{'NaN ' + str(int(found[t].isna().sum())):>14}" for t in TARGETS)
                  + "   mean-ref " + ", ".join(f"{t} {found[t].mean() - ref[t][0]:+.0f}" for t in TARGETS))


if __name__ == "__main__":
    main()
