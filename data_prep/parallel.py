"""Preparation plumbing shared by the sources: an ordered process-pool map, and streaming loaded records into a
DatasetWriter with skip-or-fail handling of bad records."""
from __future__ import annotations

import os
from contextlib import contextmanager
from multiprocessing import Pool
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from data_prep.checks import skip_check
from data_prep.dataset import DatasetWriter
from data_prep.errors import InputError

Loaded = tuple[np.ndarray | None, Any]  # (signal (8, L) mV, labels) or (None, reason it is unusable)


@contextmanager
def ordered_map(workers: int | None) -> Iterator[Callable[[Callable, Iterable], Iterator]]:
    """A lazy map in input order over `workers` processes (default: all cores); in-process for one worker."""
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        yield map
        return
    pool = Pool(workers)
    try:
        yield lambda f, jobs: pool.imap(f, jobs, chunksize=4)
    finally:
        pool.terminate()
        pool.join()


def stream_into(writer: DatasetWriter, loaded: Iterable[Loaded], records: list, strict: bool, what: str,
                progress: tqdm) -> tuple[list[int], list[Any], list[dict[str, Any]]]:
    """Write each good signal in order; a bad one is skipped (named on the progress bar and returned in `skipped`)
    or, when `strict`, raises InputError, as does a run where every record is bad. Returns the positions kept,
    their labels and the skipped records."""
    kept, labels, skipped = [], [], []
    for i, (signal, result) in enumerate(loaded):
        progress.update()
        if signal is None:
            if strict:
                raise InputError(f"{what} {records[i]}: {result} (run without --strict to skip it)")
            progress.write(f"skipping {what} {records[i]}: {result}")
            skipped.append({"record": records[i], "reason": result, "check": skip_check(result)})
            continue
        writer.write(signal[None])
        kept.append(i)
        labels.append(result)
    if records and not kept:
        raise InputError(f"every {what} was bad ({len(skipped)} skipped, e.g. {skipped[0]['record']}: "
                         f"{skipped[0]['reason']}); nothing written")
    return kept, labels, skipped
