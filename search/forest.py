"""The search's classical candidate: a random forest on per-lead signal features (`ecgmodels.Forest`), fitted by
the driver after the trials and logged on the search's run under `forest/` (model.pt, val_predictions.npz; metrics
`forest_val_*`). promote weighs it like a trial: it may be chosen alone or enter the greedy ensemble beside the nets
(on a few hundred ECGs the two err differently).

It is fitted on the train and val rows together, as a forest needs no early stopping and on small data every row
counts: its val predictions (for its temperature, its metrics and promote's choice) are out of bag, each row scored
by the trees whose bootstrap sample left it out, so no val score comes from a tree that saw the row. They cover the
rows the trials' do: the val rows, or with `cv` K all the train and val rows (the trials' out-of-fold predictions).

Fitted for single-label classification; `SearchSpec(forest=False)` (`--no-forest`) skips it, and the study does, so
that its arms compare nets alone.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.constants import CLASSES
from search import metrics
from search.trial_data import open_cached, task_rows

PREFIX = "forest/"
TREES, LEAVES = 300, 512  # LEAVES caps each tree (and the checkpoint: ~70 bytes a node) on full PTB-XL


def applies(spec: Any) -> bool:
    return spec.forest and spec.task == "classification" and spec.single_label


def fit_forest(spec: Any, workdir: Path) -> tuple[Path, dict]:
    """Fit, calibrate and checkpoint the forest of `spec`'s data, half and rows: (model.pt, its metrics)."""
    from sklearn.ensemble import RandomForestClassifier

    from ecgmodels import Forest, fit_temperature, save_checkpoint, set_temperature, signal_features

    ds = open_cached(str(spec.data))
    rows = task_rows({"task": "classification", "target": None, "single_label": True, "half": spec.half,
                      "rows": None}, ds)
    both = np.concatenate([rows["train"], rows["val"]])
    y = ds.labels["label"].to_numpy(np.int64)[both]
    forest = RandomForestClassifier(TREES, min_samples_leaf=2, max_leaf_nodes=LEAVES, random_state=spec.seed,
                                    class_weight="balanced_subsample", oob_score=True,
                                    n_jobs=max(1, int(spec.max_concurrent * spec.cpus_per_trial)))
    forest.fit(signal_features(ds.signals[both], ds.rate), y)
    model = Forest.from_sklearn(forest, ds.signals.shape[1], ds.length, ds.rate, len(CLASSES))
    scored = slice(len(rows["train"]) if spec.cv == 1 else 0, None)  # the rows the trials' predictions cover
    oob = np.zeros((len(both), len(CLASSES)))
    oob[:, forest.classes_] = forest.oob_decision_function_
    truth = y[scored]
    with torch.no_grad():
        logits = model.temper(torch.from_numpy(oob[scored]))  # at temperature 1
        set_temperature(model, fit_temperature(logits, torch.from_numpy(truth)))
        score = torch.softmax(logits / model.temperature, 1).double().numpy()
    found = {**metrics.classification("val", truth, score), "temperature": float(model.temperature)}
    extra = {**found, "task": "classification", "target": None, "classes": list(CLASSES), "rate": ds.rate,
             "dataset_hash": ds.content_hash, "config": {"single_label": True}, "kind": "forest"}
    path = workdir / "model.pt"
    save_checkpoint(model, path, extra=extra)
    np.savez(workdir / "val_predictions.npz", y_true=truth, y_score=score, rows=both[scored])
    return path, found


def log_forest(client: Any, parent: str, spec: Any) -> dict | None:
    """Fit the forest of a finished search and log it on the search's run; its metrics, or None if it does not
    apply (`applies`)."""
    if not applies(spec):
        return None
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        path, found = fit_forest(spec, Path(tmp))
        client.log_artifact(parent, str(path), PREFIX.rstrip("/"))
        client.log_artifact(parent, str(path.parent / "val_predictions.npz"), PREFIX.rstrip("/"))
    found["seconds"] = time.monotonic() - started
    for k, v in found.items():
        client.log_metric(parent, f"forest_{k}", v)
    return found
