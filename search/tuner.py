"""One search: validate everything, then Ray Tune runs Optuna's trials (TPE over the define-by-run space) under an
ASHA scheduler, while the driver tracks them in MLflow (search/tracking.py).

    from search.spec import SearchSpec
    from search.tuner import run_search
    result = run_search(SearchSpec("prepared/ptbxl-100", "classification", half="A", num_samples=8, max_epochs=4))
    print(result.table)

Optuna's study lives in `--optuna-storage` or, by default, in `<storage path>/<name>-optuna.db` (the param
`optuna_storage` on the parent run), where `ecgsearch dashboard` follows it live.

A search whose driver died or was interrupted (Ctrl-C: parent run KILLED, tag `interrupted`) is finished by
`resume_search(name_or_run_id)`: Ray Tune restores its trials and Optuna searcher from the storage path logged on the
parent run (its params: the SearchSpec; the restored searcher goes on in the same study), finished trials stay
finished, unfinished ones continue from their checkpoints and log to their own child runs again.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune.schedulers import ASHAScheduler

from data_prep.errors import InputError
from search import forest, progress, tracking, warmstart
from search.errors import SearchFailed, SearchInterrupted
from search.optuna_storage import drop_study, open_optuna_storage, study_file_uri
from search.server import mask_uri
from search.space import SearchSpace
from search.spec import SearchSpec
from search.trainable import train_trial

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SearchResult:
    """What a search leaves: its MLflow parent run, a table of all trials and the best one."""

    name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    metric: str
    mode: str
    table: pd.DataFrame  # one row per trial: number, id, run id, status, epochs, best metric, reason, config
    storage: Path
    forest: dict | None = None  # the features + forest candidate's val metrics (search/forest.py), if fitted

    @property
    def best(self) -> pd.Series | None:
        return tracking.best_row(self.table, self.metric, self.mode)

    def ui_url(self, port: int = 5000) -> str:
        """The search's trials in the MLflow UI, best first."""
        return tracking.ui_url(self.tracking_uri, self.experiment_id, port=port, parent=self.parent_run_id)

    def summary(self) -> str:
        """The trials table, the best trial and how to open the MLflow UI on them, for printing."""
        counts = self.table["status"].value_counts()
        cols = ["trial_number", "status", "epochs", f"best_{self.metric}", "arch", "lr", "schedule", "failure_reason"]
        budget = f", {counts['budget']} stopped by the time budget" if counts.get("budget") else ""
        lines = [f"search {self.name}: {len(self.table)} trials ({counts.get('finished', 0)} finished, "
                 f"{counts.get('pruned', 0)} stopped early by ASHA{budget}, {counts.get('failed', 0)} failed); "
                 f"MLflow run {self.parent_run_id}",
                 self.table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"),
                 "per architecture: " + ", ".join(f"{r.arch} {r.trials} trials / {r.epochs} epochs"
                                                  for r in per_architecture(self.table).itertuples())]
        best = self.best
        if best is not None:
            lines.append(f"best: trial {best['trial_number']} ({best['arch']}), {self.metric} "
                         f"{best[f'best_{self.metric}']:.4f}, MLflow run {best['run_id']}")
        if self.forest:
            lines.append(f"features + forest candidate (for promote): val_auc {self.forest['val_auc']:.4f}, val_acc "
                         f"{self.forest['val_acc']:.4f}, fitted in {self.forest['seconds']:.0f} s")
        uri = mask_uri(self.tracking_uri)
        ui = "" if uri.startswith("http") else f"ecgsearch ui --tracking-uri {uri}, then "
        lines.append(f"MLflow UI: {ui}open {mask_uri(self.ui_url())}")
        return "\n".join(lines)


