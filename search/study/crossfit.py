"""Stage 3: the fine-tuned approaches scored on PTB-XL-B, the only stage that reads its held-out records.

`evaluate: {folds: K}` with K >= 3 cross-fits: every record of half B (the single-label cohort when the study is
single-label) is dealt into K patient-grouped, class-stratified folds; for each approach, seed and fold k, the
approach's chosen configuration (its search's best trial, same epochs budget and patience) is retrained on the
folds other than k and k+1, early-stopped on fold k+1, and predicts fold k. Every record is so scored once per seed
by a model that neither trained nor early-stopped on it; the random forest reference is refitted per fold on the
other folds, the majority class is one constant. Each retraining is saved as it finishes (workdir/evaluation/
units/, keyed), so a rerun or a resumed study trains only what is missing. `folds: 1` scores the registered models
on the test split (train/val/test tables).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from data_prep.constants import CLASSES
from search.study.config import FINETUNE_HALF, TAG, Search, _key, evaluation_key
from search.study.run import runs_model

REPORT_FILES = ("results.csv", "per_class_auc.csv", "tables.md", "differences.png")
# settings the report compares between arms (with every aug.*)
TRAINING_KEYS = ("norm", "lead_stats", "batch_size", "max_epochs", "patience", "schedule", "lr", "weight_decay",
                 "freeze_depth", "pretrained_lr_mult", "arch")


def label(s: Search, cfg: dict) -> tuple[str, str]:
    """The (approach, source) row of a fine-tuning search in the tables."""
    approach = f"single ({cfg['finetune']['single_target']})" if s.approach == "single" else s.approach
    return approach, s.source


def evaluate(client: Any, cfg: dict, found: list[Search], runs: dict, data: Path,
             study_run: str, uri: str, ray_up: Callable[[], None]) -> tuple[dict[str, Path], int]:
    """Stage 3's report files and how many models it trained; reused whole when its key (the fine-tuned
    searches and the evaluation settings) is unchanged and its files are there."""
    from data_prep.dataset import open_dataset
    from search import evaluate as ev
    from search.study import report

    fine = [s for s in found if s.stage == "finetune"]
    key = evaluation_key(cfg, fine)
    out = Path(cfg["workdir"]) / "evaluation" / key
    if client.get_run(study_run).data.tags.get(f"{TAG}evaluation_key") == key and all(
            (out / n).is_file() for n in REPORT_FILES):
        print(f"study: evaluation reused ({out})", flush=True)
        return {n: out / n for n in REPORT_FILES}, 0
    ds = open_dataset(data)
    from ecgmodels.checkpoint import read_checkpoint

    # the chosen configuration: the exact trial config kept in the registered best trial's checkpoint
    chosen = {s.name: read_checkpoint(_checkpoint(runs_model(runs[s.name]), uri))["extra"]["config"] for s in fine}
    backbones = {s.name: {t: _checkpoint(runs_model(runs[n]), uri) for t, n in s.pretrained.items()} for s in fine}
    if cfg["evaluate"]["folds"] > 1:
        scores, groups, retrained, facts = crossfit(cfg, fine, ds, chosen, backbones, ray_up)
        primary = "oof"
    else:
        scores, groups, facts = single_split(cfg, fine, ds, runs, uri)
        primary, retrained = "test", 0
    facts["differences"] = arm_settings(cfg, fine, chosen, backbones)
    facts["fidelity"] = cfg["fidelity"]
    reference = next(iter(k for k in scores if k[0] == "baseline"), ("majority", "-"))
    results, per_class = ev.score_table(scores, reference, cfg["evaluate"]["n_boot"], cfg["seed"], groups, primary)
    paths = report.write_evaluation(results, per_class, out, primary, facts)
    client.set_tag(study_run, f"{TAG}evaluation_key", key)
    return {p.name: p for p in paths}, retrained


def _checkpoint(model: str, uri: str) -> str:
    from search.spec import checkpoint_path

    return str(checkpoint_path(f"models:/{model}", uri))


def folds(cfg: dict, ds: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """The evaluated rows of half B (sorted) and their K patient-grouped, stratified folds."""
    from search.folds import cv_folds

    rows = ds.select(None, FINETUNE_HALF, single_label=cfg["single_label"])
    dealt = cv_folds(ds.labels, rows, {"task": "classification", "target": None, "seed": cfg["seed"]},
                     cfg["evaluate"]["folds"])
    return rows, [np.sort(np.asarray(f["val"], dtype=np.int64)) for f in dealt]


def truth_of(ds: Any, rows: np.ndarray, single: bool) -> np.ndarray:
    return ds.labels["label"].to_numpy()[rows] if single else ds.labels[list(CLASSES)].to_numpy()[rows]


def crossfit(cfg: dict, fine: list[Search], ds: Any, chosen: dict[str, dict], backbones: dict[str, dict],
             ray_up: Callable[[], None]) -> tuple[dict, dict, int, dict]:
    """Out-of-fold scores of every approach (one (seeds, n, 5) array each) and of the reference models."""
    from search import evaluate as ev

    rows, dealt = folds(cfg, ds)
    k, seeds = len(dealt), cfg["evaluate"]["seeds"]
    units_dir = Path(cfg["workdir"]) / "evaluation" / "units"
    units = []  # (search, seed, fold, path, config)
    for s in fine:
        for seed in seeds:
            for i in range(k):
                inner = dealt[(i + 1) % k]
                train = np.sort(np.concatenate([dealt[j] for j in range(k) if j not in (i, (i + 1) % k)]))
                config = {**chosen[s.name], "data": str(ds.path), "half": FINETUNE_HALF, "task": "classification",
                          "single_label": cfg["single_label"], "seed": seed, "trial_number": 0, "cv": 1,
                          "fault": None, "max_epochs": s.max_epochs, "threads": max(1, int(cfg["resources"]
                                                                                         ["cpus_per_trial"])),
                          "rows": {"train": train.tolist(), "val": inner.tolist()}}
                unit = _key({"search": s.key, "seed": seed, "test": dealt[i].tolist(), "config": config})
                units.append((s, seed, i, units_dir / f"{s.name}-seed{seed}-fold{i}-{unit}.npz", config))
    todo = [u for u in units if not u[3].is_file()]
    if todo:
        _train(todo, dealt, backbones, cfg, ray_up)
    single = cfg["single_label"]
    truth = truth_of(ds, rows, single)
    scores = {}
    for s in fine:
        oof = np.full((len(seeds), len(rows), len(CLASSES)), np.nan)
        for s2, seed, i, path, _ in units:
            if s2 is s:
                with np.load(path) as z:
                    oof[seeds.index(seed), np.searchsorted(rows, z["rows"])] = z["y_score"]
        if np.isnan(oof).any():
            raise RuntimeError(f"{s.name}: some records have no out-of-fold score")
        scores[label(s, cfg)] = {"oof": (truth, oof)}
    scores = {**_references(cfg, ds, rows, dealt, truth), **scores}
    in_test = (ds.labels["split"].to_numpy()[rows] == "test")
    facts = {"mode": "crossfit", "n": len(rows), "patients": int(ds.labels["patient_id"].iloc[rows].nunique()),
             "folds": k, "seeds": seeds, "fold_sizes": [len(f) for f in dealt], "trained": len(todo),
             "test_split_n": int(in_test.sum()), "units": [str(u[3]) for u in units],
             "test_split_auc": {key: ev.value(ev.macro_auc, truth[in_test], sc[1][..., in_test, :])
                                for key, by in scores.items() for sc in [by["oof"]]}}
    return scores, {"oof": ds.labels["patient_id"].to_numpy()[rows]}, len(todo), facts


def _references(cfg: dict, ds: Any, rows: np.ndarray, dealt: list[np.ndarray], truth: np.ndarray) -> dict:
    """Random forest refitted per fold on the other folds' records; majority class as one constant, the cohort's
    class frequencies (pooled out of fold, each fold's own training frequencies anti-correlate with its held-out mix
    and score a macro AUC below the 0.5 of no skill)."""
    from search import evaluate as ev

    features = ev.signal_features(ds.signals[rows], ds.rate)
    majority, forest = ev.majority_scores(truth, len(rows)), np.zeros((len(rows), len(CLASSES)))
    for test in dealt:
        held = np.isin(rows, test)
        forest[held] = ev.classical_scores({"train": features[~held], "test": features[held]}, truth[~held],
                                           cfg["seed"], n_jobs=os.cpu_count(),
                                           n_estimators=cfg["evaluate"]["trees"])["test"]
    return {("majority", "-"): {"oof": (truth, majority)}, ("classical", "-"): {"oof": (truth, forest)}}


def _train(todo: list, dealt: list[np.ndarray], backbones: dict, cfg: dict, ray_up: Callable[[], None]) -> None:
    """Retrain the missing units as Ray tasks (resources of one trial each), saving each as it finishes."""
    import ray

    ray_up()
    res = cfg["resources"]
    task = ray.remote(num_cpus=res["cpus_per_trial"], num_gpus=res["gpus_per_trial"])(train_unit)
    pending = {task.remote(config, backbones[s.name], dealt[i], str(path)): path.name
               for s, _, i, path, config in todo}
    print(f"study: stage 3 retrains {len(todo)} models", flush=True)
    done = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ray.get(ready[0])
        done += 1
        print(f"study: [{done}/{len(todo)}] {pending.pop(ready[0])}", flush=True)


def train_unit(config: dict, pretrained: dict[str, str], test_rows: np.ndarray, out: str) -> str:
    """Train one configuration on `config["rows"]` (early-stopped on its val rows), score `test_rows` with the best
    epoch's model, and save the scores beside the rows that model's checkpoint says it trained and stopped on."""
    import torch

    from data_prep.dataset import open_dataset
    from ecgmodels import load_checkpoint
    from ecgmodels.checkpoint import read_checkpoint
    from search.evaluate import model_scores
    from search.trainable import run_trial

    models = {t: load_checkpoint(p) for t, p in pretrained.items()} or None
    with tempfile.TemporaryDirectory(prefix="ecgsearch-crossfit-") as work:
        best = run_trial(config, models, report=lambda *_: None, workdir=work)
        checkpoint = Path(work) / "best" / "model.pt"
        seen = read_checkpoint(checkpoint)["extra"]["config"]["rows"]
        model = load_checkpoint(checkpoint)
    torch.set_num_threads(int(config["threads"]))
    ds = open_dataset(config["data"])
    score = model_scores(model, ds.signals, np.asarray(test_rows), multi_label=not config["single_label"])
    tmp = Path(out).with_suffix(".tmp.npz")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    np.savez(tmp, rows=np.asarray(test_rows), y_score=score, train_rows=np.asarray(seen["train"]),
             val_rows=np.asarray(seen["val"]), epoch=best["epoch"], best_val_auc=best.get("val_auc", np.nan))
    os.replace(tmp, out)
    return out


def single_split(cfg: dict, fine: list[Search], ds: Any, runs: dict, uri: str) -> tuple[dict, dict, dict]:
    """`folds: 1`: the registered models and the references on half B's train, val and test splits."""
    from search import evaluate as ev
    from search.study.run import load_registered

    single = cfg["single_label"]
    rows = {split: ds.select(split, FINETUNE_HALF, single_label=single) for split in ev.SPLITS}
    truth = {split: truth_of(ds, r, single) for split, r in rows.items()}
    scores = {("majority", "-"): {s: (truth[s], ev.majority_scores(truth["train"], len(rows[s]))) for s in rows}}
    features = {s: ev.signal_features(ds.signals[r], ds.rate) for s, r in rows.items()}
    forest = ev.classical_scores(features, truth["train"], cfg["seed"], n_jobs=os.cpu_count(),
                                 n_estimators=cfg["evaluate"]["trees"])
    scores[("classical", "-")] = {s: (truth[s], forest[s]) for s in rows}
    for s in fine:
        model = load_registered(f"models:/{runs_model(runs[s.name])}", uri)
        scores[label(s, cfg)] = {sp: (truth[sp], ev.model_scores(model, ds.signals, rows[sp], not single))
                                 for sp in rows}
    groups = {s: ds.labels["patient_id"].to_numpy()[r] for s, r in rows.items()}
    facts = {"mode": "single", "n": len(rows["test"]), "test_split_n": len(rows["test"]),
             "patients": int(ds.labels["patient_id"].iloc[rows["test"]].nunique())}
    return scores, groups, facts


def arm_settings(cfg: dict, fine: list[Search], chosen: dict[str, dict], backbones: dict) -> dict[str, dict]:
    """setting -> {arm: value} for every training setting whose value differs between the arms (the input
    normalisation of a transfer arm is its backbones')."""
    from ecgmodels.checkpoint import read_checkpoint

    table: dict[str, dict] = {}
    for s in fine:
        c = dict(chosen[s.name])
        c["lead_stats"] = bool(c.get("lead_stats")) and not backbones[s.name]  # a transferred backbone has none
        if backbones[s.name]:
            c["norm"] = read_checkpoint(next(iter(backbones[s.name].values())))["config"]["norm"]
            c["arch"] = read_checkpoint(next(iter(backbones[s.name].values())))["config"]["name"] + " (backbone)"
        arm = " / ".join(label(s, cfg))
        for k in [*TRAINING_KEYS, *sorted(k for k in c if k.startswith("aug."))]:
            table.setdefault(k, {})[arm] = c.get(k)
    return {k: v for k, v in table.items() if len({repr(x) for x in v.values()}) > 1}
