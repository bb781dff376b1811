"""Plausibility checks shared by the sources: settings, input tables, signals an ECG can be, interval labels a body
can have. A bad record is skipped and named (or refused under --strict); a bad label is dropped (NaN) and named; both
are counted in the manifest's `checks` and in the summary line."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_prep.constants import LEADS, TARGET_UNITS, TARGETS
from data_prep.errors import InputError

MAX_PEAK_TO_PEAK_MV = 20.0  # no lead of a real ECG spans more: a larger span is a wrong gain or unit
PHYSIOLOGICAL = {"hr": (20.0, 300.0), "pr": (40.0, 600.0), "qrs": (20.0, 300.0), "qt": (150.0, 800.0)}
EXAMPLES = 20  # dropped labels listed in the manifest (all are counted)


def check_settings(workers: int | None, outlier_sd: float | None) -> None:
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers}: must be at least 1 (or leave it out for all cores)")
    if outlier_sd is not None and not outlier_sd > 0:
        raise InputError(f"--drop-outliers {outlier_sd:g}: must be a positive number of standard deviations")


def read_table(path: Path, **options: Any) -> pd.DataFrame:
    """A CSV as a DataFrame; an empty, header-only or unparsable file is an InputError naming it."""
    try:
        table = pd.read_csv(path, **options)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path} is empty") from None
    except (pd.errors.ParserError, ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
        raise InputError(f"{path} is not a readable CSV ({str(e).strip().splitlines()[0][:200]})") from None
    if table.empty:
        raise InputError(f"{path} has a header but no rows")
    table.columns = [str(c).strip() for c in table.columns]
    return table


def check_signal(signal: np.ndarray) -> None:
    """InputError saying why (8, L) mV samples cannot be an ECG: missing samples, a flat lead, or a span beyond
    MAX_PEAK_TO_PEAK_MV."""
    for lead, x in zip(LEADS, signal):
        if not np.isfinite(x).all():
            raise InputError(f"NaN samples in lead {lead}")
        span = float(np.ptp(x))
        if span == 0:
            raise InputError(f"flat signal in lead {lead}")
        if span > MAX_PEAK_TO_PEAK_MV:
            raise InputError(f"amplitude {span:.0f} mV peak-to-peak in lead {lead}, over {MAX_PEAK_TO_PEAK_MV:g} mV "
                             "(a wrong gain or unit?)")


def skip_check(reason: str) -> str:
    """The check a record-file reason belongs to, for the counts."""
    return "amplitude" if reason.startswith("amplitude") else "record file"


def numbers(table: pd.DataFrame, columns: list[str], ids: pd.Series, what: str, strict: bool
            ) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """`columns` of `table` as floats; a cell that is not a number becomes NaN and is listed (InputError when
    `strict`)."""
    out, dropped = pd.DataFrame(index=table.index), []
    for c in columns:
        out[c] = pd.to_numeric(table[c], errors="coerce")
        for i in np.flatnonzero(out[c].isna().to_numpy() & table[c].notna().to_numpy()):
            dropped.append(dropped_label(ids.iloc[i], c, table[c].iloc[i], "not a number", what, strict))
    return out, dropped


def physiological(labels: pd.DataFrame, what: str, strict: bool) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """`labels` with every HR/PR/QRS/QT outside PHYSIOLOGICAL set to NaN (noted in `label_note`), and the list of
    those dropped (InputError on the first when `strict`)."""
    labels, dropped = labels.copy(), []
    for t in TARGETS:
        lo, hi = PHYSIOLOGICAL[t]
        bad = labels[t].notna() & ~labels[t].between(lo, hi)
        if not bad.any():
            continue
        for i in np.flatnonzero(bad.to_numpy()):
            dropped.append(dropped_label(labels["record_id"].iloc[i], t, labels[t].iloc[i],
                                    f"outside {lo:g}-{hi:g} {TARGET_UNITS[t]}", what, strict))
        note = labels.loc[bad, "label_note"].fillna("")
        labels.loc[bad, "label_note"] = note.where(note == "", note + "; ") + f"{t}: implausible"
        labels.loc[bad, t] = np.nan
    return labels, dropped


def dropped_label(record: Any, label: str, value: Any, why: str, what: str, strict: bool) -> dict[str, Any]:
    if strict:
        raise InputError(f"{what} {record}: {label} {value!r} {why} (run without --strict to drop that label)")
    return {"record": record if isinstance(record, str) else int(record), "label": label, "value": str(value),
            "reason": why}


def summary(skipped: list[dict[str, Any]], dropped: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's `checks`: skipped records per check, dropped labels (counted, the first EXAMPLES listed)."""
    per_check = pd.Series([s.get("check", "record file") for s in skipped], dtype=object).value_counts()
    return {"records_skipped": int(len(skipped)), "skipped_by_check": {k: int(v) for k, v in per_check.items()},
            "labels_dropped": len(dropped), "dropped_labels": dropped[:EXAMPLES]}


def describe_checks(checks: dict[str, Any] | None, skipped: list[dict[str, Any]]) -> str:
    """The summary line of a manifest's checks."""
    if checks is None:  # prepared before the checks were counted
        return f"  checks: skipped {len(skipped)} records" if skipped else "  checks: not recorded"
    parts = []
    if checks["records_skipped"]:
        by = ", ".join(f"{n} {k}" for k, n in checks["skipped_by_check"].items())
        first = skipped[0] if skipped else {"record": "?", "reason": "?"}
        parts.append(f"skipped {checks['records_skipped']} records ({by}; e.g. {first['record']}: {first['reason']})")
    if checks["labels_dropped"]:
        d = checks["dropped_labels"][0]
        parts.append(f"dropped {checks['labels_dropped']} labels (e.g. {d['record']} {d['label']} {d['value']}: "
                     f"{d['reason']})")
    return "  checks: " + ("; ".join(parts) if parts else "every record and label plausible")
