"""Promote a search's best trial, or an ensemble of its top trials, to the MLflow Model Registry, moving the alias
`champion` only on improvement.

The registered model is the pyfunc of `search/pyfunc_model.py`, with a `model.pt` as its artifact. We choose pyfunc
over `mlflow.pytorch.log_model` (whose default torch.export/pt2 format fixes the input length and needs an export per
model): the wrapper loads the checkpoint with `ecgmodels.load_checkpoint` (weights_only), so the registry holds the
same bytes the trial wrote (a single trial, logged on its child run) or an `ecgmodels.Ensemble` of those trials'
models (logged on the search's run), each applying its fitted temperature.

Single or ensemble: `ensemble=K` registers the greedy ensemble (search/ensemble.py) of up to K top trials (those
with a logged model: the search's `top_k`) and the search's features + forest candidate (search/forest.py), which
joins every pool and may also be the single best. Without it, promote compares the single best trial with the ensemble
of DEFAULT_ENSEMBLE by split-half cross-fitting on the validation rows (each chosen on one half, scored on the
other, both ways) and registers the ensemble only when it wins there: on the rows that selected it an ensemble
always looks at least as good. The `champion` comparison still uses each version's own validation metric, which
for an ensemble is measured on the rows that selected it (tagged `selected_on_val`).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import numpy as np
import scipy
import torch

import ecgmodels
from data_prep.errors import InputError
from search import ensemble, forest, metrics, pyfunc_model, tracking
from search.pyfunc_model import predict

ALIAS = "champion"
DEFAULT_ENSEMBLE = 10  # top trials promote weighs an ensemble of against the single best, without --ensemble
ENSEMBLE_METRICS = {"val_auc": metrics.macro_auc, "val_acc": metrics.accuracy, "val_mae": metrics.mae,
                    "val_nll": metrics.nll, "val_brier": metrics.brier, "val_ece": metrics.ece}


def metric_mode(metric: str) -> str:
    return "min" if metric.endswith(("_mae", "_loss", "_nll", "_brier", "_ece")) else "max"


@dataclass
class Promotion:
    """What promote did: the version registered, its metric value, whether `champion` moved, and why."""

    name: str
    version: str
    value: float
    moved: bool
    message: str
    kind: str = "single"  # or "ensemble"
    members: list[str] = field(default_factory=list)  # trial numbers of the registered model's trials


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
        raise InputError(f"no search run with id or name {search!r} in the tracking store")
    return runs[0]


class Scored(NamedTuple):
    """A candidate with a logged checkpoint: its metric value, run (a trial's child run, or the search's run for
    the forest logged under `prefix` forest/), local model.pt and the checkpoint's extra."""
    value: float
    run: Any
    path: Path
    extra: dict
    prefix: str = ""


def scored_trials(client: Any, parent: Any, metric: str, workdir: Path) -> list[Scored]:
    """The parent's child runs with a logged checkpoint, and the search's forest (search/forest.py) if it has one,
    best first on `metric` (read from the checkpoint itself, so it is the value of the epoch that checkpoint
    holds)."""
    from ecgmodels.checkpoint import read_checkpoint

    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    scored = []
    for run, prefix in [*((c, "") for c in children), (parent, forest.PREFIX)]:
        if f"{prefix}model.pt" not in {a.path for a in client.list_artifacts(run.info.run_id, prefix or None)}:
            continue
        path = Path(client.download_artifacts(run.info.run_id, f"{prefix}model.pt", str(workdir / run.info.run_id)))
        extra = read_checkpoint(path)["extra"]
        if metric not in extra:
            if prefix:
                continue  # the forest holds classification metrics only
            raise InputError(f"--metric {metric}: the checkpoints hold {', '.join(k for k in extra if 'val' in k)}")
        scored.append(Scored(float(extra[metric]), run, path, extra, prefix))
    if not scored:
        raise InputError(f"search {parent.info.run_name} ({parent.info.run_id}) has no trial with a logged model")
    sign = 1 if metric_mode(metric) == "max" else -1
    return sorted(scored, key=lambda s: -sign * s.value)


def best_trial(client: Any, parent: Any, metric: str, workdir: Path) -> tuple[Any, Path, dict]:
    """The parent's child run whose logged checkpoint scores best on `metric`, with the local model.pt and extra."""
    best = scored_trials(client, parent, metric, workdir)[0]
    return best.run, best.path, best.extra


class Choice(NamedTuple):
    """What to register: the trials (best first for a single one), their weights, the metric value, why, and an
    ensemble's own temperature (fitted on the validation rows it was selected on)."""
    trials: list[Scored]
    weights: list[float]
    value: float
    reason: str
    temperature: float = 1.0


def _number(trial: Scored) -> str:
    return "forest" if trial.prefix else trial.run.data.tags.get("trial_number", trial.run.info.run_id)


