"""PTB-XL wfdb records -> prepared dataset: the 8 leads chosen by name, superclass labels, HR/PR/QRS/QT labels
from PTB-XL+ 12SL features or the extractor, patient-disjoint halves and splits."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from data_prep import checks, intervals
from data_prep.constants import CLASSES, LEADS, RECORD_SECONDS, TARGETS
from data_prep.dataset import DatasetWriter, cache_key, check_out, is_current, package_versions
from data_prep.errors import InputError
from data_prep.parallel import ordered_map, stream_into
from data_prep.splits import FOLD_SPLITS, assign_splits, split_counts

WHAT = "PTB-XL record"
FILENAME = {100: "filename_lr", 500: "filename_hr"}
TWELVE_SL = {"pr": "PR_Int_Global", "qrs": "QRS_Dur_Global", "qt": "QT_Int_Global"}  # hr = 60000 / RR_Mean_Global
UNIT_SCALE = {"mv": 1.0, "uv": 1e-3}


def prepare_ptbxl(root: str | Path, out: str | Path, rate: int = 100, features: str | Path | None = None,
                  min_likelihood: float = 0.0, split: str = "strat_fold", seed: int = 0, strict: bool = False,
                  workers: int | None = None, outlier_sd: float | None = None) -> Path:
    """Prepare PTB-XL under `root` into the dataset directory `out` (reused when the options and the CSVs and record
    files it reads are unchanged). Bad records (and labels) are skipped (dropped) and listed in the manifest, or
    raise InputError when `strict`. `outlier_sd` applies the study's outlier rule to the regression labels
    (`intervals.drop_outliers`)."""
    root, out = Path(root), Path(out)
    if rate not in FILENAME:
        raise InputError(f"--rate {rate}: PTB-XL has records at 100 and 500 Hz only")
    if not 0 <= min_likelihood <= 100:
        raise InputError(f"--min-likelihood {min_likelihood:g}: a likelihood is 0-100")
    checks.check_settings(workers, outlier_sd)
    check_out(out, root, features)
    database, statements = root / "ptbxl_database.csv", root / "scp_statements.csv"
    for f in (database, statements):
        if not f.is_file():
            raise InputError(f"{f} not found: --root must be the PTB-XL directory (ptbxl_database.csv, "
                             "scp_statements.csv, records100/, records500/)")
    twelve_sl = _features_file(features) if features is not None else None
    options = {"source": "ptbxl", "rate": rate, "min_likelihood": min_likelihood, "split": split, "seed": seed,
               "strict": strict, "features": str(twelve_sl), "root": str(root.resolve()),
               "outlier_sd": outlier_sd}
    meta, skipped_meta = read_database(database, statements, min_likelihood, rate, split, strict)
    records = [root / f"{f}{ext}" for f in meta[FILENAME[rate]] for ext in (".hea", ".dat")]
    key = cache_key(options, [database, statements, *([twelve_sl] if twelve_sl else []),
                              *(f for f in records if f.is_file())])
    if is_current(out, key):
        return out

    for s in skipped_meta:
        tqdm.write(f"skipping {WHAT} {s['record']}: {s['reason']}")
    meta = assign_splits(meta, split, seed)
    dropped: list[dict] = []
    if twelve_sl is not None:
        features, dropped = read_12sl(twelve_sl, strict)
        meta = meta.join(features, on="ecg_id")
        meta["label_note"] = meta["label_note"].fillna("not in 12SL features")
    jobs = [(str(root / f), rate, twelve_sl is None) for f in meta[FILENAME[rate]]]
    length = rate * RECORD_SECONDS
    with DatasetWriter(out, capacity=len(meta), length=length) as writer, ordered_map(workers) as imap, \
            tqdm(total=len(jobs), desc=f"PTB-XL {rate} Hz", unit="rec", disable=None) as progress:
        kept, measured, skipped = stream_into(writer, imap(_load, jobs), meta["ecg_id"].tolist(), strict, WHAT,
                                              progress)
        skipped = skipped_meta + skipped
        labels = meta.iloc[kept].reset_index(drop=True)
        if twelve_sl is None:
            labels = pd.concat([labels.drop(columns=[*TARGETS, "label_note"], errors="ignore"),
                                pd.DataFrame(measured, index=labels.index)], axis=1)
        labels = labels.rename(columns={"ecg_id": "record_id"})
        labels, implausible = checks.physiological(labels, WHAT, strict)
        dropped += implausible
        if outlier_sd:
            labels = intervals.drop_outliers(labels, outlier_sd)
        manifest = {
            "source": "ptbxl", "rate": rate, "normalisation": "zscore",
            "normalisation_note": "signals are stored in mV; the trainer applies per-record per-lead z-score",
            "root": str(root.resolve()), "min_likelihood": min_likelihood,
            "splits": {"method": split, "seed": seed, "halves": "patient-disjoint, superclass-stratified",
                       "counts": split_counts(labels)},
            "label_source": "ptbxl+ 12sl" if twelve_sl else "extractor", "outlier_sd": outlier_sd,
            "skipped": skipped, "checks": checks.summary(skipped, dropped), "cache_key": key,
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


def read_12sl(path: Path, strict: bool = False) -> tuple[pd.DataFrame, list[dict]]:
    """HR (bpm), PR, QRS, QT (ms) per ecg_id from PTB-XL+ `12sl_features.csv`, and the labels dropped: cells that
    are not numbers, and rows whose ecg_id is not an integer or repeats an earlier one."""
    table = checks.read_table(path)
    missing = [c for c in ("ecg_id", "RR_Mean_Global", *TWELVE_SL.values()) if c not in table]
    if missing:
        raise InputError(f"{path}: lacks columns {missing}; is it PTB-XL+ features/12sl_features.csv?")
    ids = pd.to_numeric(table["ecg_id"], errors="coerce")
    bad = ids.isna() | (ids != ids.round()) | ids.duplicated()
    dropped = [checks.dropped_label(f"line {i + 2}", "ecg_id", table["ecg_id"].iloc[i],
                               "repeats an earlier row" if ids.notna().iloc[i] else "not an integer",
                               f"{path.name}", strict) for i in np.flatnonzero(bad.to_numpy())]
    table, ids = table[~bad], ids[~bad].astype(int)
    values, not_numbers = checks.numbers(table, ["RR_Mean_Global", *TWELVE_SL.values()], ids, WHAT, strict)
    with np.errstate(divide="ignore"):
        labels = pd.DataFrame({"hr": 60000.0 / values["RR_Mean_Global"],
                               **{t: values[c] for t, c in TWELVE_SL.items()}}).astype(float)
    labels.index = ids.to_numpy()  # an RR of 0 gives an infinite HR, which `checks.physiological` drops and names
    labels["label_note"] = np.where(labels.isna().any(axis=1), "missing in 12SL features", "")
    return labels, dropped + not_numbers


def read_database(database: Path, statements: Path, min_likelihood: float, rate: int = 100,
                  split: str = "strat_fold", strict: bool = False) -> tuple[pd.DataFrame, list[dict]]:
    """One row per usable listed record: ecg_id, patient_id, strat_fold, age, sex, filenames, multi-hot NORM..HYP,
    label; and the records skipped for their row (no integer ecg_id or patient_id, a repeated ecg_id, no file name,
    no fold, empty, malformed or unknown scp_codes), or InputError on the first when `strict`."""
    db = checks.read_table(database)
    missing = [c for c in ("ecg_id", "patient_id", "age", "sex", "scp_codes", "strat_fold", *FILENAME.values())
               if c not in db]
    if missing:
        raise InputError(f"{database}: lacks columns {missing}")
    scp = checks.read_table(statements, index_col=0)
    if not {"diagnostic", "diagnostic_class"} <= set(scp.columns):
        raise InputError(f"{statements}: lacks the diagnostic / diagnostic_class columns")
    diagnostic = pd.to_numeric(scp["diagnostic"], errors="coerce") == 1
    superclass = scp.loc[diagnostic, "diagnostic_class"].to_dict()
    known = set(scp.index.astype(str))
    good, ids, patients, hot, skipped, seen = [], [], [], [], [], {}
    for i, row in enumerate(db.to_dict("records")):
        ecg_id = _integer(row["ecg_id"])
        name = ecg_id if ecg_id is not None else f"line {i + 2}"
        problem, check, codes = _row_problem(row, ecg_id, seen.get(ecg_id), rate, split, known)
        if problem is None:
            seen[ecg_id] = i + 2
            good.append(i)
            ids.append(ecg_id)
            patients.append(_integer(row["patient_id"]))
            hot.append([int(any(superclass.get(c) == k and lk >= min_likelihood for c, lk in codes.items()))
                        for k in CLASSES])
        elif strict:
            raise InputError(f"{WHAT} {name}: {problem} (run without --strict to skip it)")
        else:
            skipped.append({"record": name, "reason": problem, "check": check})
    if not good:
        raise InputError(f"{database}: every listed record is bad ({len(skipped)} skipped, e.g. "
                         f"{skipped[0]['record']}: {skipped[0]['reason']})")
    meta = db.iloc[good][["ecg_id", "patient_id", "strat_fold", "age", "sex", *FILENAME.values()]].copy()
    meta["ecg_id"], meta["patient_id"] = ids, patients
    for c in ("strat_fold", "age", "sex"):  # copied as numbers (a stray text cell would not go into parquet)
        meta[c] = pd.to_numeric(meta[c], errors="coerce")
    for c in FILENAME.values():
        meta[c] = meta[c].astype(str)
    hot = np.array(hot, dtype=np.int8).reshape(-1, len(CLASSES))
    meta[list(CLASSES)] = hot
    meta["label"] = np.where(hot.sum(1) == 1, hot.argmax(1), -1)
    return meta.reset_index(drop=True), skipped


def _integer(value: object) -> int | None:
    """An integer cell (15709 or 15709.0) as int; None for anything else."""
    number = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
    return int(number) if pd.notna(number) and float(number).is_integer() else None


def _row_problem(row: dict, ecg_id: int | None, seen_on: int | None, rate: int, split: str, known: set[str]
                 ) -> tuple[str | None, str, dict]:
    """Why a database row cannot be used (None if it can), the check it fails, and its scp_codes."""
    if ecg_id is None:
        return f"ecg_id {row['ecg_id']!r} is not an integer", "metadata", {}
    if seen_on is not None:
        return f"duplicate ecg_id (first on line {seen_on})", "duplicate id", {}
    if _integer(row["patient_id"]) is None:
        return f"patient_id {row['patient_id']!r} is not an integer", "metadata", {}
    if not isinstance(row[FILENAME[rate]], str) or not row[FILENAME[rate]].strip():
        return f"no {FILENAME[rate]}", "metadata", {}
    if split == "strat_fold" and _integer(row["strat_fold"]) not in FOLD_SPLITS:
        return f"strat_fold {row['strat_fold']!r} is not a fold 1-10", "metadata", {}
    text = row["scp_codes"]
    if not isinstance(text, str) or not text.strip():
        return "empty scp_codes", "metadata", {}
    try:
        codes = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        codes = None
    if not isinstance(codes, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in codes.values()):
        return f"malformed scp_codes {text[:60]!r} (expected {{'CODE': likelihood, ...}})", "metadata", {}
    unknown = [str(c) for c in codes if str(c) not in known]
    if unknown:
        return f"unknown SCP code {', '.join(unknown)} (not in scp_statements.csv)", "unknown code", {}
    return None, "", {str(c): float(v) for c, v in codes.items()}


def _load(job: tuple[str, int, bool]) -> tuple[np.ndarray | None, dict | str]:
    """Read one record as (8, L) float32 mV and, when asked, measure its intervals; (None, reason) when bad."""
    path, rate, measure = job
    try:
        signal = read_record(path, rate)
    except InputError as e:
        return None, str(e)
    except Exception as e:  # a damaged file can fail inside wfdb in many ways: each one skips this record only
        return None, f"unreadable record ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
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
        raise InputError(f"header says {header.fs} Hz, expected {rate} Hz")
    names = [n.upper() for n in header.sig_name]
    absent = [lead for lead in LEADS if lead.upper() not in names]
    if absent:
        raise InputError(f"missing leads {', '.join(absent)} (header has {', '.join(header.sig_name)})")
    if header.sig_len != rate * RECORD_SECONDS:
        raise InputError(f"{header.sig_len} samples, expected {rate * RECORD_SECONDS}")
    expected = sum(header.sig_len * int(fmt) // 8 for fmt in header.fmt)
    size = path.with_suffix(".dat").stat().st_size
    if size < expected:
        raise InputError(f"truncated .dat ({size} of {expected} bytes)")
    pick = [names.index(lead.upper()) for lead in LEADS]
    scale = np.array([UNIT_SCALE.get(str(header.units[i]).lower(), np.nan) for i in pick])
    if np.isnan(scale).any():
        raise InputError(f"units {[header.units[i] for i in pick]}, expected mV")
    gains = [header.adc_gain[i] for i in pick]
    if not all(g > 0 for g in gains):
        raise InputError(f"ADC gains {gains}: each must be positive")
    signal = (_physical(path, header, pick) * scale).T.astype(np.float32)
    checks.check_signal(signal)
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
