"""Helpers that make altered copies of the PTB-XL sample for tests (the originals stay untouched)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import wfdb


def keep_records(root: Path, ecg_ids) -> Path:
    """Filter the copy's ptbxl_database.csv to `ecg_ids` (in that order of the file)."""
    db = pd.read_csv(root / "ptbxl_database.csv")
    db[db["ecg_id"].isin(list(ecg_ids))].to_csv(root / "ptbxl_database.csv", index=False)
    return root


def record_path(root: Path, ecg_id: int, rate: int = 100) -> Path:
    db = pd.read_csv(root / "ptbxl_database.csv", index_col="ecg_id")
    return root / db.loc[ecg_id, "filename_lr" if rate == 100 else "filename_hr"]


def rewrite_record(path: Path, order: list[int] | None = None, rename: dict[str, str] | None = None,
                   digital: np.ndarray | None = None, fs: int | None = None) -> None:
    """Write the record at `path` again with its channels in `order`, names changed, samples replaced or the
    sampling rate changed."""
    rec = wfdb.rdrecord(str(path), physical=False)
    order = order if order is not None else list(range(rec.n_sig))
    d = rec.d_signal if digital is None else digital
    names = [(rename or {}).get(rec.sig_name[i], rec.sig_name[i]) for i in order]
    wfdb.wrsamp(path.name, fs=fs or rec.fs, units=[rec.units[i] for i in order], sig_name=names,
                d_signal=np.ascontiguousarray(d[:, order]), fmt=[rec.fmt[i] for i in order],
                adc_gain=[rec.adc_gain[i] for i in order], baseline=[rec.baseline[i] for i in order],
                write_dir=str(path.parent))
