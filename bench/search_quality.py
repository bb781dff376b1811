"""Search quality out of sample: nested cross-validation on the embedded PTB-XL sample, so that no record both
selects and scores a model.

    python bench/search_quality.py --out DIR            # the README's table (5 outer folds, 300 s per search)
    python bench/search_quality.py --folds 3 --budget-s 20 --plain-epochs 1   # a smoke run

The sample's single-label records at 100 Hz are dealt into K outer folds, patient-grouped and class-stratified. On
each, every model is fitted on the other folds and scored on the held-out one:
  search single    `ecgsearch search` (default space, --time-budget) then `promote --ensemble 1`: its best trial
  search ensemble  the same search, `promote --ensemble 5`: the greedy ensemble of its top 5 trials (and forest)
  search promoted  the same search, plain `promote`: the single best or the ensemble of its top 10, as promote
                   chooses on validation (beside the row above: what the wider library gives)
  search forest    the same search's features + forest candidate alone (search/forest.py)
  plain inception  run_trial with one fixed recipe (InceptionTime, z-score, AdamW, cosine, augmentation)
  features + RF    search/evaluate.py's per-lead signal features and random forest
  majority class   one constant, the class frequencies of all the records (per-fold training frequencies, pooled
                   out of fold, anti-correlate with each fold's held-out mix: macro AUC below 0.5)
A search sees the outer-training rows only, split patient-grouped into train and val (or cross-validated inside
with --cv); the registered pyfunc (the user's path: `mlflow.pyfunc.load_model`) predicts the held-out fold.
The table pools the out-of-fold predictions of all folds: macro AUC (one-vs-rest) with a 95% bootstrap CI,
accuracy, NLL, ECE beside the range a perfectly calibrated model making the same predictions would show (labels
drawn from its own probabilities: binned ECE on a few hundred rows is far from 0), the AUC difference from the random
forest (paired bootstrap) and the wall time summed over folds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.constants import CLASSES  # noqa: E402
from data_prep.dataset import LABELS, MANIFEST, SIGNALS, open_dataset  # noqa: E402
from data_prep.ptbxl import prepare_ptbxl  # noqa: E402
from data_prep.splits import random_split  # noqa: E402
from search import metrics  # noqa: E402
from search.evaluate import bootstrap_ci, classical_scores, majority_scores, model_scores, paired_bootstrap  # noqa
from search.evaluate import signal_features  # noqa: E402
from search.folds import cv_folds  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "ptbxl"
INNER_VAL = 0.2  # share of the outer-training patients a search (cv 1) and the plain recipe validate on
PLAIN = {"arch": "inception1d", "norm": "zscore", "lr": 1e-3, "weight_decay": 1e-2, "batch_size": 32,
         "schedule": "cosine", "schedule.warmup_epochs": 1, "patience": 5, "aug.noise.p": 0.5,
         "aug.noise.strength": 0.02, "aug.scale.p": 0.5, "aug.scale.strength": 0.1, "aug.shift.p": 0.5,
         "aug.shift.strength": 0.1}
MODELS = ("search promoted", "search single", "search ensemble", "search forest", "plain inception", "features + RF",
          "majority class")


def prepare(cache: Path) -> Path:
    """The sample at 100 Hz, prepared in `cache` (reused there when the sample is unchanged)."""
    root = cache / "ptbxl"
    if not root.exists():
        shutil.copytree(SAMPLE, root, ignore=shutil.ignore_patterns("records500"))
    return prepare_ptbxl(root, cache / "prepared", split="random", workers=1)


def fold_dataset(data: Path, out: Path, train: np.ndarray, test: np.ndarray, seed: int) -> tuple[Path, dict]:
    """A view of the prepared dataset for one outer fold (signals linked, not copied): the outer-training rows
    split patient-grouped into train/val, the held-out rows `test`, every other row `excluded`; and the rows."""
    ds = open_dataset(data)
    labels = ds.labels.copy()
    labels["split"] = "excluded"
    inner = random_split(labels["patient_id"].iloc[train], seed, {"train": 1 - INNER_VAL, "val": INNER_VAL})
    labels.loc[labels.index[train], "split"] = inner.to_numpy()
    labels.loc[labels.index[test], "split"] = "test"
    labels["half"] = "A"
    out.mkdir(parents=True, exist_ok=True)
    if not (out / SIGNALS).exists():
        os.symlink(data / SIGNALS, out / SIGNALS)
    labels.to_parquet(out / LABELS, index=False)
    manifest = {**ds.manifest, "content_hash": f"{ds.content_hash}-{out.name}"}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    rows = {s: np.flatnonzero(labels["split"].to_numpy() == s) for s in ("train", "val", "test")}
    return out, rows


def search_models(fold_dir: Path, work: Path, args: argparse.Namespace, test_x: np.ndarray) -> dict:
    """Run one budgeted search on the fold's train/val rows; the held-out probabilities of what promote registers
    (single best, ensemble of 5, its own choice) and what it chose."""
    import mlflow

    from search.promote import promote
    from search.spec import SearchSpec
    from search.tuner import run_search

    work.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{work / 'mlflow.db'}"
    spec = SearchSpec(str(fold_dir), "classification", num_samples=args.num_samples, max_epochs=args.max_epochs,
                      time_budget_s=args.budget_s, tracking_uri=store, storage_path=str(work / "ray"),
                      name=fold_dir.name, seed=args.seed, cv=args.cv, experiment="search-quality")
    result = run_search(spec)
    found = {"trials": len(result.table), "per_arch": result.table["arch"].value_counts().to_dict()}
    predicted = {}  # version -> held-out probabilities: promoting the same trials again registers nothing new
    for model, k in (("search promoted", None), ("search single", 1), ("search ensemble", 5)):
        done = promote(result.name, fold_dir.name, tracking_uri=store, ensemble=k)
        if done.version not in predicted:
            pyfunc = mlflow.pyfunc.load_model(f"models:/{done.name}/{done.version}")
            predicted[done.version] = np.asarray(pyfunc.predict(test_x), dtype=np.float64)
        found[model] = predicted[done.version]
        found[f"{model} kind"] = f"{done.kind} {','.join(done.members)}"
    if result.forest:
        from ecgmodels import load_checkpoint
        from search.forest import PREFIX

        path = mlflow.MlflowClient(store).download_artifacts(result.parent_run_id, f"{PREFIX}model.pt", str(work))
        found["search forest"] = model_scores(load_checkpoint(path), test_x, np.arange(len(test_x)))
    return found


def plain_model(data: Path, rows: dict, work: Path, args: argparse.Namespace, test_x: np.ndarray) -> np.ndarray:
    """The fixed recipe trained on the fold's train rows, early-stopped and calibrated on its val rows."""
    from ecgmodels import load_checkpoint
    from search.trainable import run_trial

    config = {**PLAIN, "data": str(data), "task": "classification",
              "max_epochs": args.plain_epochs, "seed": args.seed, "threads": args.threads,
              "rows": {s: rows[s].tolist() for s in ("train", "val")}}
    run_trial(config, report=lambda found, _: None, workdir=work)
    return model_scores(load_checkpoint(work / "best" / "model.pt"), test_x, np.arange(len(test_x)))


