"""One trial: build the model of a config, train it on the prepared dataset, evaluate and report every epoch, keep
the best epoch's checkpoint, stop early.

    from search.trainable import run_trial
    run_trial({"data": "prepared/ptbxl-100", "task": "classification", "half": "A", "max_epochs": 5})

The contract with the tuner: a flat JSON-able config (DEFAULTS lists the keys; `arch.<hp>`, `schedule.<param>` and
`aug.<name>.p`/`.strength` add to them); per epoch (counted from 1) the metrics `epoch`, `train_loss`, `val_loss`,
`lr`, then `train_acc`, `train_auc`, `val_acc`, `val_auc`, `val_f1_<class>`, `best_val_auc` (classification) or
`train_mae`, `val_mae`, `best_val_mae` in the target's units (regression); on improving epochs a checkpoint directory
with `model.pt` (ecgmodels checkpoint, trial facts in its extra) and `val_predictions.npz` (`y_true`, `y_score`,
`rows`), plus `trainer.pt` (optimiser, schedule, epoch, best so far, RNG states) from which a retried or resumed
trial continues (`resume_from`; under Tune, `ray.tune.get_checkpoint()`). `fault` = {"trials": [...], "epoch": e,
"kind": "raise"|"nan"|"exit"} fails those trial numbers at epoch e; "exit" ends the process (a crashed worker) only in
an attempt that did not start from a checkpoint, so with e > 1 a retry gets past it and with e = 1 every retry dies.

The signals stay a memory map (shared by every trial on the machine through the page cache); batches are gathered
from it by sorted row index, or on a GPU the split is moved there once when it fits and trained under autocast.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.constants import CLASSES, TARGETS
from data_prep.dataset import PreparedDataset, open_dataset
from data_prep.errors import InputError
from ecgmodels import ECGModel, create_model, default_hparams, freeze, fused_transfer, param_groups, save_checkpoint
from ecgmodels import single_transfer
from ecgmodels.checkpoint import read_checkpoint
from search import metrics
from search.augment import Augmenter
from search.schedules import Schedule

Report = Callable[[dict, "Path | None"], None]

DEFAULTS = {"task": "classification", "target": None, "half": None, "single_label": True, "approach": "baseline",
            "arch": "inception1d", "norm": "zscore", "lr": 1e-3, "weight_decay": 1e-2, "batch_size": 64,
            "schedule": "constant", "max_epochs": 10, "patience": 3, "seed": 0, "threads": 1, "trial_number": 0,
            "fault": None, "freeze_depth": 0, "pretrained_lr_mult": 1.0, "rows": None}
NORM_FIT_ROWS = 512  # rows of the training split that fit the "global" normalisation


def search_metric(task: str) -> tuple[str, str]:
    """The metric a search optimises for a task, and its mode."""
    return ("val_auc", "max") if task == "classification" else ("val_mae", "min")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


_OPENED: dict[str, tuple[int | None, PreparedDataset]] = {}


def _open(path: str) -> PreparedDataset:
    """The dataset, opened once per process (and again if it was prepared anew since)."""
    manifest = Path(path) / "manifest.json"
    stamp = manifest.stat().st_mtime_ns if manifest.is_file() else None
    if path not in _OPENED or _OPENED[path][0] != stamp:
        _OPENED[path] = (stamp, open_dataset(path))
    return _OPENED[path][1]


def load_splits(config: dict, device: torch.device) -> tuple[PreparedDataset, Split, Split, dict]:
    """The train and val splits of the config's dataset, half and task, and the target scaling
    (`target_mean`/`target_std`: regression targets are trained standardised)."""
    ds = _open(str(config["data"]))
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
                             **hparams)
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


class Trial:
    """The pieces of one trial that its epochs share."""

    def __init__(self, config: dict, pretrained: dict[str, ECGModel] | None):
        self.config = config
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.ds, self.train, self.val, self.scaling = load_splits(config, self.device)
        self.model = build_model(config, self.ds, pretrained).to(self.device)
        self.task = config["task"]
        self.multi_label = self.task == "classification" and self.train.y.ndim == 2
        groups = param_groups(self.model, float(config["lr"]), float(config["pretrained_lr_mult"]),
                              float(config["weight_decay"]))
        self.opt = torch.optim.AdamW(groups)
        steps = math.ceil(len(self.train) / int(config["batch_size"]))
        self.metric, self.mode = search_metric(self.task)
        self.schedule = Schedule(self.opt, config, steps, self.mode)
        seed = int(config["seed"]) + int(config["trial_number"])
        self.rng = np.random.default_rng(seed)
        self.augment = Augmenter(config, self.ds.rate, seed, self.device)
        cuda = self.device.type == "cuda"
        self.amp = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16 if cuda else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model outputs (float32) and the mean loss of one batch."""
        with torch.autocast(self.device.type, self.amp or torch.float32, enabled=self.amp is not None):
            out = self.model(x).float()
        if self.task == "regression":
            return out, F.mse_loss(out.squeeze(-1), y)
        if self.multi_label:
            return out, F.binary_cross_entropy_with_logits(out, y)
        return out, F.cross_entropy(out, y)

    def train_epoch(self, poison: bool) -> tuple[float, np.ndarray, np.ndarray]:
        """One pass over the shuffled training rows; the loss and scores of its batches as trained (augmented, in
        train mode); `poison` makes the loss NaN (fault injection)."""
        self.model.train()
        total, outs, ys = torch.zeros((), device=self.device), [], []
        for x, y in self.train.batches(int(self.config["batch_size"]), self.rng):
            out, loss = self.forward(self.augment(x), y)
            if poison:
                loss = loss * float("nan")
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.schedule.after_batch()
            total += loss.detach() * len(y)
            outs.append(out.detach())
            ys.append(y)
        n = sum(len(y) for y in ys)
        return total.item() / n, *self.scores(torch.cat(outs), torch.cat(ys))

    @torch.inference_mode()
    def evaluate(self) -> tuple[float, np.ndarray, np.ndarray]:
        recalibrate_batchnorm(self.model, (x for x, _ in self.train.batches(int(self.config["batch_size"]))))
        self.model.eval()
        total, outs, ys = 0.0, [], []
        for x, y in self.val.batches(256):
            out, loss = self.forward(x, y)
            total += loss.item() * len(y)
            outs.append(out)
            ys.append(y)
        return total / len(self.val), *self.scores(torch.cat(outs), torch.cat(ys))

    def scores(self, out: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(y_true, y_score) in the contract's terms: class index (or multi-hot) and probabilities, or values in
        the target's units."""
        if self.task == "regression":
            mean, std = self.scaling["target_mean"], self.scaling["target_std"]
            return (y.cpu().numpy().astype(np.float64) * std + mean,
                    out.squeeze(-1).cpu().numpy().astype(np.float64) * std + mean)
        prob = torch.sigmoid(out) if self.multi_label else torch.softmax(out, 1)
        return y.cpu().numpy(), prob.cpu().numpy().astype(np.float64)

    def epoch_metrics(self, prefix: str, loss: float, y: np.ndarray, score: np.ndarray) -> dict:
        found = {f"{prefix}_loss": loss}
        if self.task == "regression":
            return {**found, f"{prefix}_mae": metrics.mae(y, score)}
        found.update({f"{prefix}_acc": metrics.accuracy(y, score), f"{prefix}_auc": metrics.macro_auc(y, score)})
        if prefix == "val":
            found.update({f"val_f1_{c}": float(f) for c, f in zip(CLASSES, metrics.f1_per_class(y, score))})
        return found

    def save(self, directory: Path, found: dict, y: np.ndarray, score: np.ndarray,
             pretrained: dict | None) -> None:
        """Write the best-checkpoint directory aside and move it into place."""
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        extra = {**found, "task": self.task, "target": self.config["target"], "classes": list(CLASSES),
                 "rate": self.ds.rate, **self.scaling, "dataset_hash": self.ds.content_hash,
                 "pretrained": sorted(pretrained or {}), "config": self.config}
        # numpy scalars (a searcher's samples) become Python values, so the checkpoint loads with weights_only
        extra = json.loads(json.dumps(extra, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))
        save_checkpoint(self.model, tmp / "model.pt", extra=extra)
        torch.save({"epoch": found["epoch"], "best": _plain(found), "optimizer": self.opt.state_dict(),
                    "schedule": self.schedule.torch.state_dict(), "rng": self.rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(), "aug_rng": self.augment.gen.get_state()}, tmp / "trainer.pt")
        np.savez(tmp / "val_predictions.npz", y_true=y, y_score=score, rows=self.val.rows)
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)


    def restore(self, directory: Path) -> tuple[int, dict]:
        """Load a checkpoint directory's model and trainer state (weights_only); return its epoch and best metrics."""
        self.model.load_state_dict(read_checkpoint(directory / "model.pt")["state_dict"])
        state = torch.load(directory / "trainer.pt", map_location="cpu", weights_only=True)
        self.opt.load_state_dict(state["optimizer"])
        self.schedule.torch.load_state_dict(state["schedule"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.augment.gen.set_state(state["aug_rng"])
        self.schedule.after_epoch(state["best"][self.metric])  # saved before its epoch's step, as in run_trial
        return int(state["epoch"]), state["best"]


BN_RECALIBRATION_BATCHES = 32


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, batches: Iterable[torch.Tensor],
                          limit: int = BN_RECALIBRATION_BATCHES) -> None:
    """Set the running statistics of every BatchNorm layer that is training (frozen stages keep theirs) to their
    exact average over up to `limit` clean training batches ("precise BN").

    With momentum 0.1 the running statistics lag the weights by about ten steps; a short trial (the embedded sample
    has 5 batches an epoch) is then evaluated with statistics still near their initial values, which biases every
    prediction towards one class (accuracy below the majority class while AUC survives).
    """
    model.train()
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    for x in itertools.islice((x for x in batches if len(x) > 1), limit):  # BatchNorm cannot train on one row
        model(x)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum


def _plain(found: dict) -> dict:
    """Metrics as plain Python floats and ints (numpy scalars do not load with weights_only)."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in found.items()}


def print_report(found: dict, checkpoint_dir: Path | None) -> None:
    """The default `report`: one line per epoch."""
    line = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in found.items())
    print(line + (f"  -> {checkpoint_dir}" if checkpoint_dir else ""), flush=True)


def run_trial(config: dict, pretrained: dict[str, ECGModel] | None = None, report: Report | None = None,
              workdir: str | Path | None = None, resume_from: Path | None = None) -> dict:
    """Train one config, calling `report(metrics, checkpoint_dir)` after every epoch (checkpoint_dir only when the
    val metric improved; it is `workdir/best`, default a new temporary directory); return the best epoch's metrics.
`resume_from`: a checkpoint directory this trial wrote; training continues after its epoch.

    Raises RuntimeError when the loss turns NaN/inf (naming the epoch and lr) or when a fault is injected.
    """
    config = {**DEFAULTS, **config}
    report = report or print_report
    fault = config["fault"] or {}
    if fault and fault.get("kind") not in ("raise", "nan", "exit"):
        raise InputError(f"fault {fault}: kind must be 'raise', 'nan' or 'exit'")
    seed_everything(int(config["seed"]) + int(config["trial_number"]))
    torch.set_num_threads(int(config["threads"]))
    trial = Trial(config, pretrained)
    best_dir = Path(workdir or tempfile.mkdtemp(prefix="ecgsearch-trial-")) / "best"
    faulty = int(config["trial_number"]) in fault.get("trials", ())
    name, sign = trial.metric, (1 if trial.mode == "max" else -1)
    start, best, since_best = 0, {}, 0
    if resume_from is not None:
        start, best = trial.restore(Path(resume_from))
    for epoch in range(start + 1, int(config["max_epochs"]) + 1):
        hit = faulty and epoch == int(fault["epoch"])
        if hit and fault["kind"] == "raise":
            raise RuntimeError(f"injected fault: trial {config['trial_number']} raised at epoch {epoch}")
        if hit and fault["kind"] == "exit" and resume_from is None:
            os._exit(1)
        lr = max(g["lr"] for g in trial.opt.param_groups)
        train_loss, y, score = trial.train_epoch(poison=hit and fault["kind"] == "nan")
        if not math.isfinite(train_loss):
            raise RuntimeError(f"training loss became {train_loss} at epoch {epoch} with lr {lr:.3g}")
        found = {"epoch": epoch, **trial.epoch_metrics("train", train_loss, y, score)}
        val_loss, y, score = trial.evaluate()
        if not math.isfinite(val_loss):
            raise RuntimeError(f"validation loss became {val_loss} at epoch {epoch} with lr {lr:.3g}")
        found.update(trial.epoch_metrics("val", val_loss, y, score), lr=lr)
        improved = not best or sign * found[name] > sign * best[name]
        if improved:
            best, since_best = found, 0
            trial.save(best_dir, found, y, score, pretrained)
        else:
            since_best += 1
        found[f"best_{name}"] = best[name]
        report(found, best_dir if improved else None)
        trial.schedule.after_epoch(found[name])
        if since_best >= int(config["patience"]):
            break
    return {**best, f"best_{name}": best[name]}


def train_trial(config: dict, pretrained: dict[str, ECGModel] | None = None,
                ended: dict[int, dict] | None = None) -> None:
    """The Ray Tune function trainable: run_trial reporting through `ray.tune.report`, with the best checkpoint
    attached on the epochs that improve it (Tune copies it into the trial's storage before `report` returns).
    A trial Tune retries (max_failures) or restores (a resumed search) continues from its checkpoint; one whose
    trial number is in `ended` (a resumed search found it ended after Tune last saved its state) reports its last
    metrics again and returns.
    The working copy is a temporary directory, removed when the trial ends; a trial whose actor Tune kills while it
    waits in `report` (a pruned one, racing the kill) can leave it behind in the temp dir."""
    from ray import tune

    def report(found: dict, checkpoint_dir: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(found, checkpoint=checkpoint)

    number = int(config.get("trial_number", DEFAULTS["trial_number"]))
    if ended and number in ended:
        tune.report(ended[number])
        return
    checkpoint = tune.get_checkpoint()
    with (tempfile.TemporaryDirectory(prefix="ecgsearch-trial-") as workdir,
          checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as start):
        run_trial(config, pretrained, report, workdir, resume_from=Path(start) if start else None)
