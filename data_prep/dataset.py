"""The prepared dataset, the contract between data_prep and search.

A directory holding
  signals.npy    float32 (N, 8, L) in millivolts, leads I, II, V1..V6, opened by memory map;
  labels.parquet one row per signal row: record_id, patient_id, half, split, NORM..HYP (multi-hot),
                 label (single-label class index, -1 where not exactly one class), hr, pr, qrs, qt (NaN = unknown),
                 plus source-specific columns;
  manifest.json  source, rate, leads, units, normalisation, splits, counts, skipped records, cache key, content
                 hash, package versions.
It is written aside and renamed into place, so a directory that has a manifest is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from data_prep.constants import CLASSES, LEADS, SIGNAL_UNITS, TARGET_UNITS, TARGETS
from data_prep.errors import InputError

SIGNALS, LABELS, MANIFEST = "signals.npy", "labels.parquet", "manifest.json"
NORMALISATIONS = ("zscore", "minmax", "global")
FORMAT_VERSION = 1


@dataclass
class PreparedDataset:
    """An opened prepared dataset; `signals` is a read-only memory map."""

    path: Path
    signals: np.ndarray
    labels: pd.DataFrame
    manifest: dict[str, Any]

    @property
    def rate(self) -> int:
        return int(self.manifest["rate"])

    @property
    def length(self) -> int:
        return int(self.signals.shape[-1])

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])

    def tasks(self) -> list[str]:
        """The tasks this dataset has labels for: 'classification' and/or 'regression:<target>'."""
        found = []
        if (self.labels["label"] >= 0).any():
            found.append("classification")
        found += [f"regression:{t}" for t in TARGETS if self.labels[t].notna().any()]
        return found

    def select(self, split: str | None = None, half: str | None = None, single_label: bool = False,
               target: str | None = None) -> np.ndarray:
        """Row indices of one split (train/val/test) of one half (A/B; None = all rows), optionally only the
        single-label cohort or rows with a known regression `target`."""
        keep = np.ones(len(self.labels), dtype=bool)
        if split is not None:
            keep &= (self.labels["split"] == split).to_numpy()
        if half is not None:
            keep &= (self.labels["half"] == half).to_numpy()
        if single_label:
            keep &= (self.labels["label"] >= 0).to_numpy()
        if target is not None:
            keep &= self.labels[target].notna().to_numpy()
        return np.flatnonzero(keep)


def open_dataset(path: str | Path) -> PreparedDataset:
    """Open a prepared dataset read-only; a directory that is not one gets an InputError naming it."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise InputError(f"{path} is not a prepared dataset (no {MANIFEST}); make one with `ecgsearch data ...`")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: prepared with format {manifest.get('format_version')}, this ecgsearch reads "
                         f"{FORMAT_VERSION}; prepare it again")
    signals = np.load(path / SIGNALS, mmap_mode="r")
    labels = pd.read_parquet(path / LABELS)
    if len(labels) != len(signals):
        raise InputError(f"{path}: {len(signals)} signals but {len(labels)} label rows; prepare it again")
    return PreparedDataset(path, signals, labels, manifest)


