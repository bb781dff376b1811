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
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from data_prep.constants import CLASSES, TARGET_UNITS
from data_prep.errors import InputError
from search.runlog import BackgroundClient
from search.server import check_http, connect_postgres, is_postgres, mask_text, mask_uri, start_server

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
        check_http(uri, "--tracking-uri")
    elif db is not None and not db.parent.is_dir():
        raise InputError(f"--tracking-uri {uri}: directory {db.parent} does not exist")
    elif is_postgres(uri):  # fails in seconds naming the database, where MLflow would retry for a minute
        connect_postgres(uri, "--tracking-uri").close()
    try:
        client = MlflowClient(uri, registry_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as e:  # any driver error means the same to the user: this store cannot be used
        raise InputError(f"--tracking-uri {mask_uri(uri)} does not answer "
                         f"({mask_text((str(e).strip() or type(e).__name__).splitlines()[0], uri)})") from None
    return client, uri


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI's classic view, not its GenAI one
CLASSIC = "workflowType=machine_learning"  # a link without it opens the GenAI view in 3.17, whatever the kind


def experiment_id(client: MlflowClient, uri: str, name: str = DEFAULT_EXPERIMENT) -> str:
    """The experiment's id, creating it (artifacts beside a sqlite file in `mlartifacts/`, else the server's); its
    kind tag makes the MLflow UI open it in the classic machine-learning view."""
    found = client.get_experiment_by_name(name)
    if found:
        if found.tags.get("mlflow.experimentKind") is None:  # made before ecgsearch set the kind
            client.set_experiment_tag(found.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return found.experiment_id
    db = sqlite_file(uri)
    location = (db.parent / "mlartifacts" / name).as_uri() if db else None
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def ui_url(uri: str, experiment: str, host: str = "127.0.0.1", port: int = 5000, parent: str | None = None) -> str:
    """The runs table of an experiment (the MLflow 3 UI otherwise opens its GenAI view), or with `parent` that
    search's trials, best first (`share_trials_view`)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://{host}:{port}"
    if parent:
        return f"{base}/#{trials_link(experiment, parent)}"
    return f"{base}/#/experiments/{experiment}/runs?{CLASSIC}"


def serve_ui(uri: str | None, port: int = 5000) -> int:
    """The MLflow UI over a local store on 127.0.0.1 until Ctrl-C; prints the runs-table link."""
    client, uri = open_store(uri)
    if uri.startswith(("http://", "https://")):
        print(f"{mask_uri(uri)} is a tracking server already: open {mask_uri(uri)}")
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


# Tune's and the trainable's result names -> MLflow metric names: `lr` is also a param; Tune's time is a system
# metric; `epoch` is every metric's step, not a metric of its own.
METRIC_NAMES = {"lr": "train_lr", "time_this_iter_s": "system/epoch_time_s"}
STATES = {"running": "running", "finished": "finished", "pruned": "stopped", "budget": "stopped", "failed": "failed"}
KEY_PARAMS = 3  # sampled hyperparameters a run name shows besides the architecture


def trial_params(space: Any) -> dict[str, bool]:
    """A trial's params: the config names of a SearchSpace's dimensions in the space's order (conditional ones
    once), each with whether it is sampled (else fixed). The search's constants (data, task, seed, ...) are its
    parent run's params only; warm starts read a trial's dimensions back from its params."""
    conditional = [d for dims in (*space.arch_dims.values(), *space.schedule_dims.values()) for d in dims]
    names: dict[str, bool] = {}
    for d in (*space.dims.values(), *conditional):
        names[d.name] = names.get(d.name, False) or not d.fixed
    return names


def rounded(value: Any) -> str:
    """A param value as text, a float to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value, default=str)


def run_name(number: int, status: str, config: dict, sampled: list[str], epochs: int = 0,
             max_epochs: int = 0) -> str:
    """A trial's run name, read in the runs table (which shows its first 20 or so characters): number, state and
    epochs of max, architecture, the first sampled hyperparameters, e.g. `07 stopped 3/10 resnet1d lr=0.0031`."""
    state = STATES.get(status, status) + (f" {epochs}/{max_epochs}" if epochs and max_epochs else "")
    keys = [k for k in sampled if k in config and k != "arch"][:KEY_PARAMS]
    params = " ".join(f"{k.split('.')[-1]}={rounded(config[k])}" for k in keys)
    return f"{number:02d} {state} {config.get('arch', '')} {params}".strip()


