"""DeepFake ECGs -> prepared dataset: generated with deepfake-ecg's bundled Pulse2Pulse GAN, or read from the
published `.asc` files with their MUSE ground truth. 8 leads (I, II, V1..V6), 10 s at 500 Hz, or resampled to 100 Hz
(labels are measured at 500 Hz first) to pair with PTB-XL's 100 Hz records."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from tqdm import tqdm

from data_prep import checks, intervals
from data_prep.constants import CLASSES, LEADS, TARGETS
from data_prep.dataset import DatasetWriter, cache_key, check_out, is_current, package_versions
from data_prep.errors import InputError
from data_prep.parallel import ordered_map, stream_into
from data_prep.rates import resample
from data_prep.splits import random_split, split_counts

RATE, LENGTH = 500, 5000
GAN_SCALE_MV = 6.0  # the generator's output x 6000 is microvolts
BATCH = 64
FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
GROUND_TRUTH_COLUMNS = ("patid", "avgrrinterval", "pr", "qrs", "qt")
WHAT = "DeepFake file"


def prepare_deepfake(out: str | Path, count: int | None = None, seed: int = 0, asc_dir: str | Path | None = None,
                     ground_truth: str | Path | None = None, strict: bool = False,
                     workers: int | None = None, rate: int = RATE, outlier_sd: float | None = None) -> Path:
    """Generate `count` ECGs with `seed`, or read the `.asc` files of `asc_dir` (labels from the `ground_truth`
    CSV when given, else the extractor), into the dataset directory `out` (reused when unchanged), at `rate` Hz.
    `outlier_sd` applies the study's outlier rule to the regression labels (`intervals.drop_outliers`)."""
    out = Path(out)
    if rate not in (100, RATE):
        raise InputError(f"DeepFake: rate {rate}: choose 500 (as generated) or 100 (resampled, like PTB-XL's "
                         "records100)")
    if (count is None) == (asc_dir is None):
        raise InputError("DeepFake: give exactly one of count (generate) or asc_dir (read the published .asc files)")
    checks.check_settings(workers, outlier_sd)
    check_out(out, asc_dir, ground_truth)
    if count is not None:
        if count < 1:
            raise InputError(f"DeepFake: count must be at least 1, got {count}")
        if ground_truth is not None:
            raise InputError("DeepFake: --ground-truth goes with --asc-dir, not with generated ECGs")
        return _generate(out, count, seed, workers, rate, outlier_sd)
    return _read_asc(out, Path(asc_dir), Path(ground_truth) if ground_truth else None, seed, strict, workers, rate,
                     outlier_sd)


