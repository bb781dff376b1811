"""The prepared dataset, the contract between data_prep and search.

A directory holding
  signals.npy    float32 (N, 8, L) in millivolts, leads I, II, V1..V6, opened by memory map;
  labels.parquet one row per signal row: record_id, patient_id, half, split, NORM..HYP (multi-hot),
                 label (single-label class index, -1 where not exactly one class), hr, pr, qrs, qt (NaN = unknown),
                 plus source-specific columns;
  manifest.json  source, rate, leads, units, normalisation, splits, counts, skipped records, cache key, content
                 hash, package versions.
It is written aside and renamed into place, so a directory that has a manifest is complete; `open_dataset` checks
the manifest against the files all the same (a copy can be cut short, a file can be replaced), and `--out` replaces
only a directory whose manifest says it is a prepared dataset.
"""
from __future__ import annotations

import functools
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

from data_prep.checks import describe_checks
from data_prep.constants import CLASSES, LEADS, RECORD_SECONDS, SIGNAL_UNITS, TARGET_UNITS, TARGETS
from data_prep.errors import InputError

SIGNALS, LABELS, MANIFEST = "signals.npy", "labels.parquet", "manifest.json"
NORMALISATIONS = ("zscore", "minmax", "global")
FORMAT_VERSION = 1
KIND = "ecgsearch prepared dataset"  # the manifest's `kind`: what `--out` may replace
COLUMNS = ("record_id", "patient_id", "half", "split", *CLASSES, "label", *TARGETS)
MANIFEST_KEYS = ("source", "rate", "leads", "count", "length", "normalisation", "content_hash")


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


def open_dataset(path: str | Path, check_hash: bool = False) -> PreparedDataset:
    """Open a prepared dataset read-only, checked against its manifest: array shape, dtype, rate, length, leads and
    count, finite samples, the label columns (and the content hash when `check_hash`). A directory that is not one,
    or not a complete one, is an InputError naming it and how to prepare it again."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise InputError(f"{path} is not a prepared dataset (no {MANIFEST}); make one with `ecgsearch data ...`")
    if not is_ours(manifest):
        raise InputError(f"{path} is not a prepared dataset (its {MANIFEST} is not an ecgsearch manifest)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: prepared with format {manifest.get('format_version')}, this ecgsearch reads "
                         f"{FORMAT_VERSION}; {_again(path, manifest)}")
    lacking = [k for k in MANIFEST_KEYS if k not in manifest]
    if lacking:
        raise _incomplete(path, manifest, f"{MANIFEST} lacks {', '.join(lacking)}")
    try:
        signals = np.load(path / SIGNALS, mmap_mode="r")
    except FileNotFoundError:
        raise _incomplete(path, manifest, f"no {SIGNALS}") from None
    except (OSError, ValueError, EOFError) as e:  # cut short, or not an .npy file
        raise _incomplete(path, manifest, f"{SIGNALS} unreadable: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(signals, np.memmap):
        raise _incomplete(path, manifest, f"{SIGNALS} is not an array file")
    _check_signals(path, manifest, signals)
    try:
        labels = pd.read_parquet(path / LABELS)
    except FileNotFoundError:
        raise _incomplete(path, manifest, f"no {LABELS}") from None
    except Exception as e:  # pyarrow's errors for a damaged file are many types; each means the same here
        raise _incomplete(path, manifest, f"{LABELS} unreadable: {str(e).splitlines()[0][:120]}") from None
    missing = [c for c in COLUMNS if c not in labels]
    if missing:
        raise _incomplete(path, manifest, f"{LABELS} lacks columns {', '.join(missing)}")
    if len(labels) != len(signals):
        raise _incomplete(path, manifest, f"{len(signals)} signals but {len(labels)} label rows")
    _check_finite(path, manifest, signals, labels)
    if check_hash and _content_hash(path) != manifest["content_hash"]:
        raise InputError(f"{path}: content hash {_content_hash(path)} differs from the manifest's "
                         f"{manifest['content_hash']} (files changed after preparation); {_again(path, manifest)}")
    return PreparedDataset(path, signals, labels, manifest)


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a directory; None when it has none or one that is not a JSON object."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):  # absent, a directory, not UTF-8, not JSON
        return None
    return manifest if isinstance(manifest, dict) else None


def is_ours(manifest: dict[str, Any]) -> bool:
    """Whether a manifest says it is an ecgsearch prepared dataset (datasets from before `kind` have a cache key
    and content hash)."""
    return manifest.get("kind") == KIND or ("kind" not in manifest and "format_version" in manifest
                                            and {"cache_key", "content_hash"} <= manifest.keys())


def check_out(out: Path, *inputs: Path | None) -> None:
    """`--out` may be a new path, an empty directory or a prepared dataset (which the preparation replaces); an
    output equal to, inside or around an input, an existing file and any other directory are refused."""
    target = out.resolve()
    for given in filter(None, inputs):
        source = Path(given).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise InputError(f"--out {out} overlaps the input {given}: write the dataset outside it")
    if out.is_symlink() and not out.exists():
        raise InputError(f"--out {out} is a broken symbolic link: nothing replaced; choose another --out")
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"--out {out} is an existing file: nothing replaced; choose a directory path")
    manifest = read_manifest(out)
    if any(out.iterdir()) and (manifest is None or not is_ours(manifest)):
        raise InputError(f"--out {out} exists and is not an ecgsearch prepared dataset: nothing replaced "
                         "(--out replaces only a prepared dataset); choose a new directory")


def _again(path: Path, manifest: dict[str, Any]) -> str:
    """How to prepare the dataset at `path` again, as far as its manifest tells."""
    rate = manifest.get("rate", "RATE")
    if manifest.get("source") == "ptbxl":
        command = f"ecgsearch data ptbxl --root {manifest.get('root', 'PTBXL_DIR')} --rate {rate}"
    elif manifest.get("source") == "deepfake" and manifest.get("asc_dir"):
        command = f"ecgsearch data deepfake --asc-dir {manifest['asc_dir']} --rate {rate}"
    elif manifest.get("source") == "deepfake":
        command = f"ecgsearch data deepfake --count {manifest.get('count', 'N')} --rate {rate}"
    else:
        command = "ecgsearch data ptbxl|deepfake ..."
    return f"prepare it again with `{command} --out {path}`"


def _incomplete(path: Path, manifest: dict[str, Any], why: str) -> InputError:
    return InputError(f"{path} is not a complete prepared dataset ({why}): {_again(path, manifest)}")


def _check_signals(path: Path, manifest: dict[str, Any], signals: np.ndarray) -> None:
    """The array against the manifest: (count, leads, length) float32 of ecgsearch's leads, rate x 10 s long."""
    m = manifest
    if m["leads"] != list(LEADS):
        raise _incomplete(path, m, f"manifest leads {m['leads']}, ecgsearch's are {', '.join(LEADS)}")
    if signals.dtype != np.float32 or signals.ndim != 3:
        raise _incomplete(path, m, f"{SIGNALS} holds {signals.dtype} {signals.shape}, expected float32 "
                                   "(records, leads, samples)")
    expected = (m["count"], len(LEADS), m["length"])
    if signals.shape != expected:
        raise _incomplete(path, m, f"{SIGNALS} is {signals.shape}, the manifest says {expected}")
    if not isinstance(m["rate"], int) or m["rate"] * RECORD_SECONDS != signals.shape[-1]:
        raise _incomplete(path, m, f"manifest rate {m['rate']!r} Hz does not fit {signals.shape[-1]} samples per "
                                   f"{RECORD_SECONDS} s record")