def epoch_metrics(result: dict) -> list[Metric]:
    """A Tune result as MLflow metrics: step = the epoch, names as METRIC_NAMES says, Tune's own keys left out."""
    step, now = int(result.get("epoch", result["training_iteration"])), int(time.time() * 1000)
    return [Metric(METRIC_NAMES.get(k, k), float(v), now, step) for k, v in result.items()
            if k not in _NOT_METRICS and k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)]


class TrialRuns(Callback):
    """A child run per trial under the search's parent run: params = the trial's values of the space's dimensions
    (`params`, from trial_params; sampled ones to 4 significant digits; all of its config when None), metrics per
    epoch (step = epoch; METRIC_NAMES renamed), tag `state` (running / finished / stopped / failed) and a run name
    saying it (`run_name`), tags of where it ran
    (`ray.node_id`, `ray.hostname`, `ray.node_ip`, `gpu`, `gpu_fraction`), status FINISHED (tag `stopped_by`: trainer,
    scheduler or time_budget) or FAILED with tag `failure_reason`. `trials` keeps, per trial number, its trial id,
    run id, status (finished / pruned / budget / failed) and failure reason."""

    def __init__(self, client: MlflowClient, experiment: str, parent_run_id: str, metric: str, num_samples: int,
                 pruned: set[str], params: dict[str, bool] | None = None, max_epochs: int = 0):
        self.client, self.experiment, self.parent = client, experiment, parent_run_id  # writes in the background
        self.metric, self.num_samples, self.max_epochs = metric, num_samples, max_epochs
        self.pruned = pruned  # trial ids the scheduler stopped (filled by the scheduler as it decides)
        self.params = params
        self.sampled = [k for k, sampled in (params or {}).items() if sampled]
        share_trials_view(client, experiment, parent_run_id, metric, self.sampled)
        self.trials: dict[int, dict[str, str]] = {}
        self.runs: dict[str, str] = {}  # trial id -> child run id
        self.placed: set[str] = set()  # trial ids whose run has its placement tags

    @property
    def client(self) -> BackgroundClient:
        return self._client

    @client.setter
    def client(self, client: Any) -> None:
        self._client = client if isinstance(client, BackgroundClient) else BackgroundClient(client)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.client.flush()

    def _name(self, trial: Any, status: str) -> str:
        result = trial.last_result or {}
        return run_name(trial.config.get("trial_number", 0), status, trial.config, self.sampled,
                        int(result.get("epoch", 0)), self.max_epochs)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.runs:
            return
        number = trial.config.get("trial_number")
        run = self.client.create_run(self.experiment, run_name=self._name(trial, "running"), tags={
            "mlflow.parentRunId": self.parent, "trial_id": trial.trial_id, "trial_number": str(number),
            "state": "running", "trial_dir": str(trial.local_path)})
        self.runs[trial.trial_id] = run.info.run_id
        self.trials[number] = {"trial_id": trial.trial_id, "run_id": run.info.run_id, "status": "running",
                               "failure_reason": ""}
        names = self.params if self.params is not None else dict.fromkeys(trial.config, False)
        log_params(self.client, run.info.run_id, {k: rounded(v) if names[k] else v for k, v in trial.config.items()
                                                  if k in names})

    def reattach(self, child: Any) -> None:
        """Take back a child run (an MLflow Run) of a resumed search, with the status it ended in, if it did; the
        epochs Tune recorded (its result.json) that the run lacks (queued when the driver was killed) are logged."""
        tags = child.data.tags
        results = Path(tags.get("trial_dir", "")) / "result.json"
        if results.is_file():
            logged = {m.step for m in self.client.get_metric_history(child.info.run_id, "train_loss")}
            for line in results.read_text().splitlines():
                result = json.loads(line)
                if int(result.get("epoch", result["training_iteration"])) not in logged:
                    self.client.log_batch(child.info.run_id, metrics=epoch_metrics(result))
        status = {"FINISHED": {"scheduler": "pruned", "time_budget": "budget"}.get(tags.get("stopped_by"), "finished"),
                  "FAILED": "failed"}.get(child.info.status, "running")
        self.runs[tags["trial_id"]] = child.info.run_id
        self.placed.add(tags["trial_id"])
        self.trials[int(tags["trial_number"])] = {"trial_id": tags["trial_id"], "run_id": child.info.run_id,
                                                  "status": status, "failure_reason": tags.get("failure_reason", "")}

    def ended(self, trial: Any) -> bool:
        """Whether the trial's child run has ended already (a resumed search re-reports such a trial once)."""
        return self.trials.get(trial.config.get("trial_number"), {}).get("status", "running") != "running"

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.ended(trial):
            return
        metrics = epoch_metrics(result)
        tags = []
        if trial.trial_id not in self.placed:  # where it runs, once (a retried trial may move: its last place wins)
            self.placed.add(trial.trial_id)
            gpus = trial.placement_group_factory.required_resources.get("GPU", 0)
            where = {"ray.node_id": result.get("node_id"), "ray.hostname": result.get("hostname"),
                     "ray.node_ip": result.get("node_ip"), "gpu": result.get("gpu"),
                     "gpu_fraction": f"{gpus:g}" if gpus else None}
            tags = [RunTag(k, str(v)) for k, v in where.items() if v]
        self.client.log_batch(self.runs[trial.trial_id], metrics=metrics, tags=tags)

    def _end(self, number: int, status: str, trial: Any | None = None, stopped_by: str | None = None) -> None:
        """Record a trial's end on its run: state tag, name, `stopped_by`, MLflow status."""
        record = self.trials[number]
        record["status"] = status
        run = record["run_id"]
        tags = [RunTag("state", STATES[status])] + ([RunTag("stopped_by", stopped_by)] if stopped_by else [])
        self.client.log_batch(run, tags=tags)
        if trial is not None:
            self.client.update_run(run, name=self._name(trial, status))
        self.client.set_terminated(run, "FAILED" if status == "failed" else "FINISHED")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.ended(trial):
            return
        pruned = trial.trial_id in self.pruned
        self._end(trial.config.get("trial_number"), "pruned" if pruned else "finished", trial,
                  "scheduler" if pruned else "trainer")

    def stop_by_budget(self) -> None:
        """End every child run still open when the search's time budget ran out: Tune tells no callback of the
        trials it stops then, nor of one whose actor fails as it is stopped."""
        for number, record in self.trials.items():
            if record["status"] == "running":
                self._end(number, "budget", stopped_by="time_budget")
        self.client.flush()  # after the Tuner's end: the search's summary follows at once

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.on_trial_start(iteration, trials, trial)  # a trial can fail before it starts
        error = Path(trial.error_file).read_text() if trial.error_file and Path(trial.error_file).is_file() else None
        number = trial.config.get("trial_number")
        record = self.trials[number]
        record["failure_reason"] = _reason(error)
        self.client.set_tag(record["run_id"], "failure_reason", record["failure_reason"])
        self.client.log_text(record["run_id"], error or record["failure_reason"], "error.txt")
        self._end(number, "failed", trial)


