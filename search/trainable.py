"""One trial: build the model of a config, train it on the prepared dataset, evaluate and report every epoch, keep
the best epoch's checkpoint, stop early.

    from search.trainable import run_trial
    run_trial({"data": "prepared/ptbxl-100", "task": "classification", "half": "A", "max_epochs": 5})

The contract with the tuner: a flat JSON-able config (DEFAULTS lists the keys; `arch.<hp>`, `schedule.<param>` and
`aug.<name>.p`/`.strength` add to them); per epoch (counted from 1) the metrics `epoch`, `train_loss` (the augmented
batches as trained), `val_loss` (at temperature 1), `lr`, then for classification `temperature` (fitted on the val
rows), `train_acc`, `train_auc`, `val_acc`, `val_auc`, `val_auc_classes` (how many classes val_auc averages over),
`val_f1_<class>`, `val_nll`, `val_brier`, `val_ece` and `best_val_auc`, or for regression `train_mae`, `val_mae`,
`best_val_mae` in the target's units. Train metrics are clean: a fixed subset of up to TRAIN_EVAL_ROWS training rows,
in eval mode after precise BatchNorm, without augmentation; every classification metric but `val_loss` is of the
probabilities at the fitted temperature. The head's bias starts at the log class prior of the training rows.
On improving epochs a checkpoint directory with `model.pt` (ecgmodels checkpoint with that epoch's temperature,
trial facts in its extra) and `val_predictions.npz` (`y_true`, `y_score` calibrated, `rows`), plus `trainer.pt`
(optimiser, schedule, epoch, best so far, RNG states) from which a retried or resumed trial continues (`resume_from`;
under Tune, `ray.tune.get_checkpoint()`).

`cv` K > 1 (search/folds.py): the half's train+val rows are dealt into K patient-grouped, class-stratified folds
(the same for every trial of a search: seeded by `seed`); each epoch trains K models one epoch each, every metric is
the mean over the folds, and the checkpoint holds the fold models (`fold_<i>/`) and, as `model.pt`, their ensemble;
`val_predictions.npz` holds the out-of-fold predictions of all those rows. `fault` = {"trials": [...], "epoch": e,
"kind": "raise"|"nan"|"exit"} fails those trial numbers at epoch e; "exit" ends the process (a crashed worker) only in
an attempt that did not start from a checkpoint, so with e > 1 a retry gets past it and with e = 1 every retry dies.

The data a trial trains on (search/trial_data.py) stays a memory map; on a GPU a split that fits is moved there once
and trained under autocast.
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
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.constants import CLASSES
from data_prep.errors import InputError
from ecgmodels import ECGModel, fit_temperature, init_prior_bias, param_groups, save_checkpoint, set_temperature
from ecgmodels.checkpoint import read_checkpoint
from search import folds, metrics
from search.augment import Augmenter
from search.schedules import Schedule
from search.trial_data import Split, build_model, load_splits, open_cached, task_rows

Report = Callable[[dict, "Path | None"], None]

DEFAULTS = {"task": "classification", "target": None, "half": None, "single_label": True, "approach": "baseline",
            "arch": "inception1d", "norm": "zscore", "lr": 1e-3, "weight_decay": 1e-2, "batch_size": 64,
            "schedule": "constant", "max_epochs": 10, "patience": 3, "seed": 0, "threads": 1, "trial_number": 0,
            "fault": None, "freeze_depth": 0, "pretrained_lr_mult": 1.0, "rows": None, "cv": 1}
TRAIN_EVAL_ROWS = 256  # training rows scored each epoch for the clean train metrics (drawn once per trial)


def search_metric(task: str) -> tuple[str, str]:
    """The metric a search optimises for a task, and its mode."""
    return ("val_auc", "max") if task == "classification" else ("val_mae", "min")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def autocast_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of config key `amp` (bf16, fp16, off); None (the default) is bf16 on a GPU that has it,
    else fp16 on a GPU, else off. `amp: bf16` on the CPU runs the CPU's bf16 autocast (a check without a GPU)."""
    if amp is None:
        cuda = device.type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16 if cuda else None
    if amp not in AMP:
        raise InputError(f"amp {amp!r}: choose {', '.join(AMP)}")
    return AMP[amp]