def choose(client: Any, top: list[Scored], metric: str, k: int | None) -> Choice:
    """The single best candidate or the greedy ensemble of the top `k` trials and the forest, if the search has
    one (see the module docstring for `k` None). The forest joins the pool whatever its rank: the trials' values
    are of the epochs the same val rows chose, so they rank above an unselected model's."""
    single = Choice(top[:1], [1.0], top[0].value, f"the single best {'candidate' if top[0].prefix else 'trial'} "
                    f"{_number(top[0])}")
    pool = [t for t in top if not t.prefix][:k or DEFAULT_ENSEMBLE] + [t for t in top if t.prefix]
    if k == 1 or len(pool) < 2:
        return single if k == 1 else single._replace(reason=single.reason + " (the only trial with a logged model)")
    task = top[0].extra["task"]
    if metric not in ENSEMBLE_METRICS:
        if k is None:
            return single._replace(reason=single.reason + f" (an ensemble is not scored on {metric})")
        raise InputError(f"--metric {metric}: an ensemble is scored on {', '.join(ENSEMBLE_METRICS)}")
    preds = [ensemble.Predictions.load(client.download_artifacts(t.run.info.run_id, f"{t.prefix}val_predictions.npz",
                                                                 str(t.path.parent))) for t in pool]
    picked = ensemble.greedy(preds, task)
    trials = [pool[m] for m in picked.members]
    avg, truth = ensemble.average(preds, picked), ensemble.common_rows(preds)[0].y_true
    value = ENSEMBLE_METRICS[metric](truth, avg)
    names = ", ".join(f"{_number(t)} ({w:.2f})" for t, w in zip(trials, picked.weights))
    chosen = Choice(trials, picked.weights, float(value), f"the greedy ensemble of trials {names} of the top "
                    f"{len(pool)}", ensemble_temperature(truth, avg, task))
    if len(trials) == 1:
        return single._replace(reason=single.reason + f" (greedy selection over the top {len(pool)} kept one trial)")
    if k is not None:
        return chosen
    held = ensemble.compare(preds, task)
    what, sign = ("macro AUC", 1) if task == "classification" else ("MAE", -1)
    versus = (f"held-out half-split val {what} {sign * held.ensemble[0]:.4f} against the single best's "
              f"{sign * held.single[0]:.4f}")
    if held.ensemble_wins:
        return chosen._replace(reason=chosen.reason + f": it scores {versus}")
    return single._replace(reason=single.reason + f": the ensemble of the top {len(pool)} scores {versus}")


def ensemble_temperature(y_true: np.ndarray, mean: np.ndarray, task: str) -> float:
    """The temperature that calibrates an ensemble's mean probabilities on its validation rows (1 for regression):
    averaging diverse calibrated members leaves the mean underconfident."""
    from ecgmodels import fit_temperature

    if task != "classification":
        return 1.0
    p = np.clip(mean.astype(np.float64), 1e-7, 1 - 1e-7)
    multi = y_true.ndim == 2
    logits = np.log(p) - np.log1p(-p) if multi else np.log(p / p.sum(1, keepdims=True))
    return fit_temperature(torch.from_numpy(logits), torch.from_numpy(y_true), multi_label=multi)


def _register(client: Any, name: str, run_id: str, model: torch.nn.Module, path: Path, extra: dict) -> str:
    """Log `path` as the pyfunc model on `run_id`, registered under `name`; its version."""
    from mlflow.models import infer_signature

    cfg = model.config
    example = np.zeros((1, cfg["n_leads"], cfg["length"]), dtype=np.float32)
    signature = infer_signature(example, predict(model, extra, example))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=pyfunc_model.__file__, artifacts={"model.pt": str(path)},
            code_paths=[str(Path(ecgmodels.__file__).parent)], signature=signature,
            input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
                              f"scipy=={scipy.__version__}",
                              f"mlflow=={mlflow.__version__}"])
    try:  # through the client: log_model(registered_model_name=...) prints "Successfully registered" to stderr
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return str(client.create_model_version(name, info.model_uri, model_id=info.model_id).version)


SHARED_EXTRA = ("task", "target", "classes", "rate", "target_mean", "target_std", "dataset_hash", "pretrained")


def _ensemble_checkpoint(choice: Choice, metric: str, path: Path) -> tuple[torch.nn.Module, dict]:
    """The chosen trials' models as one ecgmodels.Ensemble, saved at `path`, and its checkpoint extra."""
    from ecgmodels import Ensemble, load_checkpoint, save_checkpoint, set_temperature

    first = choice.trials[0].extra
    single_label = first.get("config", {}).get("single_label", True)
    model = Ensemble([load_checkpoint(t.path) for t in choice.trials], choice.weights,
                     multi_label=first["task"] == "classification" and not single_label).eval()
    set_temperature(model, choice.temperature)
    extra = {**{k: first[k] for k in SHARED_EXTRA if k in first}, "config": {"single_label": single_label},
             "members": [t.run.info.run_id for t in choice.trials], "weights": choice.weights, metric: choice.value,
             "temperature": choice.temperature}
    save_checkpoint(model, path, extra=extra)
    return model, extra