def last_result(client: MlflowClient, run: Any) -> dict[str, float]:
    """A child run's last epoch in the trainable's names (METRIC_NAMES undone, `epoch` from the steps): what a
    resumed search re-reports for a trial whose run had ended."""
    back = {v: k for k, v in METRIC_NAMES.items()}
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    return {**{back.get(k, k): v for k, v in run.data.metrics.items()}, "epoch": max(steps, default=0)}


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


def best_row(table: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """The trials-table row with the best `best_<metric>` (None when no trial reported it)."""
    scores = table[f"best_{metric}"].dropna()
    if scores.empty:
        return None
    return table.loc[scores.idxmax() if mode == "max" else scores.idxmin()]


SHARED_VIEW = "mlflow.sharedViewState."  # experiment tag prefix the UI reads a `viewStateShareKey` link's view from
VIEW_PARAMS = 4  # sampled hyperparameters shown as columns, these first when sampled:
VIEW_FIRST = ("arch", "lr", "weight_decay", "schedule", "batch_size", "freeze_depth", "pretrained_lr_mult")


def share_trials_view(client: MlflowClient, experiment: str, parent: str, metric: str, sampled: list[str]) -> None:
    """Save, as the experiment's shared view keyed by the search's run id, its trials sorted best first by
    `best_<metric>` with the metric, losses, the first sampled hyperparameters and the state tag as columns (no URL
    parameter of the MLflow UI chooses columns; a shared view does)."""
    from search.promote import metric_mode

    columns = [f"metrics.`{m}`" for m in (f"best_{metric}", metric, "val_loss", "train_loss")]
    first = [p for p in VIEW_FIRST if p in sampled]
    columns += [f"params.`{p}`" for p in (first + [p for p in sampled if p not in first])[:VIEW_PARAMS + 1]]
    state = {"searchFilter": f"tags.`mlflow.parentRunId` = '{parent}'", "orderByKey": f"metrics.`best_{metric}`",
             "orderByAsc": metric_mode(metric) == "min", "selectedColumns": list(dict.fromkeys(columns)) +
             ["tags.`state`"]}
    client.set_experiment_tag(experiment, SHARED_VIEW + parent, json.dumps(state))


def trials_link(experiment: str, parent: str) -> str:
    """The UI route (after `#`) of one search's trials in the view `share_trials_view` saved."""
    return f"/experiments/{experiment}/runs?viewStateShareKey={parent}&{CLASSIC}"


def _duration(seconds: float) -> str:
    return time.strftime("%H:%M:%S" if seconds >= 3600 else "%M:%S", time.gmtime(seconds))


def describe_search(client: MlflowClient, parent: str, champion: str | None = None) -> str:
    """The parent run's description (tag `mlflow.note.content`, Markdown in the UI): best trial as a link, trials
    finished / stopped / failed, wall time, the champion version once promoted, and the artifacts to open."""
    run = client.get_run(parent)
    tags, metrics, exp = run.data.tags, run.data.metrics, run.info.experiment_id
    metric = next((k[len("best_"):] for k in metrics if k.startswith("best_")), None)
    end = run.info.end_time or time.time() * 1000
    lines = [f"**Search `{run.info.run_name}`**: {tags.get('approach', '?')} {tags.get('task', '')}"
             f"{'' if tags.get('target') in (None, 'None') else ' of ' + tags['target']} on {tags.get('source', '?')}",
             "",
             f"- Trials: {tags.get('trials', '?')}: {metrics.get('trials_finished', 0):.0f} finished, "
             f"{metrics.get('trials_pruned', 0) + metrics.get('trials_budget', 0):.0f} stopped early, "
             f"{metrics.get('trials_failed', 0):.0f} failed; wall time {_duration((end - run.info.start_time) / 1000)}"]
    if metric and "best_run_id" in tags:
        lines.append(f"- Best: [trial {tags['best_trial_number']}](#/experiments/{exp}/runs/{tags['best_run_id']}"
                     f"?{CLASSIC}) "
                     f"with {metric} {metrics[f'best_{metric}']:.4f} (its run name starts with ★)")
        lines.append(f"- [All trials, best first](#{trials_link(exp, parent)}); stopped ones: "
                     "`tags.state = 'stopped'`")
    champion = champion or tags.get("champion")
    if champion:
        lines.append(f"- Registered: {champion}")
    lines.append("- Artifacts: `search_views.html` (Optuna's interactive figures), `trials.csv`, `search_space.yaml`, "
                 f"`optuna_study.db` (`ecgsearch dashboard {run.info.run_name}`)")
    return "\n".join(lines)


def note_champion(client: MlflowClient, parent: str, text: str) -> None:
    """Record on the search's run which registered version its best trial became (tag `champion`, description)."""
    client.set_tag(parent, "champion", text)
    client.set_tag(parent, "mlflow.note.content", describe_search(client, parent))


def log_search_summary(client: MlflowClient, parent: str, table: pd.DataFrame, space: Any, metric: str,
                       mode: str) -> None:
    """On the parent run: the trials table (CSV), the Optuna views (search_views.html), the best metric and which
    trial reached it (its run renamed `★ ...`, tag `winner`), trial counts and the description."""
    from search.views import log_views

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trials.csv"
        table.drop(columns=["config"]).to_csv(path, index=False)
        client.log_artifact(parent, str(path))
    log_views(client, parent, table, space, metric, mode)
    counts = table["status"].value_counts()
    metrics = {f"trials_{s}": float(counts.get(s, 0)) for s in ("finished", "pruned", "budget", "failed")}
    row = best_row(table, metric, mode)
    if row is not None:
        metrics[f"best_{metric}"] = float(row[f"best_{metric}"])
        client.set_tag(parent, "best_trial_number", str(row["trial_number"]))
        client.set_tag(parent, "best_run_id", row["run_id"])
        winner = client.get_run(row["run_id"])
        client.update_run(row["run_id"], name=f"★ {winner.info.run_name.lstrip('★ ')}")
        client.set_tag(row["run_id"], "winner", "true")
    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric(k, v, now, 0) for k, v in metrics.items() if math.isfinite(v)],
                     tags=[RunTag("trials", str(len(table)))])
    client.set_tag(parent, "mlflow.note.content", describe_search(client, parent))