def _generate(out: Path, count: int, seed: int, workers: int | None, rate: int, outlier_sd: float | None) -> Path:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    key = cache_key({"source": "deepfake", "count": count, "seed": seed, "device": device,
                     "deepfake-ecg": package_versions("deepfake-ecg").get("deepfake-ecg"), "rate": rate,
                     "outlier_sd": outlier_sd})
    if is_current(out, key):
        return out
    measured = []
    with DatasetWriter(out, capacity=count, length=LENGTH * rate // RATE) as writer, ordered_map(workers) as imap, \
            tqdm(total=count, desc="DeepFake generate + label", unit="ECG", disable=None) as progress:
        for batch in generate(count, seed, device):
            for result in imap(_measure, batch):
                measured.append(result)
            writer.write(resample(batch, rate, RATE))
            progress.update(len(batch))
        labels, dropped = _labels(pd.DataFrame(measured), np.arange(count), seed, outlier_sd, strict=False)
        return writer.finish(labels, _manifest(labels, seed, key, "extractor", [], dropped, rate=rate,
                                               outlier_sd=outlier_sd, generator={"device": device, "batch": BATCH}))


def generate(count: int, seed: int, device: str = "cpu") -> Iterator[np.ndarray]:
    """Batches of generated ECGs as (n, 8, 5000) float32 mV; the same seed gives the same ECGs."""
    import deepfakeecg
    import torch

    weights = Path(deepfakeecg.__file__).parent / "checkpoints" / "g_stat.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its init calls the deprecated nn.init.kaiming_normal
        net = deepfakeecg.Generator()
    net.load_state_dict(torch.load(weights, map_location=device, weights_only=True)["stat_dict"])
    net.to(device).eval()
    noise_rng = torch.Generator().manual_seed(seed)  # noise drawn on the CPU, so a seed means the same input anywhere
    with torch.inference_mode():
        for start in range(0, count, BATCH):
            n = min(BATCH, count - start)
            noise = torch.rand(n, len(LEADS), LENGTH, generator=noise_rng) * 2 - 1
            yield (net(noise.to(device)) * GAN_SCALE_MV).float().cpu().numpy()


def _measure(ecg: np.ndarray) -> dict:
    return intervals.measure(ecg, RATE)


def _read_asc(out: Path, asc_dir: Path, ground_truth: Path | None, seed: int, strict: bool,
              workers: int | None, rate: int, outlier_sd: float | None) -> Path:
    if not asc_dir.is_dir():
        raise InputError(f"{asc_dir} is not a directory of DeepFake .asc files")
    files = sorted(asc_dir.glob("*.asc"), key=lambda f: (len(f.stem), f.stem))
    if not files:
        raise InputError(f"{asc_dir}: no .asc files")
    if ground_truth is not None and not ground_truth.is_file():
        raise InputError(f"{ground_truth} not found (the DeepFake ground-truth CSV)")
    key = cache_key({"source": "deepfake", "asc_dir": str(asc_dir.resolve()), "seed": seed, "strict": strict,
                     "ground_truth": str(ground_truth), "rate": rate, "outlier_sd": outlier_sd},
                    files + ([ground_truth] if ground_truth else []))
    if is_current(out, key):
        return out
    truth, dropped = read_ground_truth(ground_truth, strict) if ground_truth else (None, [])
    jobs = [(str(f), truth is None, rate) for f in files]
    length = LENGTH * rate // RATE
    with DatasetWriter(out, capacity=len(files), length=length) as writer, ordered_map(workers) as imap, \
            tqdm(total=len(files), desc="DeepFake .asc", unit="ECG", disable=None) as progress:
        kept, measured, skipped = stream_into(writer, imap(_load_asc, jobs), [f.name for f in files], strict, WHAT,
                                              progress)
        ids = [files[i].stem for i in kept]
        if truth is None:
            targets = pd.DataFrame(measured)
        else:
            targets = truth.reindex(pd.to_numeric(pd.Series(ids), errors="coerce")).reset_index(drop=True)
            targets["label_note"] = np.where(targets[list(TARGETS)].isna().all(axis=1), "not in ground truth", "")
        labels, implausible = _labels(targets, ids, seed, outlier_sd, strict)
        return writer.finish(labels, _manifest(labels, seed, key, "extractor" if truth is None else "muse", skipped,
                                               dropped + implausible, rate=rate, outlier_sd=outlier_sd,
                                               asc_dir=str(asc_dir.resolve()), ground_truth=str(ground_truth)))


def read_asc(path: str | Path) -> np.ndarray:
    """One published DeepFake ECG (5000 rows x 8 integer columns in µV) as (8, 5000) float32 mV."""
    try:
        table = pd.read_csv(path, sep=r"\s+", header=None, dtype=float).to_numpy()
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise InputError(f"not a table of numbers ({type(e).__name__})") from e
    if table.shape != (LENGTH, len(LEADS)):
        raise InputError(f"{table.shape[0]} rows x {table.shape[1]} columns, expected {LENGTH} x {len(LEADS)}")
    signal = (table.T / 1000.0).astype(np.float32)
    checks.check_signal(signal)
    return signal


def _load_asc(job: tuple[str, bool, int]) -> tuple[np.ndarray | None, dict | str]:
    path, measure, rate = job
    try:
        signal = read_asc(path)
    except InputError as e:
        return None, str(e)
    except OSError as e:  # unreadable (a directory named .asc, no permission)
        return None, f"unreadable ({e.strerror or e})"
    return resample(signal, rate, RATE), intervals.measure(signal, RATE) if measure else {}


def read_ground_truth(path: Path, strict: bool = False) -> tuple[pd.DataFrame, list[dict]]:
    """MUSE labels per patid: hr = 60000 / avgrrinterval, pr, qrs, qt in ms; and the labels dropped (cells that are
    not numbers, rows whose patid is not an integer or repeats an earlier one)."""
    table = checks.read_table(path)
    table.columns = [c.lower() for c in table.columns]
    missing = [c for c in GROUND_TRUTH_COLUMNS if c not in table]
    if missing:
        raise InputError(f"{path}: lacks columns {missing} (expected {', '.join(GROUND_TRUTH_COLUMNS)})")
    ids = pd.to_numeric(table["patid"], errors="coerce")
    bad = ids.isna() | (ids != ids.round()) | ids.duplicated()
    dropped = [checks.dropped_label(f"line {i + 2}", "patid", table["patid"].iloc[i],
                                    "repeats an earlier row" if ids.notna().iloc[i] else "not an integer",
                                    path.name, strict) for i in np.flatnonzero(bad.to_numpy())]
    table, ids = table[~bad], ids[~bad].astype(int)
    values, not_numbers = checks.numbers(table, ["avgrrinterval", "pr", "qrs", "qt"], ids, WHAT, strict)
    with np.errstate(divide="ignore"):
        hr = 60000.0 / values["avgrrinterval"]
    labels = pd.DataFrame({"hr": hr, **{t: values[t] for t in ("pr", "qrs", "qt")}})  # inf: dropped, named later
    labels.index = ids.to_numpy()
    return labels, dropped + not_numbers


def _labels(targets: pd.DataFrame, ids, seed: int, outlier_sd: float | None, strict: bool
            ) -> tuple[pd.DataFrame, list[dict]]:
    """The label table of DeepFake rows: no half, a seeded 80/10/10 split, no diagnostic classes; implausible
    regression labels dropped (and returned), then those past `outlier_sd` SD when given."""
    n = len(targets)
    labels = pd.DataFrame({"record_id": [str(i) for i in ids], "patient_id": np.arange(n), "half": ""})
    labels["split"] = random_split(labels["patient_id"], seed, FRACTIONS).to_numpy()
    labels[list(CLASSES)] = 0
    labels["label"] = -1
    for t in (*TARGETS, "label_note"):
        labels[t] = targets[t].to_numpy() if n else []
    labels, dropped = checks.physiological(labels, WHAT, strict)
    return (intervals.drop_outliers(labels, outlier_sd) if outlier_sd else labels), dropped


def _manifest(labels: pd.DataFrame, seed: int, key: str, label_source: str, skipped: list, dropped: list,
              **extra) -> dict:
    return {"source": "deepfake", "recorded_rate": RATE, "normalisation": "zscore",
            "normalisation_note": "signals are stored in mV; the trainer applies per-record per-lead z-score",
            "splits": {"method": "random 80/10/10", "seed": seed, "counts": split_counts(labels)},
            "label_source": label_source, "skipped": skipped, "checks": checks.summary(skipped, dropped),
            "cache_key": key,
            "versions": package_versions("deepfake-ecg", "torch", "neurokit2", "scipy"), **extra}
