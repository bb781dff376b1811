"""The data of one trial: its rows of the prepared dataset as batches, and the model built for it.

The signals stay a memory map (shared by every trial on the machine through the page cache); batches are gathered
from it by sorted row index, or on a GPU the split is moved there once when it fits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_prep.constants import CLASSES, TARGETS
from data_prep.dataset import PreparedDataset, open_dataset
from data_prep.errors import InputError
from ecgmodels import create_model, default_hparams, freeze, fused_transfer, single_transfer

NORM_FIT_ROWS = 512  # rows of the training split that fit the "global" normalisation


class Split:
    """The rows of one split with their targets, served in batches on `device`."""

    def __init__(self, signals: np.ndarray, rows: np.ndarray, y: np.ndarray, device: torch.device, resident: bool):
        self.signals, self.rows, self.device = signals, rows, device
        self.y = torch.as_tensor(y, device=device)
        self.x = torch.from_numpy(signals[rows]).to(device) if resident else None

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, size: int, rng: np.random.Generator | None = None):
        """(x, y) batches: shuffled by `rng` (dropping a last batch of one row, which BatchNorm cannot train on),
        or in order."""
        order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
        for i in range(0, len(self), size):
            idx = np.sort(order[i:i + size])
            if rng is not None and len(idx) < 2:
                break
            on_device = torch.as_tensor(idx, device=self.device)
            if self.x is not None:
                x = self.x[on_device]
            else:
                x = torch.from_numpy(self.signals[self.rows[idx]]).to(self.device, non_blocking=True)
            yield x, self.y[on_device]

    def subset(self, n: int, seed: int) -> "Split":
        """Up to `n` of its rows, drawn with `seed`, kept in row order."""
        pick = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return Split(self.signals, self.rows[pick], self.y[torch.as_tensor(pick, device=self.device)].cpu().numpy(),
                     self.device, self.x is not None)


_OPENED: dict[str, tuple[int | None, PreparedDataset]] = {}


def open_cached(path: str) -> PreparedDataset:
    """The dataset, opened once per process (and again if it was prepared anew since)."""
    manifest = Path(path) / "manifest.json"
    stamp = manifest.stat().st_mtime_ns if manifest.is_file() else None
    if path not in _OPENED or _OPENED[path][0] != stamp:
        _OPENED[path] = (stamp, open_dataset(path))
    return _OPENED[path][1]


def task_rows(config: dict, ds: PreparedDataset) -> dict[str, np.ndarray]:
    """The train and val row indices of the config's half and task (or its explicit `rows`), checked."""
    task, target = config["task"], config["target"]
    if task == "classification":
        if "classification" not in ds.tasks():
            raise InputError(f"{ds.path} has no class labels; classification needs a dataset with NORM..HYP labels")
        target = None
    elif task == "regression":
        if target not in TARGETS or f"regression:{target}" not in ds.tasks():
            raise InputError(f"{ds.path} has no {target!r} values to regress on; it has {', '.join(ds.tasks())}")
    else:
        raise InputError(f"unknown task {task!r}; choose classification or regression")
    single = bool(config["single_label"]) and task == "classification"
    rows = {s: ds.select(s, config["half"], single, target) for s in ("train", "val")}
    if config["rows"]:  # explicit row sets (the study's cross-fitting): {"train": [...], "val": [...]}
        rows = {s: np.asarray(config["rows"][s], dtype=np.int64) for s in ("train", "val")}
    for s, r in rows.items():
        if len(r) < 2:
            where = f" in half {config['half']}" if config["half"] else ""
            raise InputError(f"{ds.path}: {len(r)} {s} rows{where} for {target or task}; need at least 2")
    return rows


def load_splits(config: dict, device: torch.device) -> tuple[PreparedDataset, Split, Split, dict]:
    """The train and val splits of the config's dataset, half and task, and the target scaling
    (`target_mean`/`target_std`: regression targets are trained standardised)."""
    ds = open_cached(str(config["data"]))
    rows, task, target = task_rows(config, ds), config["task"], config["target"]
    single = bool(config["single_label"]) and task == "classification"
    scaling = {}
    if task == "regression":
        values = {s: ds.labels[target].to_numpy(np.float64)[r] for s, r in rows.items()}
        scaling = {"target_mean": float(values["train"].mean()), "target_std": float(values["train"].std()) or 1.0}
        ys = {s: ((v - scaling["target_mean"]) / scaling["target_std"]).astype(np.float32) for s, v in values.items()}
    elif single:
        ys = {s: ds.labels["label"].to_numpy(np.int64)[r] for s, r in rows.items()}
    else:
        ys = {s: ds.labels[list(CLASSES)].to_numpy(np.float32)[r] for s, r in rows.items()}
    nbytes = sum(len(r) for r in rows.values()) * ds.signals[0].nbytes
    resident = config.get("resident")  # None: on a GPU when the splits fit in a quarter of its free memory
    if resident is None:
        resident = device.type == "cuda" and nbytes < 0.25 * torch.cuda.mem_get_info(device)[0]
    train, val = (Split(ds.signals, rows[s], ys[s], device, resident) for s in ("train", "val"))
    return ds, train, val, scaling


def build_model(config: dict, ds: PreparedDataset, pretrained: dict | None) -> torch.nn.Module:
    """baseline: a fresh zoo model (its "global" normalisation fitted on the training split); single/fused: a new
    head on copies of the pretrained backbone(s), frozen to `freeze_depth`."""
    approach, n_out = config["approach"], 5 if config["task"] == "classification" else 1
    if approach == "baseline":
        hparams = {k[len("arch."):]: v for k, v in config.items() if k.startswith("arch.")}
        unknown = set(hparams) - set(default_hparams(config["arch"]))
        if unknown:
            raise InputError(f"unknown hyperparameter(s) {sorted(unknown)} for {config['arch']}")
        model = create_model(config["arch"], config["task"], n_out, ds.signals.shape[1], ds.length, config["norm"],
                             **hparams, lead_stats=bool(config.get("lead_stats", False)))
        if config["norm"] == "global":  # from the half's training rows, labelled or not: every target pretrained
            rows = ds.select("train", config["half"])  # on one source gets the same scale (fused transfer needs it)
            if config["rows"]:  # explicit rows: fitted on those training rows only
                rows = np.asarray(config["rows"]["train"], dtype=np.int64)
            pick = np.random.default_rng(0).permutation(len(rows))[:NORM_FIT_ROWS]
            model.norm.fit(ds.signals[rows[np.sort(pick)]])
        return model
    if not pretrained:
        raise InputError(f"approach {approach!r} needs pretrained models")
    if approach == "single":
        if len(pretrained) != 1:
            raise InputError(f"approach 'single' takes one pretrained model, got {sorted(pretrained)}")
        model = single_transfer(next(iter(pretrained.values())), n_out)
    elif approach == "fused":
        model = fused_transfer(pretrained, n_out)
    else:
        raise InputError(f"unknown approach {approach!r}; choose baseline, single or fused")
    if model.config["length"] != ds.length or model.config["n_leads"] != ds.signals.shape[1]:
        raise InputError(f"pretrained models take {model.config['n_leads']} leads x {model.config['length']} samples;"
                         f" {ds.path} holds {ds.signals.shape[1]} x {ds.length}")
    return freeze(model, int(config["freeze_depth"]))