def summary(y: np.ndarray, scores: dict[str, np.ndarray], seconds: dict[str, float], n_boot: int) -> pd.DataFrame:
    """One row per model over the pooled out-of-fold predictions."""
    rows = []
    for model, s in scores.items():
        auc, lo, hi = bootstrap_ci(y, s, metrics.macro_auc, n_boot)
        diff = paired_bootstrap(y, s, scores["features + RF"], metrics.macro_auc, n_boot)
        rows.append({"model": model, "macro AUC [95% CI]": f"{auc:.3f} [{lo:.3f}, {hi:.3f}]",
                     "AUC - RF [95% CI]": f"{diff['diff']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]",
                     "accuracy": f"{metrics.accuracy(y, s):.3f}", "NLL": f"{metrics.nll(y, np.clip(s, 1e-7, 1)):.3f}",
                     "ECE": f"{metrics.ece(y, s):.3f}", "ECE if calibrated, 90%": "{:.3f}-{:.3f}".format(
                         *np.quantile(metrics.ece_if_calibrated(s), [0.05, 0.95])), "wall s": f"{seconds[model]:.0f}"})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in table.itertuples(index=False)])


def write(args: argparse.Namespace, y: np.ndarray, rows: np.ndarray, done: np.ndarray, scores: dict,
          seconds: dict, notes: list[str], wall: float) -> str:
    """The table over the folds done so far (written to --out after every fold, so a cut-short run still says
    something), with the run's settings."""
    table = summary(y[done], {m: s[done] for m, s in scores.items()}, seconds, args.n_boot)
    text = (f"{len(notes)} of {args.folds} outer folds, {int(done.sum())} of {len(y)} single-label records "
            f"({', '.join(f'{c} {int((y == i).sum())}' for i, c in enumerate(CLASSES))}); search budget "
            f"{args.budget_s:g} s per fold, cv {args.cv or 'default'}; wall {wall / 60:.1f} min\n\n"
            + markdown(table) + "\n\n" + "\n".join(notes))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        np.savez(args.out / "predictions.npz", y=y, rows=rows, done=done,
                 **{m.replace(" ", "_"): s for m, s in scores.items()})
        (args.out / "table.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folds", type=int, default=5, help="outer folds (default 5)")
    p.add_argument("--budget-s", type=float, default=300, help="wall budget of each outer fold's search (s)")
    p.add_argument("--num-samples", type=int, default=200, help="trial cap per search (the budget usually ends it)")
    p.add_argument("--max-epochs", type=int, default=20, help="epochs cap per trial")
    p.add_argument("--cv", type=int, default=None,
                   help="the search's inner cross-validation folds (1 = a val split; default: the CLI's, 3 here)")
    p.add_argument("--plain-epochs", type=int, default=8, help="epochs of the plain recipe")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the plain recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--out", type=Path, default=None, help="write predictions.npz and table.md here")
    p.add_argument("--cache", type=Path, default=None, help="prepare the sample here once (default: a temp dir)")
    args = p.parse_args(argv)

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="search-quality-") as tmp:
        work = Path(tmp)
        data = prepare(args.cache or work)
        ds = open_dataset(data)
        single = ds.select(single_label=True)
        y_all = ds.labels["label"].to_numpy()
        outer = cv_folds(ds.labels, single, {"task": "classification", "target": None, "seed": args.seed},
                         args.folds)
        features = signal_features(ds.signals[single], ds.rate)
        feature_of = dict(zip(single, features))
        scores = {m: np.zeros((len(single), len(CLASSES))) for m in MODELS}
        scores["majority class"] = majority_scores(y_all[single], len(single))
        seconds = {m: 0.0 for m in MODELS}
        position = {r: i for i, r in enumerate(single)}
        notes, done = [], np.zeros(len(single), dtype=bool)
        for k, fold in enumerate(outer):
            train, test = np.asarray(fold["train"]), np.asarray(fold["val"])
            at = np.array([position[r] for r in test])
            fold_dir, rows = fold_dataset(data, work / f"outer{k}", train, test, args.seed + k)
            test_x = np.asarray(ds.signals[test])
            t = time.monotonic()
            scores["plain inception"][at] = plain_model(fold_dir, rows, work / f"plain{k}", args, test_x)
            seconds["plain inception"] += time.monotonic() - t
            t = time.monotonic()
            fit = {"train": np.array([feature_of[r] for r in train]), "test": np.array([feature_of[r] for r in test])}
            scores["features + RF"][at] = classical_scores(fit, y_all[train], seed=args.seed, n_jobs=2)["test"]
            seconds["features + RF"] += time.monotonic() - t
            t = time.monotonic()
            found = search_models(fold_dir, work / f"search{k}", args, test_x)
            for m in ("search promoted", "search single", "search ensemble", "search forest"):
                if m not in found:  # no forest candidate (--cv K): no row
                    scores.pop(m, None)
                elif m in scores:
                    scores[m][at] = found[m]
                    seconds[m] += time.monotonic() - t
            notes.append(f"fold {k}: {found['trials']} trials {found['per_arch']}; promoted "
                         f"{found['search promoted kind']}, ensemble {found['search ensemble kind']}")
            done[at] = True
            print(notes[-1], flush=True)
            text = write(args, y_all[single], single, done, scores, seconds, notes, time.monotonic() - started)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
