"""The whole transfer-learning study as one resumable command: `ecgsearch study --config FILE [--plan]`.

Stages, all under one parent MLflow run (each search's parent run nested under it):
  0 architectures  each zoo architecture searched briefly on PTB-XL-A, for regression and classification
                   (the study's Tables 1 and 2: train/val MAE per target, train/val accuracy and macro AUC);
  1 pretrain       one regression search per target x source (ptbxl-a, deepfake), its best model registered as
                   `<prefix>ecg-<target>-<source>`;
  2 finetune       PTB-XL-B classification, one search per approach (baseline, single, fused) x source, the
                   backbones being stage 1's registered models (pinned versions, lineage tags), each search's best
                   model registered as `<prefix>ecg-cls-<approach>-<source>`;
  3 evaluate       the only stage that reads PTB-XL-B's test split: Tables 3 and 4 with bootstrap CIs, paired
                   AUC differences against the baseline, the majority-class and random-forest references.
Each search is keyed by a hash of everything that decides its outcome (its settings, its data's settings, the keys
of the searches it builds on). A rerun reuses every FINISHED search whose key it finds in MLflow and trains nothing
for it; a search left unfinished (driver killed or interrupted) is finished with resume_search; a changed config
reruns only the searches whose key changed (and those downstream of them).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from data_prep.constants import CLASSES, TARGET_UNITS, TARGETS
from data_prep.errors import InputError
from search.space import APPROACHES

STAGES = ("architectures", "pretrain", "finetune", "evaluate")
SOURCES = {"ptbxl-a": ("ptbxl", "A"), "deepfake": ("deepfake", None)}  # pretraining source -> (dataset, half)
FINETUNE_HALF = "B"
TAG = "study."  # prefix of the study's MLflow tags
DEFAULTS: dict[str, Any] = {
    "name": "study", "workdir": "study", "experiment": None, "seed": 0, "single_label": True, "model_prefix": "",
    "address": None,
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": 2},
    "data": {"ptbxl": None, "deepfake": None},
    "architectures": {"archs": [], "tasks": [*TARGETS, "classification"], "num_samples": 1, "max_epochs": 2,
                      "space": {}},
    "pretrain": {"targets": list(TARGETS), "sources": list(SOURCES), "num_samples": 8, "max_epochs": 10,
                 "space": {}},
    "finetune": {"approaches": list(APPROACHES), "sources": list(SOURCES), "single_target": "qrs", "num_samples": 8,
                 "max_epochs": 10, "space": {}},
    "evaluate": {"n_boot": 1000, "trees": 500},
}
DATA_KEYS = {"ptbxl": {"root", "rate", "features", "split", "min_likelihood"},
             "deepfake": {"count", "asc_dir", "ground_truth"}}


@dataclass
class Search:
    """One search of the study: what run_search gets, plus where it sits in the study."""

    stage: str
    name: str
    dataset: str  # "ptbxl" or "deepfake"
    half: str | None
    task: str
    target: str | None = None
    approach: str = "baseline"
    source: str = "-"  # pretraining source of stages 1-2 ("-" for none)
    pretrained: dict[str, str] = field(default_factory=dict)  # target -> name of the stage-1 search that trains it
    space: dict = field(default_factory=dict)
    num_samples: int = 1
    max_epochs: int = 1
    register_as: str | None = None
    key: str = ""

    @property
    def metric(self) -> str:
        return "val_auc" if self.task == "classification" else "val_mae"


# ----------------------------------------------------------------------------------------------------- config

def _merge(defaults: dict, given: dict, file: str, prefix: str = "") -> dict:
    """`given` over `defaults`, section by section (a stage's `space` and `data` are taken whole)."""
    if not isinstance(given, dict):
        raise InputError(f"{file}: {prefix.rstrip('.') or 'the file'} must be a mapping of settings")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise InputError(f"{file}: {prefix}{unknown[0]}: unknown setting; known: {', '.join(defaults)}")
    out = dict(defaults)
    for k, v in given.items():
        nested = isinstance(defaults[k], dict) and k not in ("space", "data")
        out[k] = _merge(defaults[k], v or {}, file, f"{prefix}{k}.") if nested else v
    return out


def _names(values: Any, allowed: tuple | list, where: str) -> list[str]:
    values = [values] if isinstance(values, str) else list(values or [])
    for v in values:
        if v not in allowed:
            raise InputError(f"{where}: unknown {v!r}; choose from {', '.join(allowed)}")
    return values


def load_config(path: str | Path, registered: Callable[[str], bool] | None = None) -> dict:
    """Read and check a study YAML file: every error is one InputError line, raised before anything runs.

    `registered(name)` says whether a model is already in the registry (for approaches whose backbones are not
    scheduled in this config); without it only scheduled backbones count.
    """
    from ecgmodels import list_models
    from search.space import SearchSpace, load_space_config, read_yaml

    path = Path(path)
    cfg = _merge(DEFAULTS, read_yaml(path, "study config"), path.name)
    where = f"{path.name}:"
    for section in ("architectures", "pretrain", "finetune"):
        for k in ("num_samples", "max_epochs"):
            if not isinstance(cfg[section][k], int) or cfg[section][k] < 1:
                raise InputError(f"{where} {section}.{k} must be a positive integer, got {cfg[section][k]!r}")
        try:
            SearchSpace(load_space_config(None, cfg[section]["space"] or {}), "baseline", {})
        except InputError as e:
            raise InputError(f"{where} {section}.space: {e}") from None
    arch = cfg["architectures"]
    arch["archs"] = _names(arch["archs"], list_models(), f"{where} architectures.archs")
    arch["tasks"] = _names(arch["tasks"], [*TARGETS, "classification"], f"{where} architectures.tasks")
    pre, fine = cfg["pretrain"], cfg["finetune"]
    pre["targets"] = _names(pre["targets"], TARGETS, f"{where} pretrain.targets")
    pre["sources"] = _names(pre["sources"], list(SOURCES), f"{where} pretrain.sources")
    fine["approaches"] = _names(fine["approaches"], APPROACHES, f"{where} finetune.approaches")
    fine["sources"] = _names(fine["sources"], list(SOURCES), f"{where} finetune.sources")
    _names(fine["single_target"], TARGETS, f"{where} finetune.single_target")

    data = _merge({"ptbxl": None, "deepfake": None}, cfg["data"] or {}, path.name, "data.")
    used = {"ptbxl"} | {SOURCES[s][0] for s in (pre["sources"] if pre["targets"] else [])}
    used |= {SOURCES[s][0] for s in fine["sources"] if set(fine["approaches"]) - {"baseline"}}
    for name in sorted(used):
        if not data.get(name):
            raise InputError(f"{where} source {name} is used but data.{name} is missing (its raw data: "
                             f"{', '.join(sorted(DATA_KEYS[name]))})")
    for name, spec in data.items():
        if spec:
            data[name] = _check_source(name, spec, where)
    if data["deepfake"]:
        data["deepfake"]["rate"] = data["ptbxl"]["rate"]  # backbones transfer only between equal lengths
    cfg["data"] = data

    for approach in (a for a in fine["approaches"] if a != "baseline"):
        wanted = [fine["single_target"]] if approach == "single" else list(TARGETS)
        for source in fine["sources"]:
            missing = [t for t in wanted if not (t in pre["targets"] and source in pre["sources"])
                       and not (registered and registered(model_name(cfg, t, source)))]
            if missing:
                raise InputError(f"{where} finetune approach {approach} on source {source} needs pretrained "
                                 f"{', '.join(model_name(cfg, t, source) for t in missing)}: neither scheduled in "
                                 "pretrain (targets x sources) nor in the registry")
    if "fused" in fine["approaches"] and isinstance(
            load_space_config(None, pre["space"] or {}).get("norm"), (list, dict)):
        raise InputError(f"{where} fused transfer needs one normalisation for all four backbones: fix "
                         "pretrain.space.norm to one of zscore, minmax, global")
    cfg["workdir"] = str(Path(cfg["workdir"]).resolve())
    cfg["experiment"] = cfg["experiment"] or f"study-{cfg['name']}"
    return cfg


def _check_source(name: str, spec: dict, where: str) -> dict:
    if not isinstance(spec, dict):
        raise InputError(f"{where} data.{name} must be a mapping of {', '.join(sorted(DATA_KEYS[name]))}")
    unknown = sorted(set(spec) - DATA_KEYS[name])
    if unknown:
        raise InputError(f"{where} data.{name}.{unknown[0]}: unknown; known: {', '.join(sorted(DATA_KEYS[name]))}")
    spec = dict(spec)
    if name == "ptbxl":
        spec = {"rate": 100, "features": None, "split": "strat_fold", "min_likelihood": 0.0, **spec}
        if not spec.get("root") or not (Path(spec["root"]) / "ptbxl_database.csv").is_file():
            raise InputError(f"{where} data.ptbxl.root {spec.get('root')!r} is not a PTB-XL directory "
                             "(no ptbxl_database.csv)")
        if spec["rate"] not in (100, 500):
            raise InputError(f"{where} data.ptbxl.rate {spec['rate']!r}: choose 100 or 500")
        for k in ("root", "features"):
            spec[k] = str(Path(spec[k]).resolve()) if spec[k] else None
        return spec
    spec = {"count": None, "asc_dir": None, "ground_truth": None, **spec}
    if (spec["count"] is None) == (spec["asc_dir"] is None):
        raise InputError(f"{where} data.deepfake: give exactly one of count (generate) or asc_dir (published .asc)")
    for k in ("asc_dir", "ground_truth"):
        if spec[k] is not None:
            if not Path(spec[k]).exists():
                raise InputError(f"{where} data.deepfake.{k} {spec[k]!r} does not exist")
            spec[k] = str(Path(spec[k]).resolve())
    return spec


def model_name(cfg: dict, target: str, source: str) -> str:
    """The registered name of stage 1's model for `target` pretrained on `source`, e.g. ecg-qrs-ptbxl-a."""
    return f"{cfg['model_prefix']}ecg-{target}-{source}"


# ------------------------------------------------------------------------------------------------- searches

def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def searches(cfg: dict) -> list[Search]:
    """The study's searches in run order (stages 0-2), each keyed by a hash of what decides its outcome."""
    arch, pre, fine = cfg["architectures"], cfg["pretrain"], cfg["finetune"]
    out: list[Search] = []
    for a in arch["archs"]:
        for task in arch["tasks"]:
            regression = task in TARGETS
            out.append(Search("architectures", f"arch-{a}-{task}", "ptbxl", "A",
                              "regression" if regression else "classification", task if regression else None,
                              space={**(arch["space"] or {}), "arch": a}, num_samples=arch["num_samples"],
                              max_epochs=arch["max_epochs"]))
    for source in pre["sources"]:
        dataset, half = SOURCES[source]
        for t in pre["targets"]:
            out.append(Search("pretrain", f"pretrain-{t}-{source}", dataset, half, "regression", t, source=source,
                              space=pre["space"] or {}, num_samples=pre["num_samples"],
                              max_epochs=pre["max_epochs"], register_as=model_name(cfg, t, source)))
    for approach in fine["approaches"]:
        for source in (["-"] if approach == "baseline" else fine["sources"]):
            wanted = {"baseline": [], "single": [fine["single_target"]], "fused": list(TARGETS)}[approach]
            label = "baseline" if approach == "baseline" else f"{approach}-{source}"
            out.append(Search("finetune", f"finetune-{label}", "ptbxl", FINETUNE_HALF, "classification",
                              approach=approach, source=source,
                              pretrained={t: f"pretrain-{t}-{source}" for t in wanted}, space=fine["space"] or {},
                              num_samples=fine["num_samples"], max_epochs=fine["max_epochs"],
                              register_as=f"{cfg['model_prefix']}ecg-cls-{label}"))
    keys: dict[str, str] = {}
    for s in out:
        upstream = {t: keys.get(n, model_name(cfg, t, s.source)) for t, n in s.pretrained.items()}
        s.key = keys[s.name] = _key({**asdict(s), "key": "", "pretrained": upstream, "seed": cfg["seed"],
                                     "single_label": cfg["single_label"], "data": cfg["data"][s.dataset]})
    return out


def evaluation_key(cfg: dict, finetune: list[Search]) -> str:
    return _key({"models": [s.key for s in finetune], "evaluate": cfg["evaluate"], "seed": cfg["seed"],
                 "single_label": cfg["single_label"], "data": cfg["data"]["ptbxl"]})


# ------------------------------------------------------------------------------------------------ tracking

def _store(uri: str | None, create: bool) -> tuple[Any, str] | None:
    """The tracking store, or None when `create` is False and a sqlite store does not exist yet."""
    from search import tracking

    uri = uri or tracking.default_uri()
    if not create and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    return tracking.open_store(uri)


def _registered(client: Any) -> Callable[[str], bool]:
    def check(name: str) -> bool:
        try:
            client.get_model_version_by_alias(name, "champion")
            return True
        except Exception:  # MlflowException: no such model or alias
            return False
    return check


def finished_search(client: Any, experiment_id: str, key: str) -> Any | None:
    """The newest FINISHED search run tagged with this search key, or None."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG}search_key` = '{key}' and "
                              "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0] if runs else None


def best_trial(client: Any, experiment_id: str, search_run_id: str, metric: str) -> dict | None:
    """The best trial of a search (by best_<metric>) and every metric it reported at its best epoch."""
    from search.promote import metric_mode

    maximise = metric_mode(metric) == "max"
    runs = [r for r in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{search_run_id}'")
            if f"best_{metric}" in r.data.metrics]
    if not runs:
        return None
    best = (max if maximise else min)(runs, key=lambda r: r.data.metrics[f"best_{metric}"])
    history = client.get_metric_history(best.info.run_id, metric)
    step = (max if maximise else min)(history, key=lambda m: m.value).step
    found = {"run_id": best.info.run_id, "epoch": step}
    for name in best.data.metrics:
        found.update({name: m.value for m in client.get_metric_history(best.info.run_id, name) if m.step == step})
    return found


# --------------------------------------------------------------------------------------------------- study

@dataclass
class StudyResult:
    """What a study run did: its MLflow run, which searches ran or were reused, and its tables."""

    run_id: str
    ran: list[str]
    reused: list[str]
    tables: dict[str, Path]
    wall_s: float


def prepare_data(cfg: dict) -> dict[str, Path]:
    """Prepare the configured raw sources under workdir/data (data_prep reuses a dataset whose inputs are unchanged)."""
    from data_prep.deepfake import prepare_deepfake
    from data_prep.ptbxl import prepare_ptbxl

    root, out = Path(cfg["workdir"]) / "data", {}
    p = cfg["data"]["ptbxl"]
    out["ptbxl"] = prepare_ptbxl(p["root"], root / f"ptbxl-{p['rate']}", rate=p["rate"], features=p["features"],
                                 min_likelihood=p["min_likelihood"], split=p["split"], seed=cfg["seed"])
    d = cfg["data"]["deepfake"]
    if d:
        out["deepfake"] = prepare_deepfake(root / f"deepfake-{d['rate']}", count=d["count"], seed=cfg["seed"],
                                           asc_dir=d["asc_dir"], ground_truth=d["ground_truth"], rate=d["rate"])
    return out


def _checked(config: str | Path, tracking_uri: str | None) -> tuple[tuple[Any, str] | None, dict]:
    """The existing tracking store (None if a sqlite one is not there yet) and the checked config, whose
    pretrained models may already be registered in that store."""
    store = _store(tracking_uri, create=False)
    return store, load_config(config, _registered(store[0]) if store else None)


def plan(config: str | Path, tracking_uri: str | None = None) -> str:
    """The stages, searches, trial counts and what is already done, as text; runs and writes nothing."""
    store, cfg = _checked(config, tracking_uri)
    experiment = store[0].get_experiment_by_name(cfg["experiment"]) if store else None
    done = lambda key: bool(experiment) and finished_search(store[0], experiment.experiment_id, key) is not None
    found = searches(cfg)
    lines, total, left = [], 0, 0
    for stage in STAGES[:3]:
        group = [s for s in found if s.stage == stage]
        trials = sum(s.num_samples for s in group)
        lines.append(f"stage {STAGES.index(stage)} {stage}: {len(group)} searches, {trials} trials")
        for s in group:
            status = "done" if done(s.key) else "to run"
            total += s.num_samples
            left += 0 if status == "done" else s.num_samples
            what = s.task if s.task == "classification" else f"regression {s.target}"
            data = s.dataset + (f"-{s.half}" if s.half else "")
            lines.append(f"  {s.name:<32} {data:<9} {what:<15} {s.num_samples:>4} trials x {s.max_epochs} epochs  "
                         f"key {s.key}  {status}"
                         + (f"  -> {s.register_as}" if s.register_as else ""))
    fine = [s for s in found if s.stage == "finetune"]
    eval_done = bool(experiment) and bool(store[0].search_runs(
        [experiment.experiment_id], f"tags.`{TAG}evaluation_key` = '{evaluation_key(cfg, fine)}'"))
    lines.append(f"stage 3 evaluate: PTB-XL-{FINETUNE_HALF} test split, {len(fine)} models + majority + classical, "
                 f"{cfg['evaluate']['n_boot']} bootstrap resamples  {'done' if eval_done else 'to run'}")
    head = (f"study {cfg['name']} (experiment {cfg['experiment']}): {len(found)} searches, {total} trials, "
            f"{total - left} already done, {left} to run")
    return "\n".join([head, *lines])


def run_study(config: str | Path, tracking_uri: str | None = None) -> StudyResult:
    """Run (or resume) the study of a config file: data, stages 0-3, tables; returns what ran and what was reused."""
    import ray

    from search import tracking
    from search.tuner import init_ray

    start = time.time()
    cfg = _checked(config, tracking_uri)[1]  # before anything is created
    client, uri = _store(tracking_uri, create=True)
    experiment_id = tracking.experiment_id(client, uri, cfg["experiment"])
    found = searches(cfg)
    datasets = prepare_data(cfg)
    print(f"study: data ready in {time.time() - start:.0f} s: {', '.join(map(str, datasets.values()))}", flush=True)
    study_run = _study_run(client, experiment_id, cfg, config)
    work = Path(cfg["workdir"])
    ran, reused, runs = [], [], {}
    started = False  # Ray starts only when a search has to run
    status = "FAILED"
    try:
        for i, s in enumerate(found, 1):
            began = time.time()
            run = finished_search(client, experiment_id, s.key)
            if run is None:
                started = init_ray(cfg["address"]) or started
                run = _resume(client, experiment_id, s, uri) or _run_search(s, cfg, datasets, uri, study_run, runs,
                                                                            work)
                ran.append(s.name)
            else:
                reused.append(s.name)
            runs[s.name] = run
            if s.register_as:
                _register(client, s, run, uri)
            print(f"study: [{i}/{len(found)}] {s.name} {'ran' if s.name in ran else 'reused'} in "
                  f"{time.time() - began:.0f} s (search run {run.info.run_id}, key {s.key})", flush=True)
        tables = _architecture_tables(client, experiment_id, found, runs, work / "tables")
        began = time.time()
        tables.update(_evaluate(client, cfg, found, runs, datasets["ptbxl"], study_run, uri, work))
        print(f"study: evaluation in {time.time() - began:.0f} s", flush=True)
        for p in tables.values():
            client.log_artifact(study_run, str(p), "tables")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        print(f"study: interrupted; rerun `ecgsearch study --config {config}` to resume it", flush=True)
        raise
    finally:
        client.set_terminated(study_run, status)
        if started:
            ray.shutdown()
    wall = time.time() - start
    client.log_metric(study_run, "wall_s", wall)
    print(f"study {cfg['name']}: ran {len(ran)} searches, reused {len(reused)}, {wall:.0f} s; MLflow: "
          f"{tracking.ui_url(uri, experiment_id)}", flush=True)
    return StudyResult(study_run, ran, reused, tables, wall)


def _study_run(client: Any, experiment_id: str, cfg: dict, config: str | Path) -> str:
    """The study's parent run (one per study name, reopened on a rerun), with the config logged."""
    runs = client.search_runs([experiment_id], f"tags.`{TAG}name` = '{cfg['name']}' and tags.`{TAG}kind` = 'study'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if runs:
        run_id = runs[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(experiment_id, run_name=f"study-{cfg['name']}",
                                   tags={f"{TAG}name": cfg["name"], f"{TAG}kind": "study"}).info.run_id
    client.log_dict(run_id, cfg, f"config-{_key(cfg)}.yaml")
    client.log_artifact(run_id, str(config))
    return run_id


def _run_search(s: Search, cfg: dict, datasets: dict[str, Path], uri: str, study_run: str, runs: dict,
                work: Path) -> Any:
    from search.spec import SearchSpec
    from search.tuner import run_search

    pretrained = {t: f"models:/{runs_model(runs[n])}" for t, n in s.pretrained.items()}
    res = cfg["resources"]
    result = run_search(SearchSpec(
        datasets[s.dataset], s.task, target=s.target, approach=s.approach, pretrained=pretrained, half=s.half,
        num_samples=s.num_samples, space_overrides=s.space, max_epochs=s.max_epochs, tracking_uri=uri,
        name=f"{s.name}-{s.key}", storage_path=work / "ray_results", seed=cfg["seed"],
        max_concurrent=res["max_concurrent"], cpus_per_trial=res["cpus_per_trial"],
        gpus_per_trial=res["gpus_per_trial"], experiment=cfg["experiment"], single_label=cfg["single_label"],
        parent_run_id=study_run, tags={f"{TAG}search_key": s.key, f"{TAG}stage": s.stage,
                                       f"{TAG}name": cfg["name"], f"{TAG}source": s.source}))
    from mlflow import MlflowClient

    return MlflowClient(uri).get_run(result.parent_run_id)


def _resume(client: Any, experiment_id: str, s: Search, uri: str) -> Any | None:
    """Finish the newest unfinished run of this search (its driver killed or interrupted) from its Ray Tune state;
    None when there is none, or nothing to restore (then the search starts afresh)."""
    from search.tuner import resume_search

    runs = client.search_runs([experiment_id], f"tags.`{TAG}search_key` = '{s.key}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or runs[0].info.status == "FINISHED":
        return None
    print(f"study: resuming {s.name} (search run {runs[0].info.run_id}, {runs[0].info.status})", flush=True)
    try:
        return client.get_run(resume_search(runs[0].info.run_id, uri).parent_run_id)
    except InputError as e:
        print(f"study: {s.name} cannot be resumed ({e}); running it afresh", flush=True)
        return None


def runs_model(run: Any) -> str:
    """`NAME/VERSION` of the model registered from a search run (tagged by _register)."""
    return run.data.tags[f"{TAG}model"]


def _register(client: Any, s: Search, run: Any, uri: str) -> None:
    """Register the search's best model under its study name (once per search run) and tag the run with it."""
    from search.promote import promote

    if f"{TAG}model" in run.data.tags:
        return
    promotion = promote(run.info.run_id, s.register_as, metric=s.metric, force=True, tracking_uri=uri)
    text = f"{s.register_as}/{promotion.version}"
    client.set_tag(run.info.run_id, f"{TAG}model", text)
    run.data.tags[f"{TAG}model"] = text


# ---------------------------------------------------------------------------------------------- tables 1-2

def _architecture_tables(client: Any, experiment_id: str, found: list[Search], runs: dict,
                         out: Path) -> dict[str, Path]:
    """Tables 1 (train/val MAE per architecture and target) and 2 (train/val accuracy and macro AUC per
    architecture) from each stage-0 search's best trial at its best epoch, as Markdown and CSV."""
    rows = []
    for s in (s for s in found if s.stage == "architectures"):
        best = best_trial(client, experiment_id, runs[s.name].info.run_id, s.metric) or {}
        names = ("train_mae", "val_mae") if s.task == "regression" else ("train_acc", "val_acc", "train_auc",
                                                                          "val_auc")
        rows.append({"arch": s.space["arch"], "task": s.target or s.task, "epoch": best.get("epoch"),
                     **{n: best.get(n) for n in names}})
    if not rows:
        return {}
    df = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    paths = {n: out / n for n in ("architectures.csv", "architectures.md")}
    df.to_csv(paths["architectures.csv"], index=False)
    lines = []
    reg = df[df["task"].isin(TARGETS)]
    if len(reg):
        t1 = reg.pivot(index="arch", columns="task", values=["train_mae", "val_mae"])
        cols = [t for t in TARGETS if t in set(reg["task"])]
        lines += ["### Table 1: PTB-XL-A regression, MAE of each architecture's best trial (train / val)", "",
                  "| arch | " + " | ".join(f"{t} ({TARGET_UNITS[t]})" for t in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        lines += [f"| {a} | " + " | ".join(f"{t1.loc[a, ('train_mae', t)]:.1f} / {t1.loc[a, ('val_mae', t)]:.1f}"
                                          for t in cols) + " |" for a in t1.index] + [""]
    cls = df[df["task"] == "classification"]
    if len(cls):
        lines += ["### Table 2: PTB-XL-A classification, each architecture's best trial", "",
                  "| arch | train acc | val acc | train AUC | val AUC |", "|---|---|---|---|---|"]
        lines += [f"| {r.arch} | {r.train_acc:.3f} | {r.val_acc:.3f} | {r.train_auc:.3f} | {r.val_auc:.3f} |"
                  for r in cls.itertuples()] + [""]
    paths["architectures.md"].write_text("\n".join(lines))
    return paths


# -------------------------------------------------------------------------------------------------- stage 3

def _evaluate(client: Any, cfg: dict, found: list[Search], runs: dict, data: Path, study_run: str, uri: str,
              work: Path) -> dict[str, Path]:
    """Stage 3, the one place that reads PTB-XL-B's test rows; reused when its key (the fine-tuned models and
    the evaluation settings) is unchanged."""
    from data_prep.dataset import open_dataset
    from search import evaluate as ev

    fine = [s for s in found if s.stage == "finetune"]
    key = evaluation_key(cfg, fine)
    out = work / "evaluation" / key
    names = ("results.csv", "per_class_auc.csv", "tables.md", "test_auc.png")
    if client.get_run(study_run).data.tags.get(f"{TAG}evaluation_key") == key and all(
            (out / n).is_file() for n in names):
        print(f"study: evaluation reused ({out})", flush=True)
        return {n: out / n for n in names}
    ds = open_dataset(data)
    single = cfg["single_label"]
    rows = {split: ds.select(split, FINETUNE_HALF, single_label=single) for split in ev.SPLITS}
    truth = {split: (ds.labels["label"].to_numpy()[r] if single else ds.labels[list(CLASSES)].to_numpy()[r])
             for split, r in rows.items()}
    scores: dict[tuple[str, str], dict] = {}
    scores[("majority", "-")] = {s: (truth[s], ev.majority_scores(truth["train"], len(rows[s]))) for s in ev.SPLITS}
    features = {s: ev.signal_features(ds.signals[r], ds.rate) for s, r in rows.items()}
    classical = ev.classical_scores(features, truth["train"], cfg["seed"], n_jobs=os.cpu_count(),
                                    n_estimators=cfg["evaluate"]["trees"])
    scores[("classical", "-")] = {s: (truth[s], classical[s]) for s in ev.SPLITS}
    for s in fine:
        model = load_registered(f"models:/{runs_model(runs[s.name])}", uri)
        label = s.approach if s.approach != "single" else f"single ({cfg['finetune']['single_target']})"
        scores[(label, s.source)] = {sp: (truth[sp], ev.model_scores(model, ds.signals, rows[sp], not single))
                                     for sp in ev.SPLITS}
    reference = ("baseline", "-") if ("baseline", "-") in scores else ("majority", "-")
    results, per_class = ev.score_table(scores, reference, cfg["evaluate"]["n_boot"], cfg["seed"])
    paths = ev.write_report(results, per_class, out)
    client.set_tag(study_run, f"{TAG}evaluation_key", key)
    return {p.name: p for p in paths}


def load_registered(model_uri: str, tracking_uri: str) -> Any:
    """The ecgmodels model of a registered model (`models:/NAME/VERSION` or `models:/NAME@alias`)."""
    from ecgmodels import load_checkpoint

    from search.tuner import checkpoint_path

    return load_checkpoint(checkpoint_path(model_uri, tracking_uri))