class PruningASHA(ASHAScheduler):
    """ASHA that remembers the trials it stopped before max_t (pruned), so they can be told from finished ones."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.pruned: set[str] = set()

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == self.STOP and result[self._time_attr] < self._max_t:
            self.pruned.add(trial.trial_id)
        return decision


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_search(spec: SearchSpec) -> SearchResult:
    """Run one search and return its result; every setting, the data, the store and the pretrained models are
    checked (`spec.validate()`) before Ray starts."""
    import ray
    from ray import tune

    inputs = spec.validate()
    ds, client, uri = inputs.ds, inputs.client, inputs.uri
    name = spec.name or f"{spec.approach}-{spec.target or spec.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Path(spec.storage_path or Path.cwd() / "ray_results").resolve()
    own_study = not spec.optuna_storage  # the study file beside the Ray state, recorded as the param optuna_storage
    spec = spec.replace(data=str(Path(spec.data).resolve()), name=name, storage_path=str(storage), cv=inputs.cv,
                        optuna_storage=spec.optuna_storage or study_file_uri(storage, name))
    metric, mode = spec.metric
    study_storage = open_optuna_storage(spec.optuna_storage)
    if own_study:
        drop_study(study_storage, name)

    experiment_id = tracking.experiment_id(client, uri, spec.experiment)
    parent = client.create_run(experiment_id, run_name=name, tags={
        "approach": spec.approach, "task": spec.task, "target": str(spec.target),
        "source": ds.manifest.get("source", "unknown"), "dataset_hash": ds.content_hash,
        "mlflow.source.git.commit": git_commit(), **{f"pretrained.{t}": text for t, text in inputs.lineage.items()},
        **(spec.tags or {}), **({"mlflow.parentRunId": spec.parent_run_id} if spec.parent_run_id else {})}).info.run_id
    tracking.log_params(client, parent, {**spec.to_params(), "threads": spec.trial_constants()["threads"],
                                         "storage": str(storage / name), "dataset_rate": ds.rate,
                                         "grace": spec.grace, "startup_trials": spec.startup_trials(inputs.space),
                                         **inputs.space.describe()})
    client.log_dict(parent, inputs.space_spec, "search_space.yaml")
    print(f"search {name}: MLflow run {parent} in {mask_uri(uri)}", flush=True)

    started = False
    try:
        started = init_ray(spec.address)
        searcher = _searcher(spec, inputs.space, warmstart.seed(spec, inputs.space, client, parent, study_storage))
        scheduler, pruned = _scheduler(spec)
        runs = tracking.TrialRuns(client, experiment_id, parent, metric, spec.num_samples, pruned,
                                  tracking.trial_params(inputs.space), spec.max_epochs)
        lines = progress.Progress(metric, mode, spec.num_samples, spec.max_epochs, pruned,
                                  budget_s=spec.time_budget_s)
        tuner = tune.Tuner(
            _trainable(spec, inputs.models),
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=spec.num_samples,
                                        max_concurrent_trials=spec.max_concurrent, time_budget_s=spec.time_budget_s,
                                        reuse_actors=True,
                                        trial_dirname_creator=lambda t: f"trial_{t.config['trial_number']}_{t.trial_id}"),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage), callbacks=[runs, lines], verbose=0,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric,
                                                        checkpoint_score_order=mode)))
    except Exception:
        client.set_terminated(parent, "FAILED")
        if started:
            ray.shutdown()
        raise
    try:
        result = SearchResult(name, parent, experiment_id, uri, metric, mode, pd.DataFrame(), storage / name)
        return _fit(tuner, runs, result, client, inputs.space, spec)
    finally:
        if started:
            ray.shutdown()


def _searcher(spec: SearchSpec, space: SearchSpace, storage: Any) -> Any:
    """OptunaSearch over the define-by-run space, told each trial's best-so-far metric (`best_val_auc`): the value
    of the checkpoint the trial keeps and promote ranks by, not its last epoch's."""
    from optuna.samplers import RandomSampler, TPESampler
    from ray.tune.search.optuna import OptunaSearch

    metric, mode = spec.metric
    sampler = (TPESampler(seed=spec.seed, n_startup_trials=spec.startup_trials(space)) if spec.sampler == "tpe"
               else RandomSampler(seed=spec.seed))
    return OptunaSearch(space=space, metric=f"best_{metric}", mode=mode, sampler=sampler, study_name=spec.name,
                        storage=storage)