def promote(search: str, name: str, metric: str = "val_auc", force: bool = False,
            tracking_uri: str | None = None, ensemble: int | None = None) -> Promotion:
    """Register the best trial of `search`, or the greedy ensemble of its top `ensemble` trials (None: whichever
    of the two wins a split-half check, module docstring), under `name`; move `champion` to it only when it beats
    the current champion on `metric` (or `force`); tag lineage on the version."""
    if ensemble is not None and ensemble < 1:
        raise InputError(f"--ensemble {ensemble}: give the number of top trials to ensemble (1 = the single best)")
    if not name.strip() or any(c in name for c in "/:'\"") or ".." in name:
        raise InputError(f"--name {name!r}: a registered model name is not empty and holds no / : ' \" or ..")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client, uri = tracking.open_store(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    parent = find_search(client, search)
    with tempfile.TemporaryDirectory() as tmp:
        choice = choose(client, scored_trials(client, parent, metric, Path(tmp)), metric, ensemble)
        return register(client, parent, name, metric, choice, force, Path(tmp))


def register(client: Any, parent: Any, name: str, metric: str, choice: Choice, force: bool,
             workdir: Path) -> Promotion:
    """Register what `choice` holds (one trial, or an Ensemble of several built in `workdir`) under `name` with its
    lineage tags, and move `champion` to it if it wins (`_champion`)."""
    from ecgmodels import load_checkpoint

    run_ids = [t.run.info.run_id for t in choice.trials]
    earlier = _registered(client, name, run_ids)
    if earlier is not None:
        return _already(client, name, earlier, metric, force, choice)
    if len(choice.trials) == 1:
        (trial,) = choice.trials
        model, extra, logged_on = load_checkpoint(trial.path).eval(), trial.extra, trial.run.info.run_id
        version = _register(client, name, logged_on, model, trial.path, extra)
    else:
        path = workdir / "ensemble" / "model.pt"
        model, extra = _ensemble_checkpoint(choice, metric, path)
        logged_on = parent.info.run_id
        version = _register(client, name, logged_on, model, path, extra)
    kind, value, numbers = ("single" if len(run_ids) == 1 else "ensemble"), choice.value, \
        [_number(t) for t in choice.trials]
    tags = {"search_run_id": parent.info.run_id, "search_name": parent.info.run_name, "run_id": logged_on,
            "trial_id": ",".join(t.run.data.tags.get("trial_id", "") for t in choice.trials),
            "trial_number": ",".join(numbers), "kind": kind, "member_run_ids": ",".join(run_ids),
            "member_weights": ",".join(f"{w:.4f}" for w in choice.weights), "choice": choice.reason,
            "temperature": f"{choice.temperature:.4f}",
            "dataset_hash": extra.get("dataset_hash", ""), "pretrained": ",".join(extra.get("pretrained", [])),
            "task": extra["task"], "target": str(extra.get("target")), "rate": str(extra.get("rate")),
            "metric": metric, metric: str(value), "selected_on_val": str(kind == "ensemble").lower(),
            **{k: v for k, v in parent.data.tags.items() if k.startswith("pretrained.")}}
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)

    moved, message = _champion(client, name, version, metric, value, force)
    if moved:
        client.set_registered_model_alias(name, ALIAS, version)
    tracking.note_champion(client, parent.info.run_id, f"[{name} version {version}](#/models/{name}/versions/{version})"
                                                       f" ({kind}): {message}")
    return Promotion(name, version, value, moved, f"registered {choice.reason}. {message}", kind, numbers)


def _registered(client: Any, name: str, run_ids: list[str]) -> Any:
    """The version of `name` that already holds exactly these trials, if one does."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:  # no such registered model yet
        return None
    members = ",".join(run_ids)
    return next((v for v in versions if v.tags.get("member_run_ids", v.tags.get("run_id")) == members), None)


def _already(client: Any, name: str, earlier: Any, metric: str, force: bool, choice: Choice) -> Promotion:
    """Promoting the same trials again registers nothing: say which version holds them, and move `champion` to it
    only as a new version would move."""
    value = float(earlier.tags.get(metric, "nan"))
    try:
        current = str(client.get_model_version_by_alias(name, ALIAS).version)
    except mlflow.exceptions.MlflowException:  # no champion yet
        current = None
    if current == str(earlier.version):
        moved, message = False, f"it is {ALIAS} already"
    else:
        moved, message = _champion(client, name, earlier.version, metric, value, force)
        if moved:
            client.set_registered_model_alias(name, ALIAS, earlier.version)
    numbers = [_number(t) for t in choice.trials]
    return Promotion(name, str(earlier.version), value, moved,
                     f"{choice.reason} is already {name} version {earlier.version}: nothing registered; {message}",
                     "single" if len(numbers) == 1 else "ensemble", numbers)


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
