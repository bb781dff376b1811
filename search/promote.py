"""Promote a search's best trial to the MLflow Model Registry, moving the alias `champion` only on improvement.

The registered model is the pyfunc of `search/pyfunc_model.py`, with the trial's `model.pt` as its artifact. We choose
pyfunc over `mlflow.pytorch.log_model` (whose default torch.export/pt2 format fixes the input length and needs an
export per model): the wrapper loads the checkpoint with `ecgmodels.load_checkpoint` (weights_only), so the registry
holds the same bytes the trial wrote.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

import ecgmodels
from data_prep.errors import InputError
from search import pyfunc_model, tracking
from search.pyfunc_model import predict

ALIAS = "champion"


def metric_mode(metric: str) -> str:
    return "min" if metric.endswith(("_mae", "_loss")) else "max"


@dataclass
class Promotion:
    """What promote did: the version registered, its metric value, whether `champion` moved, and why."""

    name: str
    version: str
    value: float
    moved: bool
    message: str


def find_search(client: Any, search: str) -> Any:
    """A search's parent run, by run id or by run name (the latest of that name)."""
    try:
        return client.get_run(search)
    except mlflow.exceptions.MlflowException:
        pass
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"attributes.run_name = '{search}'",
                              order_by=["attributes.start_time DESC"])
    runs = [r for r in runs if "trial_id" not in r.data.tags]
    if not runs:
        raise InputError(f"--search {search}: no search run with that id or name in the tracking store")
    return runs[0]


def best_trial(client: Any, parent: Any, metric: str, workdir: Path) -> tuple[Any, Path, dict]:
    """The parent's child run whose logged checkpoint scores best on `metric` (read from the checkpoint itself, so
    it is the value of the epoch that checkpoint holds), with the local model.pt and its extra."""
    from ecgmodels.checkpoint import read_checkpoint

    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    scored = []
    for run in children:
        if "model.pt" not in {a.path for a in client.list_artifacts(run.info.run_id)}:
            continue
        path = Path(client.download_artifacts(run.info.run_id, "model.pt", str(workdir / run.info.run_id)))
        extra = read_checkpoint(path)["extra"]
        if metric not in extra:
            raise InputError(f"--metric {metric}: the checkpoints hold {', '.join(k for k in extra if 'val' in k)}")
        scored.append((float(extra[metric]), run, path, extra))
    if not scored:
        raise InputError(f"search {parent.info.run_name} ({parent.info.run_id}) has no trial with a logged model")
    sign = 1 if metric_mode(metric) == "max" else -1
    _, run, path, extra = max(scored, key=lambda s: sign * s[0])
    return run, path, extra


def promote(search: str, name: str, metric: str = "val_auc", force: bool = False,
            tracking_uri: str | None = None) -> Promotion:
    """Register the best trial of `search` under `name`; move `champion` to it only when it beats the current
    champion on `metric` (or `force`); tag lineage on the version."""
    from mlflow.models import infer_signature

    from ecgmodels import load_checkpoint

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client, uri = tracking.open_store(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    parent = find_search(client, search)
    with tempfile.TemporaryDirectory() as tmp:
        run, path, extra = best_trial(client, parent, metric, Path(tmp))
        model = load_checkpoint(path).eval()
        cfg = model.config
        example = np.zeros((1, cfg["n_leads"], cfg["length"]), dtype=np.float32)
        signature = infer_signature(example, predict(model, extra, example))
        with mlflow.start_run(run_id=run.info.run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=pyfunc_model.__file__, artifacts={"model.pt": str(path)},
                code_paths=[str(Path(ecgmodels.__file__).parent)], signature=signature,
                input_example=example, registered_model_name=name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
                                  f"mlflow=={mlflow.__version__}"])
    version, value = str(info.registered_model_version), float(extra[metric])
    tags = {"search_run_id": parent.info.run_id, "search_name": parent.info.run_name, "run_id": run.info.run_id,
            "trial_id": run.data.tags.get("trial_id", ""), "trial_number": run.data.tags.get("trial_number", ""),
            "dataset_hash": extra.get("dataset_hash", ""), "pretrained": ",".join(extra.get("pretrained", [])),
            "task": extra["task"], "target": str(extra.get("target")), "rate": str(extra.get("rate")),
            "metric": metric, metric: str(value),
            **{k: v for k, v in parent.data.tags.items() if k.startswith("pretrained.")}}
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)

    moved, message = _champion(client, name, version, metric, value, force)
    if moved:
        client.set_registered_model_alias(name, ALIAS, version)
    return Promotion(name, version, value, moved, message)


def _champion(client: Any, name: str, version: str, metric: str, value: float, force: bool) -> tuple[bool, str]:
    """Whether `champion` should move to `version`, and the sentence that says why."""
    new = f"{name} version {version} ({metric} {value:.4f})"
    try:
        current = client.get_model_version_by_alias(name, ALIAS)
    except mlflow.exceptions.MlflowException:
        return True, f"{new} is the first {ALIAS}"
    old_value = current.tags.get(metric)
    old = f"version {current.version} ({metric} {float(old_value):.4f})" if old_value else \
        f"version {current.version} (no {metric} recorded)"
    if force:
        return True, f"{new} is now {ALIAS}, forced over {old}"
    if old_value is None:
        return False, f"{ALIAS} stays at {old}: cannot compare; use --force to move it to {new}"
    sign = 1 if metric_mode(metric) == "max" else -1
    if sign * value > sign * float(old_value):
        return True, f"{new} beats {old} and is now {ALIAS}"
    return False, f"{new} does not beat {ALIAS} {old}; {ALIAS} not moved (use --force to move it)"