def _scheduler(spec: SearchSpec) -> tuple[Any, set[str]]:
    """ASHA on the best-so-far metric (rungs at grace x reduction_factor^k epochs), or FIFO; and the set the
    scheduler fills with the trials it stopped."""
    from ray.tune.schedulers import FIFOScheduler

    if not spec.asha:
        return FIFOScheduler(), set()
    metric, mode = spec.metric
    asha = PruningASHA(metric=f"best_{metric}", mode=mode, time_attr="training_iteration", max_t=spec.max_epochs,
                       grace_period=spec.grace, reduction_factor=spec.reduction_factor)
    return asha, asha.pruned


def _trainable(spec: SearchSpec, models: dict, ended: dict | None = None) -> Any:
    from ray import tune

    return tune.with_resources(tune.with_parameters(train_trial, pretrained=models or None, ended=ended),
                               {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial})


def init_ray(address: str | None) -> bool:
    """Join `address` or start a local Ray sized to the machine (no dashboard), unless Ray is up; True if started.
    Tune saves its experiment state at least every second, so a killed driver loses at most a second of it."""
    import ray

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # one save per improvement
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level=progress.RAY_LOGGING_LEVEL)
    return True


def _fit(tuner: Any, runs: tracking.TrialRuns, result: SearchResult, client: Any, space: SearchSpace,
         spec: SearchSpec) -> SearchResult:
    """Run (or continue) the Tuner; log the top trials' artifacts and the summary on the parent run, which ends
    FINISHED; FAILED when every trial failed (SearchFailed); or KILLED with tag `interrupted` when Ctrl-C stopped it
    (SearchInterrupted). A search that reaches its time budget has finished: the trials Tune stopped then are
    recorded as stopped by the budget (status `budget`, tag stopped_by=time_budget)."""
    parent, metric, mode = result.parent_run_id, result.metric, result.mode
    status = "FAILED"
    started = time.monotonic()
    handlers = _signal_handlers()
    try:
        try:
            results = tuner.fit()
        finally:  # Tune leaves its Ctrl-C handler installed: a later Ctrl-C (a study's stage 3) would be swallowed
            _restore(handlers)
        unfinished = [r for r in results if not r.error and not r.metrics.get("done")]
        budget_over = spec.time_budget_s is not None and time.monotonic() - started >= spec.time_budget_s - 1
        if (unfinished and not budget_over) or (spec.time_budget_s is None and len(results) < spec.num_samples):
            status = "KILLED"
            client.set_tag(parent, "interrupted", "true")
            raise SearchInterrupted(f"search {result.name} interrupted with {len(unfinished)} trials unfinished; "
                                    f"finish it with: ecgsearch resume {result.name} --tracking-uri "
                                    f"{mask_uri(result.tracking_uri)}")
        if budget_over:
            runs.stop_by_budget()
        result.table = table = trials_table(results, runs, metric)
        if len(table) and (table["status"] == "failed").all():
            reasons = table["failure_reason"].value_counts()
            raise SearchFailed(f"search {result.name}: all {len(table)} trials failed; most common reason "
                               f"({reasons.iloc[0]}x): {reasons.index[0]}")
        top = table[table[f"best_{metric}"].notna()].sort_values(f"best_{metric}", ascending=mode == "min")
        checkpoints = {r.config["trial_number"]: r.checkpoint for r in results if r.checkpoint}
        for number, run_id in zip(top["trial_number"][:spec.top_k], top["run_id"][:spec.top_k]):
            if number in checkpoints:
                with checkpoints[number].as_directory() as d:
                    tracking.log_trial_artifacts(client, run_id, Path(d), spec.task, spec.target)
        tracking.log_search_summary(client, parent, table, space, metric, mode)
        client.log_text(parent, per_architecture(table).to_string(index=False), "trials_per_arch.txt")
        result.forest = forest.log_forest(client, parent, spec)
        status = "FINISHED"
    except KeyboardInterrupt:  # a second Ctrl-C, while Tune was saving its state
        status = "KILLED"
        client.set_tag(parent, "interrupted", "true")
        raise
    finally:
        client.set_terminated(parent, status)
    return result