class Trial:
    """One model on one (train, val) split: the pieces its epochs share. `fold` (cross-validation) varies its
    random streams."""

    def __init__(self, config: dict, pretrained: dict[str, ECGModel] | None, fold: int = 0):
        self.config = config
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.ds, self.train, self.val, self.scaling = load_splits(config, self.device)
        self.model = build_model(config, self.ds, pretrained).to(self.device)
        self.task = config["task"]
        self.multi_label = self.task == "classification" and self.train.y.ndim == 2
        init_prior_bias(self.model, self.train.y, self.multi_label)
        groups = param_groups(self.model, float(config["lr"]), float(config["pretrained_lr_mult"]),
                              float(config["weight_decay"]))
        self.opt = torch.optim.AdamW(groups)
        steps = math.ceil(len(self.train) / int(config["batch_size"]))
        self.metric, self.mode = search_metric(self.task)
        self.schedule = Schedule(self.opt, config, steps, self.mode)
        seed = int(config["seed"]) + int(config["trial_number"]) + 7919 * fold
        self.rng = np.random.default_rng(seed)
        self.augment = Augmenter(config, self.ds.rate, seed, self.device)
        self.train_eval = self.train.subset(TRAIN_EVAL_ROWS, seed)
        self.temperature = 1.0  # of the last evaluation; the model itself trains at 1
        self.amp = autocast_dtype(config.get("amp"), self.device)
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

    def train_epoch(self, poison: bool) -> float:
        """One pass over the shuffled, augmented training rows in train mode; the mean loss of its batches;
        `poison` makes the loss NaN (fault injection)."""
        self.model.train()
        total, n = torch.zeros((), device=self.device), 0
        for x, y in self.train.batches(int(self.config["batch_size"]), self.rng):
            _, loss = self.forward(self.augment(x), y)
            if poison:
                loss = loss * float("nan")
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.schedule.after_batch()
            total += loss.detach() * len(y)
            n += len(y)
        return total.item() / n

    def evaluate(self) -> Evaluation:
        """Precise BatchNorm, then in eval mode: the val loss at temperature 1, the temperature fitted on the val
        rows' logits (classification), and the metrics of the val rows and the fixed training subset at it."""
        with torch.inference_mode():
            recalibrate_batchnorm(self.model, (x for x, _ in self.train.batches(int(self.config["batch_size"]))))
            self.model.eval()
            val_loss, val_out = self.outputs(self.val)
            _, train_out = self.outputs(self.train_eval)
        found = {"val_loss": val_loss}
        if self.task == "classification":
            self.temperature = fit_temperature(val_out.cpu().numpy(), self.val.y.cpu().numpy(), self.multi_label)
            found["temperature"] = self.temperature
        for prefix, split, out in (("train", self.train_eval, train_out), ("val", self.val, val_out)):
            y, score = self.scores(out / self.temperature, split.y)
            found.update(self.split_metrics(prefix, y, score))
        return Evaluation(found, y, score, self.val.rows)

    def outputs(self, split: Split) -> tuple[float, torch.Tensor]:
        """The mean loss and the outputs (float32) of a split, in row order."""
        total, outs = 0.0, []
        for x, y in split.batches(256):
            out, loss = self.forward(x, y)
            total += loss.item() * len(y)
            outs.append(out)
        return total / len(split), torch.cat(outs)

    def scores(self, out: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(y_true, y_score) in the contract's terms: class index (or multi-hot) and probabilities, or values in
        the target's units."""
        if self.task == "regression":
            mean, std = self.scaling["target_mean"], self.scaling["target_std"]
            return (y.cpu().numpy().astype(np.float64) * std + mean,
                    out.squeeze(-1).cpu().numpy().astype(np.float64) * std + mean)
        prob = torch.sigmoid(out) if self.multi_label else torch.softmax(out, 1)
        return y.cpu().numpy(), prob.cpu().numpy().astype(np.float64)

    def split_metrics(self, prefix: str, y: np.ndarray, score: np.ndarray) -> dict:
        if self.task == "regression":
            return {f"{prefix}_mae": metrics.mae(y, score)}
        return metrics.classification(prefix, y, score)

    def facts(self, found: dict, pretrained: dict | None, config: dict) -> dict:
        """A checkpoint's extra: the epoch's metrics and what a reader needs to use the model, as plain values."""
        extra = {**found, "task": self.task, "target": config["target"], "classes": list(CLASSES),
                 "rate": self.ds.rate, **self.scaling, "dataset_hash": self.ds.content_hash,
                 "pretrained": sorted(pretrained or {}), "config": config}
        # numpy scalars (a searcher's samples) become Python values, so the checkpoint loads with weights_only
        return json.loads(json.dumps(extra, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))

    def write(self, directory: Path, found: dict, pretrained: dict | None) -> None:
        """model.pt (at the evaluation's temperature; training goes on at 1) and trainer.pt into `directory`."""
        directory.mkdir(parents=True)
        set_temperature(self.model, self.temperature)
        try:
            save_checkpoint(self.model, directory / "model.pt", extra=self.facts(found, pretrained, self.config))
        finally:
            set_temperature(self.model, 1.0)
        torch.save({"epoch": found["epoch"], "best": _plain(found), "optimizer": self.opt.state_dict(),
                    "schedule": self.schedule.torch.state_dict(), "rng": self.rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(), "aug_rng": self.augment.gen.get_state()},
                   directory / "trainer.pt")

    def restore(self, directory: Path) -> tuple[int, dict]:
        """Load a directory's model (back at temperature 1) and trainer state (weights_only); return its epoch and
        best metrics."""
        self.model.load_state_dict(read_checkpoint(directory / "model.pt")["state_dict"])
        set_temperature(self.model, 1.0)
        state = torch.load(directory / "trainer.pt", map_location="cpu", weights_only=True)
        self.opt.load_state_dict(state["optimizer"])
        self.schedule.torch.load_state_dict(state["schedule"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.augment.gen.set_state(state["aug_rng"])
        self.schedule.after_epoch(state["best"][self.metric])  # saved before its epoch's step, as in run_trial
        return int(state["epoch"]), state["best"]


class Evaluation(NamedTuple):
    """One model's evaluation: its metrics and its val rows' truth and (calibrated) scores."""
    found: dict
    y: np.ndarray
    score: np.ndarray
    rows: np.ndarray


def save_best(directory: Path, trials: list[Trial], found: dict, evals: list[Evaluation],
              pretrained: dict | None) -> None:
    """Write the best-checkpoint directory aside and move it into place: one trial's model.pt and trainer.pt, or
    each fold's in fold_<i>/ and their ensemble as model.pt; val_predictions.npz (out-of-fold with cv)."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if len(trials) == 1:
        trials[0].write(tmp, found, pretrained)
    else:
        for i, trial in enumerate(trials):
            trial.write(tmp / f"fold_{i}", found, pretrained)
        parent = {k: v for k, v in trials[0].config.items() if k != "rows"}
        folds.write_ensemble(tmp / "model.pt", [tmp / f"fold_{i}" / "model.pt" for i in range(len(trials))],
                             trials[0].facts(found, pretrained, parent), trials[0].multi_label)
    y, score, rows = (np.concatenate(parts) for parts in zip(*((e.y, e.score, e.rows) for e in evals)))
    np.savez(tmp / "val_predictions.npz", y_true=y, y_score=score, rows=rows)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


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
    trials = [Trial(c, pretrained, fold) for fold, c in enumerate(fold_configs(config))]
    best_dir = Path(workdir or tempfile.mkdtemp(prefix="ecgsearch-trial-")) / "best"
    faulty = int(config["trial_number"]) in fault.get("trials", ())
    name, sign = trials[0].metric, (1 if trials[0].mode == "max" else -1)
    start, best, since_best = 0, {}, 0
    if resume_from is not None:
        for i, trial in enumerate(trials):
            start, best = trial.restore(Path(resume_from) / (f"fold_{i}" if len(trials) > 1 else ""))
    for epoch in range(start + 1, int(config["max_epochs"]) + 1):
        hit = faulty and epoch == int(fault["epoch"])
        if hit and fault["kind"] == "raise":
            raise RuntimeError(f"injected fault: trial {config['trial_number']} raised at epoch {epoch}")
        if hit and fault["kind"] == "exit" and resume_from is None:
            os._exit(1)
        lr = max(g["lr"] for g in trials[0].opt.param_groups)
        train_loss = float(np.mean([t.train_epoch(poison=hit and fault["kind"] == "nan") for t in trials]))
        if not math.isfinite(train_loss):
            raise RuntimeError(f"training loss became {train_loss} at epoch {epoch} with lr {lr:.3g}")
        evals = [t.evaluate() for t in trials]
        found = {"epoch": epoch, "train_loss": train_loss, **_mean([e.found for e in evals]), "lr": lr}
        if not math.isfinite(found["val_loss"]):
            raise RuntimeError(f"validation loss became {found['val_loss']} at epoch {epoch} with lr {lr:.3g}")
        improved = not best or sign * found[name] > sign * best[name]
        if improved:
            best, since_best = found, 0
            save_best(best_dir, trials, found, evals, pretrained)
        else:
            since_best += 1
        found[f"best_{name}"] = best[name]
        report(found, best_dir if improved else None)
        for trial in trials:
            trial.schedule.after_epoch(found[name])
        if since_best >= int(config["patience"]):
            break
    return {**best, f"best_{name}": best[name]}


def fold_configs(config: dict) -> list[dict]:
    """The config itself (cv 1), or one config per cross-validation fold with its explicit `rows`."""
    k = int(config["cv"])
    if k == 1:
        return [config]
    ds = open_cached(str(config["data"]))
    rows = task_rows(config, ds)
    both = np.sort(np.concatenate([rows["train"], rows["val"]]))
    return [{**config, "rows": fold} for fold in folds.cv_folds(ds.labels, both, config, k)]


def _mean(founds: list[dict]) -> dict:
    """The metrics of one model, or the mean of each metric over the fold models."""
    return founds[0] if len(founds) == 1 else {k: float(np.mean([f[k] for f in founds])) for k in founds[0]}


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

    where = placement()

    def report(found: dict, checkpoint_dir: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report({**found, **where}, checkpoint=checkpoint)

    number = int(config.get("trial_number", DEFAULTS["trial_number"]))
    if ended and number in ended:
        tune.report(ended[number])
        return
    checkpoint = tune.get_checkpoint()
    with (tempfile.TemporaryDirectory(prefix="ecgsearch-trial-") as workdir,
          checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as start):
        run_trial(config, pretrained, report, workdir, resume_from=Path(start) if start else None)


def placement() -> dict[str, str]:
    """Where this trial runs, reported (as text) beside its metrics for the driver to tag its run with: the Ray node
    id and, on a GPU, the device's name and the CUDA device Ray gave this process."""
    import ray

    where = {"node_id": ray.get_runtime_context().get_node_id()}
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
        where["gpu"] = f"{torch.cuda.get_device_name(0)} (CUDA_VISIBLE_DEVICES={visible})"
    return where
