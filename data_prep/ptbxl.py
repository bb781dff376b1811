"""PTB-XL wfdb records -> prepared dataset: the 8 leads chosen by name, superclass labels, HR/PR/QRS/QT labels
from PTB-XL+ 12SL features or the extractor, patient-disjoint halves and splits."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from data_prep import intervals
from data_prep.constants import CLASSES, LEADS, TARGETS
from data_prep.dataset import DatasetWriter, cache_key, is_current, package_versions
from data_prep.errors import InputError
from data_prep.parallel import ordered_map, stream_into
from data_prep.splits import assign_splits, split_counts

SECONDS = 10
FILENAME = {100: "filename_lr", 500: "filename_hr"}
TWELVE_SL = {"pr": "PR_Int_Global", "qrs": "QRS_Dur_Global", "qt": "QT_Int_Global"}  # hr = 60000 / RR_Mean_Global
UNIT_SCALE = {"mv": 1.0, "uv": 1e-3}


def prepare_ptbxl(root: str | Path, out: str | Path, rate: int = 100, features: str | Path | None = None,
                  min_likelihood: float = 0.0, split: str = "strat_fold", seed: int = 0, strict: bool = False,
                  workers: int | None = None, outlier_sd: float | None = None) -> Path:
    """Prepare PTB-XL under `root` into the dataset directory `out` (reused when the options and the CSVs and record
    files it reads are unchanged). Bad records are skipped and listed in the manifest, or raise InputError when
    `strict`. `outlier_sd` applies the study's outlier rule to the regression labels (`intervals.drop_outliers`)."""
    root, out = Path(root), Path(out)
    if rate not in FILENAME:
        raise InputError(f"--rate {rate}: PTB-XL has records at 100 and 500 Hz only")
    database, statements = root / "ptbxl_database.csv", root / "scp_statements.csv"
    for f in (database, statements):
        if not f.is_file():
            raise InputError(f"{f} not found: --root must be the PTB-XL directory (ptbxl_database.csv, "
                             "scp_statements.csv, records100/, records500/)")
    twelve_sl = _features_file(features) if features is not None else None
    options = {"source": "ptbxl", "rate": rate, "min_likelihood": min_likelihood, "split": split, "seed": seed,
               "strict": strict, "features": str(twelve_sl), "root": str(root.resolve()),
               "outlier_sd": outlier_sd}
    meta = read_database(database, statements, min_likelihood)
    records = [root / f"{f}{ext}" for f in meta[FILENAME[rate]] for ext in (".hea", ".dat")]
    key = cache_key(options, [database, statements, *([twelve_sl] if twelve_sl else []),
                              *(f for f in records if f.is_file())])
    if is_current(out, key):
        return out

    meta = assign_splits(meta, split, seed)
    if twelve_sl is not None:
        meta = meta.join(read_12sl(twelve_sl), on="ecg_id")
        meta["label_note"] = meta["label_note"].fillna("not in 12SL features")
    jobs = [(str(root / f), rate, twelve_sl is None) for f in meta[FILENAME[rate]]]
    with DatasetWriter(out, capacity=len(meta), length=rate * SECONDS) as writer, ordered_map(workers) as imap, \
            tqdm(total=len(jobs), desc=f"PTB-XL {rate} Hz", unit="rec") as progress:
        kept, measured, skipped = stream_into(writer, imap(_load, jobs), meta["ecg_id"].astype(int).tolist(),
                                              strict, "PTB-XL record", progress)
        labels = meta.iloc[kept].reset_index(drop=True)
        if twelve_sl is None:
            labels = pd.concat([labels.drop(columns=[*TARGETS, "label_note"], errors="ignore"),
                                pd.DataFrame(measured, index=labels.index)], axis=1)
        labels = labels.rename(columns={"ecg_id": "record_id"})
        if outlier_sd:
            labels = intervals.drop_outliers(labels, outlier_sd)
        manifest = {
            "source": "ptbxl", "rate": rate, "normalisation": "zscore",
            "normalisation_note": "signals are stored in mV; the trainer applies per-record per-lead z-score",
            "root": str(root.resolve()), "min_likelihood": min_likelihood,
            "splits": {"method": split, "seed": seed, "halves": "patient-disjoint, superclass-stratified",
                       "counts": split_counts(labels)},
            "label_source": "ptbxl+ 12sl" if twelve_sl else "extractor", "outlier_sd": outlier_sd,
            "skipped": skipped, "cache_key": key,
            "versions": package_versions("wfdb", "neurokit2", "scipy"),
        }
        return writer.finish(labels, manifest)


def _features_file(features: str | Path) -> Path:
    """The 12SL features CSV inside a PTB-XL+ directory (or the CSV itself)."""
    features = Path(features)
    found = features if features.suffix == ".csv" else features / "features" / "12sl_features.csv"
    if not found.is_file():
        raise InputError(f"{found} not found: --features must be the PTB-XL+ directory (features/12sl_features.csv)")
    return found