def _check_finite(path: Path, manifest: dict[str, Any], signals: np.ndarray, labels: pd.DataFrame) -> None:
    """Every sample finite: the sum of a row is finite exactly when its samples are (float64 cannot overflow on
    float32 values), so one pass finds the bad rows."""
    bad = np.concatenate([np.flatnonzero(~np.isfinite(signals[s].sum(axis=(1, 2), dtype=np.float64))) + s.start
                          for s in _chunks(len(signals))] or [np.zeros(0, dtype=int)])
    if len(bad):
        records = ", ".join(str(r) for r in labels["record_id"].iloc[bad[:5]])
        raise InputError(f"{path}: NaN or infinite samples in {len(bad)} rows (records {records}"
                         f"{', ...' if len(bad) > 5 else ''}); {_again(path, manifest)}")


def cache_key(options: dict[str, Any], files: list[Path] = ()) -> str:
    """A key for the inputs of a preparation: its options and the size and mtime of each input file."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for f in sorted(files):
        st = Path(f).stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def is_current(out: str | Path, key: str) -> bool:
    """True when `out` is a complete dataset prepared with the same cache key (so it can be reused)."""
    manifest = read_manifest(Path(out))
    return manifest is not None and is_ours(manifest) and manifest.get("cache_key") == key


@functools.lru_cache
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
    writes labels and manifest, then replaces `out` (only ever a prepared dataset: `check_out`). Leaving the `with`
    block without `finish` removes the temp dir.
    """

    def __init__(self, out: str | Path, capacity: int, length: int, n_leads: int = len(LEADS)):
        self.out = Path(out)
        check_out(self.out)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        try:
            self.tmp.mkdir(parents=True)
            self.signals = np.lib.format.open_memmap(self.tmp / SIGNALS, mode="w+", dtype=np.float32,
                                                     shape=(max(capacity, 1), n_leads, length))
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise InputError(f"--out {self.out}: cannot write beside it ({e.strerror or e})") from None
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
            "kind": KIND, "format_version": FORMAT_VERSION, "leads": list(LEADS), "units": SIGNAL_UNITS,
            "target_units": TARGET_UNITS, "classes": list(CLASSES), "count": self.count,
            "length": length, **manifest,
            "content_hash": _content_hash(self.tmp),
        }
        norm = manifest.get("normalisation")
        if norm not in NORMALISATIONS:
            raise ValueError(f"manifest normalisation must be one of {NORMALISATIONS}, got {norm!r}")
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        check_out(self.out)  # again: it may have changed while the records were read
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


def describe(path: str | Path, check_hash: bool = False) -> str:
    """A short human summary of a prepared dataset (opened with `check_hash`, and saying so)."""
    ds = open_dataset(path, check_hash)
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
    lines.append(describe_checks(m.get("checks"), m.get("skipped", [])))
    if check_hash:
        lines.append(f"  verified: manifest, shape, dtype, rate, leads, count, finite samples, label columns and "
                     f"content hash {m['content_hash']} all agree")
    return "\n".join(lines)
