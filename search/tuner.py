"""One search: validate everything, then Ray Tune runs Optuna's trials (TPE over the define-by-run space) under an
ASHA scheduler, while the driver tracks them in MLflow (search/tracking.py).

    from search.tuner import run_search
    result = run_search("prepared/ptbxl-100", "classification", half="A", num_samples=8, max_epochs=4)
    print(result.table)

A search whose driver died or was interrupted (Ctrl-C: parent run KILLED, tag `interrupted`) is finished by
`resume_search(name_or_run_id)`: Ray Tune restores its trials and Optuna searcher from the storage path logged on the
parent run (param `resume_args`), finished trials stay finished, unfinished ones continue from their checkpoints and
log to their own child runs again.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from ray.tune.schedulers import ASHAScheduler

from data_prep.constants import TARGETS
from data_prep.dataset import PreparedDataset, open_dataset
from data_prep.errors import InputError
from search import tracking
from search.optuna_storage import open_optuna_storage
from search.server import mask_uri
from search.space import APPROACHES, SearchSpace, load_space_config
from search.trainable import search_metric, train_trial

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

    @property
    def best(self) -> pd.Series | None:
        return tracking.best_row(self.table, self.metric, self.mode)

    def ui_url(self, port: int = 5000) -> str:
        return tracking.ui_url(self.tracking_uri, self.experiment_id, port=port)

    def summary(self) -> str:
        """The trials table, the best trial and how to open the MLflow UI on them, for printing."""
        counts = self.table["status"].value_counts()
        cols = ["trial_number", "status", "epochs", f"best_{self.metric}", "arch", "lr", "schedule", "failure_reason"]
        lines = [f"search {self.name}: {len(self.table)} trials ({counts.get('finished', 0)} finished, "
                 f"{counts.get('pruned', 0)} stopped early by ASHA, {counts.get('failed', 0)} failed); "
                 f"MLflow run {self.parent_run_id}",
                 self.table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")]
        best = self.best
        if best is not None:
            lines.append(f"best: trial {best['trial_number']} ({best['arch']}), {self.metric} "
                         f"{best[f'best_{self.metric}']:.4f}, MLflow run {best['run_id']}")
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


def checkpoint_path(uri: str, tracking_uri: str | None = None) -> Path:
    """The local model.pt of a checkpoint path (model.pt or a directory holding one) or of a registry URI
    (`models:/NAME@alias`, `models:/NAME/VERSION`, downloaded); an InputError names what is missing."""
    import mlflow

    if uri.startswith("models:/"):
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri))
        except Exception as e:  # MlflowException or a store error: either way the model is not there
            raise InputError(f"{uri}: not in the registry ({str(e).splitlines()[0]})") from None
        found = sorted(local.rglob("model.pt"))
        if not found:
            raise InputError(f"{uri}: the registered model holds no model.pt")
        return found[0]
    path = Path(uri) / "model.pt" if Path(uri).is_dir() else Path(uri)
    if not path.is_file():
        raise InputError(f"{uri}: no checkpoint at {path}")
    return path


def load_pretrained(specs: dict[str, str], data_length: int, n_leads: int,
                    tracking_uri: str) -> tuple[dict[str, Any], dict[str, str]]:
    """target -> loaded model from a checkpoint path or registry URI (`checkpoint_path`), checked against the
    dataset; and target -> lineage text."""
    from ecgmodels import load_checkpoint
    from ecgmodels.checkpoint import read_checkpoint

    models, lineage = {}, {}
    for target, uri in specs.items():
        if target not in TARGETS:
            raise InputError(f"--pretrained {target}={uri}: unknown target {target!r}; choose from {', '.join(TARGETS)}")
        try:
            path = checkpoint_path(uri, tracking_uri)
        except InputError as e:
            raise InputError(f"--pretrained {target}={e}") from None
        try:  # weights_only: a checkpoint holding anything but tensors and plain values is refused, never run
            extra = read_checkpoint(path)["extra"]
        except (pickle.UnpicklingError, RuntimeError, KeyError) as e:
            raise InputError(f"--pretrained {target}={uri}: not an ecgmodels checkpoint that loads safely "
                             f"({str(e).splitlines()[0][:200]})") from None
        model = load_checkpoint(path)
        cfg = model.config
        if extra.get("target") not in (None, target):
            raise InputError(f"--pretrained {target}={uri}: that model was trained on {extra['target']!r}")
        if (cfg["n_leads"], cfg["length"]) != (n_leads, data_length):
            raise InputError(f"--pretrained {target}={uri}: takes {cfg['n_leads']} leads x {cfg['length']} samples, "
                             f"the dataset holds {n_leads} x {data_length} (another sampling rate?)")
        models[target] = model
        lineage[target] = f"{uri} (dataset {extra.get('dataset_hash', 'unknown')})"
    return models, lineage


def check_inputs(data: str | Path, task: str, target: str | None, approach: str, half: str | None,
                 pretrained: dict[str, str]) -> PreparedDataset:
    """The prepared dataset, checked to have labels for the task (and rows of the half); the approach checked
    against the pretrained models given."""
    ds = open_dataset(data)
    if task not in ("classification", "regression"):
        raise InputError(f"--task {task!r}: choose classification or regression")
    if task == "regression" and target not in TARGETS:
        raise InputError(f"--target {target!r}: regression needs one of {', '.join(TARGETS)}")
    wanted = "classification" if task == "classification" else f"regression:{target}"
    if wanted not in ds.tasks():
        raise InputError(f"{ds.path} has no labels for {wanted}; it has {', '.join(ds.tasks()) or 'none'}")
    if half is not None and not len(ds.select(half=half)):
        raise InputError(f"--half {half}: {ds.path} has no rows of half {half}")
    if approach not in APPROACHES:
        raise InputError(f"--approach {approach!r}: choose from {', '.join(APPROACHES)}")
    need = {"baseline": set(), "single": None, "fused": set(TARGETS)}[approach]
    given = set(pretrained)
    if (need is None and len(given) != 1) or (need is not None and given != need):
        wants = {"baseline": "none", "single": "exactly one TARGET=URI", "fused": f"one each for {', '.join(TARGETS)}"}
        raise InputError(f"--pretrained: approach {approach} takes {wants[approach]}, got {sorted(given) or 'none'}")
    return ds


def check_resources(max_concurrent: int, cpus_per_trial: float, gpus_per_trial: float, max_failures: int,
                    time_budget_s: float | None, top_k: int, address: str | None) -> None:
    """Resource settings a search can run with; on a local Ray, a trial must fit this machine."""
    if max_concurrent < 1:
        raise InputError(f"--max-concurrent {max_concurrent}: must be at least 1")
    if not cpus_per_trial > 0 or gpus_per_trial < 0:
        raise InputError(f"--cpus-per-trial {cpus_per_trial} must be > 0 and --gpus-per-trial {gpus_per_trial} >= 0")
    if max_failures < 0 or top_k < 0:
        raise InputError(f"--max-failures {max_failures} and top_k {top_k} must be >= 0")
    if time_budget_s is not None and not time_budget_s > 0:
        raise InputError(f"--time-budget {time_budget_s}: must be > 0 seconds")
    if address is None:
        import torch

        cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
        if cpus_per_trial > cpus or gpus_per_trial > gpus:
            raise InputError(f"--cpus-per-trial {cpus_per_trial} / --gpus-per-trial {gpus_per_trial}: this machine "
                             f"has {cpus} CPUs and {gpus} GPUs, so no trial could start (or join a cluster: --address)")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_search(data: str | Path, task: str = "classification", *, target: str | None = None,
               approach: str = "baseline", pretrained: dict[str, str] | None = None, half: str | None = None,
               num_samples: int = 8, config: str | Path | None = None, space_overrides: dict | None = None,
               max_concurrent: int = 2, cpus_per_trial: float = 1, gpus_per_trial: float = 0,
               time_budget_s: float | None = None, max_epochs: int = 10, address: str | None = None,
               tracking_uri: str | None = None, name: str | None = None, storage_path: str | Path | None = None,
               seed: int = 0, sampler: str = "tpe", asha: bool = True, reduction_factor: int = 2,
               max_failures: int = 0, top_k: int = 3, fault: dict | None = None,
               experiment: str = tracking.DEFAULT_EXPERIMENT, single_label: bool = True,
               parent_run_id: str | None = None, tags: dict[str, str] | None = None,
               optuna_storage: str | None = None) -> SearchResult:
    """Run one search and return its result; every input is checked before Ray starts.

    `sampler` "tpe" (Optuna TPE, seeded) or "random"; `asha=False` runs every trial to its end (FIFO). `top_k` trials
    get their checkpoint and plots logged. `fault` is the trial contract's fault injection (tests). `parent_run_id`
    nests the search's run under another (a study's); `tags` go on the search's run. `optuna_storage` (a database
    URI, e.g. the MLflow PostgreSQL database) keeps the Optuna study, named after the search, there.
    """
    import ray
    from optuna.samplers import RandomSampler, TPESampler
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    pretrained = dict(pretrained or {})
    data = Path(data).resolve()
    ds = check_inputs(data, task, target, approach, half, pretrained)
    target = target if task == "regression" else None
    if sampler not in ("tpe", "random"):
        raise InputError(f"sampler {sampler!r}: choose tpe or random")
    if num_samples < 1 or max_epochs < 1:
        raise InputError(f"--num-samples and --max-epochs must be at least 1, got {num_samples} and {max_epochs}")
    check_resources(max_concurrent, cpus_per_trial, gpus_per_trial, max_failures, time_budget_s, top_k, address)
    metric, mode = search_metric(task)
    constants = {"data": str(data), "task": task, "target": target, "half": half, "single_label": single_label,
                 "max_epochs": max_epochs, "seed": seed, "threads": max(1, int(cpus_per_trial)), "fault": fault}
    spec = load_space_config(config, space_overrides)
    space = None if pretrained else SearchSpace(spec, approach, constants)  # baseline: checked before the store
    client, uri = tracking.open_store(tracking_uri)
    models, lineage = load_pretrained(pretrained, ds.length, ds.signals.shape[1], uri)
    space = space or SearchSpace(spec, approach, constants, models)
    study_storage = open_optuna_storage(optuna_storage) if optuna_storage else None

    name = name or f"{approach}-{target or task}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Path(storage_path or Path.cwd() / "ray_results").resolve()
    experiment_id = tracking.experiment_id(client, uri, experiment)
    parent = client.create_run(experiment_id, run_name=name, tags={
        "approach": approach, "task": task, "target": str(target), "source": ds.manifest.get("source", "unknown"),
        "dataset_hash": ds.content_hash, "mlflow.source.git.commit": git_commit(),
        **{f"pretrained.{t}": text for t, text in lineage.items()}, **(tags or {}),
        **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}).info.run_id
    tracking.log_params(client, parent, {
        **constants, "approach": approach, "num_samples": num_samples, "max_concurrent": max_concurrent,
        "cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial, "time_budget_s": time_budget_s,
        "sampler": sampler, "asha": asha, "reduction_factor": reduction_factor, "max_failures": max_failures,
        "storage": str(storage / name), "dataset_rate": ds.rate, **space.describe(),
        **({"optuna_storage": mask_uri(optuna_storage)} if optuna_storage else {}),
        "resume_args": {"data": str(data), "task": task, "target": target, "approach": approach,
                        "pretrained": pretrained, "half": half, "single_label": single_label, "max_epochs": max_epochs,
                        "seed": seed, "cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial,
                        "num_samples": num_samples, "time_budget_s": time_budget_s, "top_k": top_k,
                        "address": address, "fault": fault, "storage": str(storage / name)}})
    client.log_dict(parent, spec, "search_space.yaml")
    print(f"search {name}: MLflow run {parent} in {mask_uri(uri)}", flush=True)

    started = False
    try:
        started = init_ray(address)
        ot_sampler = TPESampler(seed=seed) if sampler == "tpe" else RandomSampler(seed=seed)
        searcher = OptunaSearch(space=space, metric=metric, mode=mode, sampler=ot_sampler, study_name=name,
                                storage=study_storage)
        scheduler = (PruningASHA(metric=metric, mode=mode, time_attr="training_iteration", max_t=max_epochs,
                                 grace_period=1, reduction_factor=reduction_factor) if asha else FIFOScheduler())
        runs = tracking.TrialRuns(client, experiment_id, parent, metric, num_samples,
                                  getattr(scheduler, "pruned", set()))
        trainable = tune.with_resources(tune.with_parameters(train_trial, pretrained=models or None),
                                        {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                        max_concurrent_trials=max_concurrent, time_budget_s=time_budget_s,
                                        reuse_actors=True,
                                        trial_dirname_creator=lambda t: f"trial_{t.config['trial_number']}_{t.trial_id}"),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage), callbacks=[runs], verbose=0,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric,
                                                        checkpoint_score_order=mode)))
    except Exception:
        client.set_terminated(parent, "FAILED")
        if started:
            ray.shutdown()
        raise
    try:
        result = SearchResult(name, parent, experiment_id, uri, metric, mode, pd.DataFrame(), storage / name)
        return _fit(tuner, runs, result, client, space, task, target, top_k, num_samples, time_budget_s)
    finally:
        if started:
            ray.shutdown()


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
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return True


def _fit(tuner: Any, runs: tracking.TrialRuns, result: SearchResult, client: Any, space: SearchSpace, task: str,
         target: str | None, top_k: int, num_samples: int, time_budget_s: float | None) -> SearchResult:
    """Run (or continue) the Tuner; log the top trials' artifacts and the summary on the parent run, which ends
    FINISHED, FAILED, or KILLED with tag `interrupted` when Ctrl-C stopped it (then SearchInterrupted is raised)."""
    parent, metric, mode = result.parent_run_id, result.metric, result.mode
    status = "FAILED"
    try:
        results = tuner.fit()
        unfinished = [r for r in results if not r.error and not r.metrics.get("done")]
        if unfinished or (time_budget_s is None and len(results) < num_samples):
            status = "KILLED"
            client.set_tag(parent, "interrupted", "true")
            raise SearchInterrupted(f"search {result.name} interrupted with {len(unfinished)} trials unfinished; "
                                    f"finish it with: ecgsearch resume {result.name} --tracking-uri "
                                    f"{mask_uri(result.tracking_uri)}")
        result.table = table = trials_table(results, runs, metric)
        top = table[table[f"best_{metric}"].notna()].sort_values(f"best_{metric}", ascending=mode == "min")
        checkpoints = {r.config["trial_number"]: r.checkpoint for r in results if r.checkpoint}
        for number, run_id in zip(top["trial_number"][:top_k], top["run_id"][:top_k]):
            if number in checkpoints:
                with checkpoints[number].as_directory() as d:
                    tracking.log_trial_artifacts(client, run_id, Path(d), task, target)
        tracking.log_search_summary(client, parent, table, space, metric, mode)
        status = "FINISHED"
    except KeyboardInterrupt:  # a second Ctrl-C, while Tune was saving its state
        status = "KILLED"
        client.set_tag(parent, "interrupted", "true")
        raise
    finally:
        client.set_terminated(parent, status)
    return result


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a search; its message says how to resume it."""


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
    if "resume_args" not in run.data.params:
        raise InputError(f"search {name} ({parent}) has no param resume_args: it was not run by ecgsearch search")
    if run.info.status == "FINISHED":
        raise InputError(f"search {name} ({parent}) has already finished")
    args = json.loads(run.data.params["resume_args"])
    if not tune.Tuner.can_restore(args["storage"]):
        raise InputError(f"search {name}: no Ray Tune state at {args['storage']} (the storage path it ran with)")
    ds = check_inputs(args["data"], args["task"], args["target"], args["approach"], args["half"], args["pretrained"])
    models, _ = load_pretrained(args["pretrained"], ds.length, ds.signals.shape[1], uri)
    metric, mode = search_metric(args["task"])
    with tempfile.TemporaryDirectory() as tmp:
        spec = yaml.safe_load(Path(client.download_artifacts(parent, "search_space.yaml", tmp)).read_text())
    constants = {k: args[k] for k in ("data", "task", "target", "half", "single_label", "max_epochs", "seed", "fault")}
    space = SearchSpace(spec, args["approach"], {**constants, "threads": max(1, int(args["cpus_per_trial"]))}, models)

    client.update_run(parent, status="RUNNING")
    if "interrupted" in run.data.tags:
        client.delete_tag(parent, "interrupted")
    client.set_tag(parent, "resumed", str(int(run.data.tags.get("resumed", "0")) + 1))
    print(f"resuming search {name}: MLflow run {parent} in {mask_uri(uri)}, Ray state {args['storage']}", flush=True)
    started = init_ray(args["address"])
    try:
        known = {t.trial_id for t in tune.ExperimentAnalysis(args["storage"]).trials}  # in Tune's last saved state
        children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
        ended = {int(c.data.tags["trial_number"]): c.data.metrics for c in children  # their last epoch's metrics
                 if c.info.status == "FINISHED" and c.data.tags["trial_id"] in known}
        trainable = tune.with_resources(tune.with_parameters(train_trial, pretrained=models or None, ended=ended),
                                        {"cpu": args["cpus_per_trial"], "gpu": args["gpus_per_trial"]})
        tuner = tune.Tuner.restore(args["storage"], trainable=trainable, resume_errored=True)
        runs = tuner._local_tuner.get_run_config().callbacks[0]  # the search's TrialRuns, restored with the Tuner
        runs.client = client
        for child in children:
            if child.data.tags["trial_id"] in known:
                runs.reattach(child)
            else:
                client.delete_run(child.info.run_id)
        result = SearchResult(name, parent, run.info.experiment_id, uri, metric, mode, pd.DataFrame(),
                              Path(args["storage"]))
        return _fit(tuner, runs, result, client, space, args["task"], args["target"], args["top_k"],
                    args["num_samples"], args["time_budget_s"])
    finally:
        if started:
            ray.shutdown()


def trials_table(results: Any, runs: tracking.TrialRuns, metric: str) -> pd.DataFrame:
    """One row per trial from Tune's results and the callback's records, in trial order."""
    rows = []
    for r in results:
        number = int(Path(r.path).name.split("_")[1])  # trial_<number>_<id>: one that never reported has no config
        config, metrics = r.config or {}, r.metrics or {}
        rows.append({"trial_number": number, **runs.trials.get(number, {"status": "failed" if r.error else "?"}),
                     "epochs": int(metrics.get("epoch", 0)), f"best_{metric}": metrics.get(f"best_{metric}"),
                     "arch": config.get("arch"), "lr": config.get("lr"), "schedule": config.get("schedule"),
                     "config": config})
    table = pd.DataFrame(rows).sort_values("trial_number").reset_index(drop=True)
    table[f"best_{metric}"] = pd.to_numeric(table[f"best_{metric}"])
    return table
