"""MLflow, driver-side only: the store, one parent run per search, a child run per trial (a Ray Tune callback), and
the end-of-search artifacts (trials table, Optuna importances, per-trial plots). Trials never talk to MLflow."""
from __future__ import annotations

import json
import logging
import math
import signal
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import optuna
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from data_prep.constants import CLASSES, TARGET_UNITS
from data_prep.errors import InputError
from search.server import connect_postgres, is_postgres, mask_uri, start_server  # mask_uri: a postgresql:// URI may hold a password

DEFAULT_EXPERIMENT = "ecgsearch"
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # its "Creating initial tables" lines on stderr
_NOT_METRICS = set(AUTO_RESULT_KEYS) - {"time_this_iter_s"}


def default_uri() -> str:
    """`sqlite:///mlflow.db` in the working directory, as an absolute URI."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def open_store(uri: str | None) -> tuple[MlflowClient, str]:
    """A client on the tracking store, checked to answer; a sqlite store gets its schema here, once, before any
    trial starts (two processes creating it at once crash). A store that does not answer is an InputError."""
    uri = uri or default_uri()
    db = sqlite_file(uri)
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except OSError as e:
            raise InputError(f"--tracking-uri {uri} does not answer ({e}); start the server or fix the URI") from None
    elif db is not None and not db.parent.is_dir():
        raise InputError(f"--tracking-uri {uri}: directory {db.parent} does not exist")
    elif is_postgres(uri):  # fails in seconds naming the database, where MLflow would retry for a minute
        connect_postgres(uri, "--tracking-uri").close()
    try:
        client = MlflowClient(uri, registry_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as e:  # any driver error means the same to the user: this store cannot be used
        raise InputError(f"--tracking-uri {mask_uri(uri)} does not answer ({str(e).splitlines()[0]})") from None
    return client, uri


def experiment_id(client: MlflowClient, uri: str, name: str = DEFAULT_EXPERIMENT) -> str:
    """The experiment's id, creating it (artifacts beside a sqlite file in `mlartifacts/`, else the server's)."""
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    db = sqlite_file(uri)
    location = (db.parent / "mlartifacts" / name).as_uri() if db else None
    return client.create_experiment(name, artifact_location=location)


def ui_url(uri: str, experiment: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    """The runs table of an experiment (the MLflow 3 UI otherwise opens its GenAI view)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://{host}:{port}"
    return f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning"


