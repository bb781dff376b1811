"""A prepared dataset at a lower sampling rate, derived from one at a higher rate: the same records, labels,
halves and splits, every signal resampled (polyphase, anti-aliased). What a search judged at 100 Hz and retrained
at 500 Hz needs: two datasets that pair record by record (`search/fidelity.py`), whatever the raw files hold.

    low = resample_dataset("prepared/ptbxl-500", "prepared/ptbxl-100", rate=100)   # reused while unchanged
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

from data_prep.dataset import DatasetWriter, _chunks, cache_key, check_out, is_current, open_dataset
from data_prep.errors import InputError


def resample(ecgs: np.ndarray, rate: int, source_rate: int) -> np.ndarray:
    """(…, L) signals at `source_rate` Hz -> `rate` Hz along the last axis; unchanged when the rates are equal."""
    if rate == source_rate:
        return ecgs
    return resample_poly(ecgs, rate, source_rate, axis=-1).astype(np.float32)


def resample_dataset(source: str | Path, out: str | Path, rate: int) -> Path:
    """Write the prepared dataset `source` at `rate` Hz (below its own rate) into `out`, streamed in chunks; reused
    when `out` was made from the same source content at the same rate."""
    src = open_dataset(source)
    if not 0 < rate < src.rate or src.rate % rate:
        raise InputError(f"{src.path}: cannot derive {rate} Hz from {src.rate} Hz (a lower rate that divides it)")
    out = Path(out)
    check_out(out, src.path)
    key = cache_key({"resampled_from": src.content_hash, "rate": rate})
    if is_current(out, key):
        return out
    length = src.length * rate // src.rate
    keep = {k: v for k, v in src.manifest.items()
            if k not in ("kind", "format_version", "count", "length", "content_hash", "cache_key")}
    with DatasetWriter(out, len(src.labels), length, src.signals.shape[1]) as writer:
        for rows in _chunks(len(src.labels)):
            writer.write(resample(np.asarray(src.signals[rows]), rate, src.rate))
        return writer.finish(src.labels, {**keep, "rate": rate, "cache_key": key,
                                          "resampled_from": {"path": str(src.path), "rate": src.rate,
                                                             "content_hash": src.content_hash}})