def read_12sl(path: Path) -> pd.DataFrame:
    """HR (bpm), PR, QRS, QT (ms) per ecg_id from PTB-XL+ `12sl_features.csv`."""
    table = pd.read_csv(path)
    missing = [c for c in ("ecg_id", "RR_Mean_Global", *TWELVE_SL.values()) if c not in table]
    if missing:
        raise InputError(f"{path}: lacks columns {missing}; is it PTB-XL+ features/12sl_features.csv?")
    with np.errstate(divide="ignore"):
        labels = pd.DataFrame({"hr": 60000.0 / table["RR_Mean_Global"],
                               **{t: table[c] for t, c in TWELVE_SL.items()}}).astype(float)
    labels.index = table["ecg_id"].astype(int)
    labels = labels.replace([np.inf, -np.inf], np.nan)
    labels["label_note"] = np.where(labels.isna().any(axis=1), "missing in 12SL features", "")
    return labels


def read_database(database: Path, statements: Path, min_likelihood: float) -> pd.DataFrame:
    """One row per listed record: ecg_id, patient_id, strat_fold, age, sex, filenames, multi-hot NORM..HYP, label."""
    db = pd.read_csv(database)
    missing = [c for c in ("ecg_id", "patient_id", "age", "sex", "scp_codes", "strat_fold", *FILENAME.values())
               if c not in db]
    if missing:
        raise InputError(f"{database}: lacks columns {missing}")
    scp = pd.read_csv(statements, index_col=0)
    if not {"diagnostic", "diagnostic_class"} <= set(scp.columns):
        raise InputError(f"{statements}: lacks the diagnostic / diagnostic_class columns")
    superclass = scp.loc[scp["diagnostic"] == 1, "diagnostic_class"].to_dict()
    hot = np.zeros((len(db), len(CLASSES)), dtype=np.int8)
    for i, codes in enumerate(db["scp_codes"]):
        for code, likelihood in ast.literal_eval(codes).items():
            if likelihood >= min_likelihood and superclass.get(code) in CLASSES:
                hot[i, CLASSES.index(superclass[code])] = 1
    meta = db[["ecg_id", "patient_id", "strat_fold", "age", "sex", *FILENAME.values()]].copy()
    meta["patient_id"] = meta["patient_id"].astype(int)
    meta[list(CLASSES)] = hot
    meta["label"] = np.where(hot.sum(1) == 1, hot.argmax(1), -1)
    return meta


def _load(job: tuple[str, int, bool]) -> tuple[np.ndarray | None, dict | str]:
    """Read one record as (8, L) float32 mV and, when asked, measure its intervals; (None, reason) when bad."""
    path, rate, measure = job
    try:
        signal = read_record(path, rate)
    except InputError as e:
        return None, str(e)
    return signal, intervals.measure(signal, rate) if measure else {}


def read_record(path: str | Path, rate: int) -> np.ndarray:
    """The leads I, II, V1..V6 of one wfdb record, chosen by name, as (8, rate * 10) float32 mV;
    InputError saying why the record is unusable."""
    import wfdb

    path = Path(path)
    for f in (path.with_suffix(".hea"), path.with_suffix(".dat")):
        if not f.is_file():
            raise InputError(f"missing file {f.name}")
    header = wfdb.rdheader(str(path))
    if header.fs != rate:
        raise InputError(f"header says {header.fs:g} Hz, expected {rate} Hz")
    names = [n.upper() for n in header.sig_name]
    absent = [lead for lead in LEADS if lead.upper() not in names]
    if absent:
        raise InputError(f"missing leads {', '.join(absent)} (header has {', '.join(header.sig_name)})")
    if header.sig_len != rate * SECONDS:
        raise InputError(f"{header.sig_len} samples, expected {rate * SECONDS}")
    expected = sum(header.sig_len * int(fmt) // 8 for fmt in header.fmt)
    size = path.with_suffix(".dat").stat().st_size
    if size < expected:
        raise InputError(f"truncated .dat ({size} of {expected} bytes)")
    pick = [names.index(lead.upper()) for lead in LEADS]
    scale = np.array([UNIT_SCALE.get(header.units[i].lower(), np.nan) for i in pick])
    if np.isnan(scale).any():
        raise InputError(f"units {[header.units[i] for i in pick]}, expected mV")
    signal = (_physical(path, header, pick) * scale).T.astype(np.float32)
    for lead, x in zip(LEADS, signal):
        if not np.isfinite(x).all():
            raise InputError(f"NaN samples in lead {lead}")
        if np.ptp(x) == 0:
            raise InputError(f"flat signal in lead {lead}")
    return signal


def _physical(path: Path, header, pick: list[int]) -> np.ndarray:
    """Samples (L, len(pick)) in header units, NaN where missing. PTB-XL's layout (one .dat of interleaved 16-bit
    samples) is read directly, which halves the cost of wfdb.rdrecord parsing the header again; others go to wfdb."""
    import wfdb

    if set(header.fmt) == {"16"} and not any(header.byte_offset) and len(set(header.file_name)) == 1:
        digital = np.fromfile(path.with_suffix(".dat"), dtype="<i2", count=header.sig_len * header.n_sig)
        digital = digital.reshape(header.sig_len, header.n_sig)[:, pick]
        gain, baseline = np.array(header.adc_gain)[pick], np.array(header.baseline)[pick]
        return np.where(digital == -32768, np.nan, (digital - baseline) / gain)  # -32768: wfdb's missing sample
    return wfdb.rdrecord(str(path), channels=pick).p_signal