def serve_ui(uri: str | None, port: int = 5000) -> int:
    """The MLflow UI over a local store on 127.0.0.1 until Ctrl-C; prints the runs-table link."""
    client, uri = open_store(uri)
    if uri.startswith(("http://", "https://")):
        print(f"{uri} is a tracking server already: open {uri}")
        return 0
    db = sqlite_file(uri)
    artifacts = db.parent / "mlartifacts" if db else Path.cwd() / "mlartifacts"
    server = start_server(uri, artifacts, host="127.0.0.1", port=port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` of this process stops the server too
    found = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    print(f"MLflow UI on {mask_uri(uri)}: open {ui_url(uri, found.experiment_id, port=port) if found else server.url} "
          "(Ctrl-C stops it)", flush=True)
    try:
        return server.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params in batches (MLflow takes 100 per call); non-string values as JSON."""
    items = [Param(k, v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def _reason(error: str | None) -> str:
    """The last line of an error text (the exception type and message, without Ray's traceback)."""
    lines = [ln.strip() for ln in (error or "unknown error (Ray wrote no error file)").splitlines() if ln.strip()]
    return lines[-1][:500]


class TrialRuns(Callback):
    """A child run per trial under the search's parent run: params = the trial config, metrics per epoch, status
    FINISHED (tag `stopped_by`: trainer or scheduler) or FAILED with tag `failure_reason`. `trials` keeps, per trial
    number, its trial id, run id, status (finished / pruned / failed) and failure reason."""

    def __init__(self, client: MlflowClient, experiment: str, parent_run_id: str, metric: str, num_samples: int,
                 pruned: set[str]):
        self.client, self.experiment, self.parent = client, experiment, parent_run_id
        self.metric, self.num_samples = metric, num_samples
        self.pruned = pruned  # trial ids the scheduler stopped (filled by the scheduler as it decides)
        self.trials: dict[int, dict[str, str]] = {}
        self.runs: dict[str, str] = {}  # trial id -> child run id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.runs:
            return
        number = trial.config.get("trial_number")
        run = self.client.create_run(self.experiment, run_name=f"trial-{number}", tags={
            "mlflow.parentRunId": self.parent, "trial_id": trial.trial_id, "trial_number": str(number)})
        self.runs[trial.trial_id] = run.info.run_id
        self.trials[number] = {"trial_id": trial.trial_id, "run_id": run.info.run_id, "status": "running",
                               "failure_reason": ""}
        log_params(self.client, run.info.run_id, trial.config)

    def reattach(self, child: Any) -> None:
        """Take back a child run (an MLflow Run) of a resumed search, with the status it ended in, if it did."""
        tags = child.data.tags
        status = {"FINISHED": {"scheduler": "pruned", "time_budget": "budget"}.get(tags.get("stopped_by"), "finished"),
                  "FAILED": "failed"}.get(child.info.status, "running")
        self.runs[tags["trial_id"]] = child.info.run_id
        self.trials[int(tags["trial_number"])] = {"trial_id": tags["trial_id"], "run_id": child.info.run_id,
                                                  "status": status, "failure_reason": tags.get("failure_reason", "")}

    def ended(self, trial: Any) -> bool:
        """Whether the trial's child run has ended already (a resumed search re-reports such a trial once)."""
        return self.trials.get(trial.config.get("trial_number"), {}).get("status", "running") != "running"

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.ended(trial):
            return
        step, now = int(result.get("epoch", result["training_iteration"])), int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)]
        self.client.log_batch(self.runs[trial.trial_id], metrics=metrics)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.ended(trial):
            return
        pruned = trial.trial_id in self.pruned
        self.trials[trial.config.get("trial_number")]["status"] = "pruned" if pruned else "finished"
        run = self.runs[trial.trial_id]
        self.client.set_tag(run, "stopped_by", "scheduler" if pruned else "trainer")
        self.client.set_terminated(run, "FINISHED")
        self._progress(trial, "stopped early by ASHA" if pruned else "finished")

    def stop_by_budget(self, number: int) -> None:
        """End the child run of a trial that was still running when the search's time budget ran out."""
        record = self.trials.get(number)
        if record is None or record["status"] != "running":
            return
        record["status"] = "budget"
        self.client.set_tag(record["run_id"], "stopped_by", "time_budget")
        self.client.set_terminated(record["run_id"], "FINISHED")

    def _progress(self, trial: Any, what: str) -> None:
        """One line per ended trial (Ray's own output is turned off)."""
        number, result = trial.config.get("trial_number"), trial.last_result or {}
        best = result.get(f"best_{self.metric}")
        ended = sum(t["status"] != "running" for t in self.trials.values())
        print(f"[{ended}/{self.num_samples}] trial {number} ({trial.config.get('arch')}) {what} after "
              f"{result.get('training_iteration', 0)} epochs" + (f", best {self.metric} {best:.4f}" if best else ""),
              flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.on_trial_start(iteration, trials, trial)  # a trial can fail before it starts
        error = Path(trial.error_file).read_text() if trial.error_file and Path(trial.error_file).is_file() else None
        record = self.trials[trial.config.get("trial_number")]
        record.update(status="failed", failure_reason=_reason(error))
        self.client.set_tag(record["run_id"], "failure_reason", record["failure_reason"])
        self.client.log_text(record["run_id"], error or record["failure_reason"], "error.txt")
        self.client.set_terminated(record["run_id"], "FAILED")
        self._progress(trial, f"FAILED ({record['failure_reason']})")


def prediction_plots(predictions: Path, task: str, target: str | None = None) -> dict[str, plt.Figure]:
    """From a checkpoint's val_predictions.npz: confusion matrix and ROC curves (classification) or predicted
    vs true (regression), as named figures."""
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

    npz = np.load(predictions)
    y, score = npz["y_true"], npz["y_score"]
    if task == "regression":
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(y, score, s=8, alpha=0.6)
        lo, hi = float(min(y.min(), score.min())), float(max(y.max(), score.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        unit = TARGET_UNITS.get(target or "", "")
        ax.set(xlabel=f"true {target} ({unit})", ylabel=f"predicted {target} ({unit})",
               title=f"validation: MAE {np.abs(score - y).mean():.1f} {unit}, n={len(y)}")
        return {"predicted_vs_true.png": fig}
    figs = {}
    onehot = y if y.ndim == 2 else np.eye(len(CLASSES))[y]
    if y.ndim == 1:
        fig, ax = plt.subplots(figsize=(5, 5))
        ConfusionMatrixDisplay.from_predictions(y, score.argmax(1), labels=range(len(CLASSES)),
                                                display_labels=CLASSES, ax=ax, colorbar=False)
        ax.set_title(f"validation confusion matrix (n={len(y)})")
        figs["confusion_matrix.png"] = fig
    fig, ax = plt.subplots(figsize=(5, 5))
    for i, c in enumerate(CLASSES):
        if 0 < onehot[:, i].sum() < len(onehot):
            RocCurveDisplay.from_predictions(onehot[:, i], score[:, i], name=c, ax=ax)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_title("validation ROC, one vs rest")
    figs["roc_curves.png"] = fig
    figs["reliability.png"] = reliability_plot(y, score)
    return figs


def reliability_plot(y: np.ndarray, score: np.ndarray) -> plt.Figure:
    """Reliability diagram of calibrated probabilities: accuracy against confidence of the predicted class
    (single-label), or fraction positive against probability over every row and class (multi-label), with the ECE."""
    from sklearn.calibration import CalibrationDisplay

    from search.metrics import ECE_BINS, ece

    if y.ndim == 1:
        outcome, prob, axis = score.argmax(1) == y, score.max(1), "confidence of the predicted class"
    else:
        outcome, prob, axis = y.ravel().astype(bool), score.ravel(), "predicted probability (every class)"
    fig, ax = plt.subplots(figsize=(5, 5))
    CalibrationDisplay.from_predictions(outcome, prob, n_bins=ECE_BINS, ax=ax, name="validation")
    ax.set(xlabel=axis, ylabel="fraction correct" if y.ndim == 1 else "fraction positive",
           title=f"reliability: ECE {ece(y, score):.3f}, n={len(y)}")
    return fig


def log_figures(client: MlflowClient, run_id: str, figures: dict[str, plt.Figure]) -> None:
    for name, fig in figures.items():
        fig.tight_layout()
        client.log_figure(run_id, fig, name)
        plt.close(fig)


def log_trial_artifacts(client: MlflowClient, run_id: str, checkpoint_dir: Path, task: str,
                        target: str | None) -> None:
    """A top trial's best checkpoint (model.pt, val_predictions.npz) and its plots on its child run."""
    client.log_artifact(run_id, str(checkpoint_dir / "model.pt"))
    client.log_artifact(run_id, str(checkpoint_dir / "val_predictions.npz"))
    log_figures(client, run_id, prediction_plots(checkpoint_dir / "val_predictions.npz", task, target))


def optuna_figures(table: pd.DataFrame, space: Any, metric: str, mode: str) -> dict[str, plt.Figure]:
    """Optuna's parameter importances and parallel coordinates (the 8 most important parameters) over the trials
    that reported the metric, rebuilt as an Optuna study from their configs. Empty with fewer than 3 such trials."""
    from optuna.visualization import matplotlib as ovm

    scored = table[table[f"best_{metric}"].notna()]
    if len(scored) < 3:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for config, value in zip(scored["config"], scored[f"best_{metric}"]):
        params, dists = space.searched(config)
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(value)))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    if not importances:
        return {}
    figs = {"param_importances.png": ovm.plot_param_importances(study, evaluator=evaluator).figure}
    top = list(importances)[:8]
    figs["parallel_coordinates.png"] = ovm.plot_parallel_coordinate(study, params=top).figure
    for fig in figs.values():
        fig.set_size_inches(10, 6)
    return figs


def best_row(table: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """The trials-table row with the best `best_<metric>` (None when no trial reported it)."""
    scores = table[f"best_{metric}"].dropna()
    if scores.empty:
        return None
    return table.loc[scores.idxmax() if mode == "max" else scores.idxmin()]


def log_search_summary(client: MlflowClient, parent: str, table: pd.DataFrame, space: Any, metric: str,
                       mode: str) -> None:
    """On the parent run: the trials table (CSV), Optuna plots, the best metric and which trial reached it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trials.csv"
        table.drop(columns=["config"]).to_csv(path, index=False)
        client.log_artifact(parent, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        log_figures(client, parent, optuna_figures(table, space, metric, mode))
    counts = table["status"].value_counts()
    metrics = {f"trials_{s}": float(counts.get(s, 0)) for s in ("finished", "pruned", "failed")}
    row = best_row(table, metric, mode)
    if row is not None:
        metrics[f"best_{metric}"] = float(row[f"best_{metric}"])
        client.set_tag(parent, "best_trial_number", str(row["trial_number"]))
        client.set_tag(parent, "best_run_id", row["run_id"])
    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric(k, v, now, 0) for k, v in metrics.items() if math.isfinite(v)],
                     tags=[RunTag("trials", str(len(table)))])