def cache_key(options: dict[str, Any], files: list[Path] = ()) -> str:
    """A key for the inputs of a preparation: its options and the size and mtime of each input file."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for f in sorted(files):
        st = Path(f).stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def is_current(out: str | Path, key: str) -> bool:
    """True when `out` is a complete dataset prepared with the same cache key (so it can be reused)."""
    manifest = Path(out) / MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text()).get("cache_key") == key


def package_versions(*names: str) -> dict[str, str]:
    found = {}
    for n in ("numpy", "pandas", *names):
        try:
            found[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return found


class DatasetWriter:
    """Writes a dataset into a hidden sibling directory and renames it into place on `finish`.

    Rows are written in order with `write(rows)`; `finish` trims unused rows (skipped records), hashes the content,
    writes labels and manifest, then replaces `out`. Leaving the `with` block without `finish` removes the temp dir.
    """

    def __init__(self, out: str | Path, capacity: int, length: int, n_leads: int = len(LEADS)):
        self.out = Path(out)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.signals = np.lib.format.open_memmap(self.tmp / SIGNALS, mode="w+", dtype=np.float32,
                                                 shape=(max(capacity, 1), n_leads, length))
        self.count = 0

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write(self, rows: np.ndarray) -> None:
        """Append (n, leads, L) rows in millivolts."""
        self.signals[self.count:self.count + len(rows)] = rows
        self.count += len(rows)

    def finish(self, labels: pd.DataFrame, manifest: dict[str, Any]) -> Path:
        if len(labels) != self.count:
            raise ValueError(f"{len(labels)} label rows for {self.count} signal rows")
        missing = [c for c in ("record_id", "patient_id", "half", "split", *CLASSES, "label", *TARGETS)
                   if c not in labels]
        if missing:
            raise ValueError(f"labels lack columns {missing}")
        length = int(self.signals.shape[-1])
        self._trim()
        labels.reset_index(drop=True).to_parquet(self.tmp / LABELS, index=False)
        manifest = {
            "format_version": FORMAT_VERSION, "leads": list(LEADS), "units": SIGNAL_UNITS,
            "target_units": TARGET_UNITS, "classes": list(CLASSES), "count": self.count,
            "length": length, **manifest,
            "content_hash": _content_hash(self.tmp),
        }
        norm = manifest.get("normalisation")
        if norm not in NORMALISATIONS:
            raise ValueError(f"manifest normalisation must be one of {NORMALISATIONS}, got {norm!r}")
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            self.out.rename(old)
            self.tmp.rename(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.rename(self.out)
        return self.out

    def _trim(self) -> None:
        """Drop the rows never written (skipped records), copying in chunks so memory stays flat."""
        full = self.signals
        full.flush()
        if self.count == len(full):
            return
        trimmed_path = self.tmp / "signals.trim.npy"
        trimmed = np.lib.format.open_memmap(trimmed_path, mode="w+", dtype=np.float32,
                                            shape=(self.count, *full.shape[1:]))
        for s in _chunks(self.count):
            trimmed[s] = full[s]
        trimmed.flush()
        del trimmed, full
        self.signals = None
        os.replace(trimmed_path, self.tmp / SIGNALS)


def _chunks(n: int, size: int = 1024) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _content_hash(directory: Path) -> str:
    h = hashlib.sha256()
    for name in (SIGNALS, LABELS):
        with open(directory / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def describe(path: str | Path) -> str:
    """A short human summary of a prepared dataset."""
    ds = open_dataset(path)
    m, lab = ds.manifest, ds.labels
    lines = [f"{ds.path}: {m['source']} dataset, {m['count']} ECGs x {len(m['leads'])} leads x {ds.length} samples "
             f"at {m['rate']} Hz ({m['units']}), content {m['content_hash']}",
             f"  tasks: {', '.join(ds.tasks()) or 'none'} (regression labels: {m.get('label_source', '-')})",
             f"  normalisation: {m['normalisation']}, applied when training (signals are stored in {m['units']})"]
    counts = lab.groupby(["half", "split"]).size()
    lines.append("  rows: " + ", ".join(f"{h or '-'}/{s}={n}" for (h, s), n in counts.items()))
    single = lab[lab["label"] >= 0]
    if len(single):
        lines.append("  single-label: " + ", ".join(f"{c}={int((single['label'] == i).sum())}"
                                                    for i, c in enumerate(CLASSES)))
    for t in TARGETS:
        v = lab[t].dropna()
        if len(v):
            lines.append(f"  {t}: {v.mean():.1f} +- {v.std():.1f} {TARGET_UNITS[t]} (n={len(v)})")
    skipped = m.get("skipped", [])
    if skipped:
        lines.append(f"  skipped {len(skipped)} records, e.g. {skipped[0]['record']}: {skipped[0]['reason']}")
    return "\n".join(lines)