def _signal_handlers() -> dict:
    """SIGINT's and SIGUSR1's handlers now (none off the main thread, where Tune installs none)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)}


def _restore(handlers: dict) -> None:
    for s, handler in handlers.items():
        signal.signal(s, handler)


def per_architecture(table: pd.DataFrame) -> pd.DataFrame:
    """Trials and epochs each architecture got (did the search explore before it narrowed?)."""
    return (table.groupby("arch", dropna=False).agg(trials=("trial_number", "size"), epochs=("epochs", "sum"))
            .reset_index().sort_values("trials", ascending=False))


def resume_search(search: str, tracking_uri: str | None = None) -> SearchResult:
    """Finish a search whose driver was killed or interrupted (by its parent run's id or name): Tune restores the
    trials and the Optuna searcher from the storage path on the parent run (errored trials are retried); each trial
    logs to its own child run again, and child runs of trials Tune never recorded (in flight at the kill) are
    deleted, so there is one child run per trial. A trial whose child run ended in the second before the driver
    died, after Tune last saved its state, is not trained again."""
    import ray
    from ray import tune

    from search.promote import find_search

    client, uri = tracking.open_store(tracking_uri)
    run = find_search(client, search)
    name, parent = run.info.run_name, run.info.run_id
    if "num_samples" not in run.data.params or "storage" not in run.data.params:
        raise InputError(f"search {name} ({parent}) has no search settings in its params: it was not run by "
                         f"ecgsearch search")
    if run.info.status == "FINISHED":
        raise InputError(f"search {name} ({parent}) has already finished")
    spec = SearchSpec.from_params(run.data.params, tracking_uri=uri)
    storage = run.data.params["storage"]
    if not tune.Tuner.can_restore(storage):
        raise InputError(f"search {name}: no Ray Tune state at {storage} (the storage path it ran with)")
    inputs = spec.validate()
    metric, mode = spec.metric

    client.update_run(parent, status="RUNNING")
    if "interrupted" in run.data.tags:
        client.delete_tag(parent, "interrupted")
    client.set_tag(parent, "resumed", str(int(run.data.tags.get("resumed", "0")) + 1))
    print(f"resuming search {name}: MLflow run {parent} in {mask_uri(uri)}, Ray state {storage}", flush=True)
    started = init_ray(spec.address)
    try:
        known = {t.trial_id for t in tune.ExperimentAnalysis(storage).trials}  # in Tune's last saved state
        children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
        ended = {int(c.data.tags["trial_number"]): tracking.last_result(client, c) for c in children
                 if c.info.status == "FINISHED" and c.data.tags["trial_id"] in known}
        tuner = tune.Tuner.restore(storage, trainable=_trainable(spec, inputs.models, ended), resume_errored=True)
        runs = tuner._local_tuner.get_run_config().callbacks[0]  # the search's TrialRuns, restored with the Tuner
        runs.client = client
        for child in children:
            if child.data.tags["trial_id"] in known:
                runs.reattach(child)
            else:
                client.delete_run(child.info.run_id)
        result = SearchResult(name, parent, run.info.experiment_id, uri, metric, mode, pd.DataFrame(), Path(storage))
        return _fit(tuner, runs, result, client, inputs.space, spec)
    finally:
        if started:
            ray.shutdown()


def _number(result: Any) -> int:
    """A Tune result's trial number, from its directory trial_<number>_<id> (one that never reported has no config)."""
    return int(Path(result.path).name.split("_")[1])


def trials_table(results: Any, runs: tracking.TrialRuns, metric: str) -> pd.DataFrame:
    """One row per trial from Tune's results and the callback's records, in trial order."""
    rows = []
    for r in results:
        number = _number(r)
        config, metrics = r.config or {}, r.metrics or {}
        never = {"trial_id": "", "run_id": "", "failure_reason": "",  # never started: failed, or the budget ran out
                 "status": "failed" if r.error else "budget"}
        rows.append({"trial_number": number, **runs.trials.get(number, never),
                     "epochs": int(metrics.get("epoch", 0)), f"best_{metric}": metrics.get(f"best_{metric}"),
                     "arch": config.get("arch"), "lr": config.get("lr"), "schedule": config.get("schedule"),
                     "config": config})
    table = pd.DataFrame(rows).sort_values("trial_number").reset_index(drop=True)
    table[f"best_{metric}"] = pd.to_numeric(table[f"best_{metric}"])
    return table
