"""Running the study: its tracking store, its parent run, `plan` (what would run), and `run_study` (stages 0-2,
each search reused by its key, resumed when unfinished, or run; then the tables and stage 3)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from data_prep.errors import InputError
from search.study.config import FINETUNE_HALF, LOW_RATE, STAGES, TAG, Search, _key, data_dir, evaluation_key
from search.study.config import load_config
from search.study.config import searches


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


def trials(client: Any, experiment_id: str, search_run_id: str, metric: str) -> list[Any]:
    """The search's trial runs that reported best_<metric>, best first."""
    from search.promote import metric_mode

    runs = [r for r in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{search_run_id}'")
            if f"best_{metric}" in r.data.metrics]
    return sorted(runs, key=lambda r: r.data.metrics[f"best_{metric}"], reverse=metric_mode(metric) == "max")


def best_trial(client: Any, experiment_id: str, search_run_id: str, metric: str) -> dict | None:
    """The best trial of a search (by best_<metric>) and every metric it reported at its best epoch."""
    from search.promote import metric_mode

    found = trials(client, experiment_id, search_run_id, metric)
    if not found:
        return None
    best = found[0]
    history = client.get_metric_history(best.info.run_id, metric)
    step = (max if metric_mode(metric) == "max" else min)(history, key=lambda m: m.value).step
    out = {"run_id": best.info.run_id, "epoch": step}
    for name in best.data.metrics:
        out.update({name: m.value for m in client.get_metric_history(best.info.run_id, name) if m.step == step})
    return out


@dataclass
class StudyResult:
    """What a study run did: its MLflow run, which searches ran or were reused, how many stage-3 models it trained,
    and its tables."""

    run_id: str
    ran: list[str]
    reused: list[str]
    tables: dict[str, Path]
    wall_s: float
    retrained: int = 0


def prepare_data(cfg: dict) -> dict[str, Path]:
    """Prepare the configured raw sources under workdir/data (data_prep reuses a dataset whose inputs are unchanged)."""
    from data_prep.deepfake import prepare_deepfake
    from data_prep.ptbxl import prepare_ptbxl

    p, out = cfg["data"]["ptbxl"], {}
    out["ptbxl"] = prepare_ptbxl(p["root"], data_dir(cfg, "ptbxl"), rate=p["rate"], features=p["features"],
                                 min_likelihood=p["min_likelihood"], split=p["split"], seed=cfg["seed"])
    d = cfg["data"]["deepfake"]
    if d:
        out["deepfake"] = prepare_deepfake(data_dir(cfg, "deepfake"), count=d["count"], seed=cfg["seed"],
                                           asc_dir=d["asc_dir"], ground_truth=d["ground_truth"], rate=d["rate"])
    if cfg["fidelity"]:  # the screening rate, derived record by record (the searches pair them)
        from data_prep.rates import resample_dataset

        for name in list(out):
            out[f"{name}-{LOW_RATE}"] = resample_dataset(out[name], data_dir(cfg, name, LOW_RATE), LOW_RATE)
    return out


def _checked(config: str | Path, tracking_uri: str | None) -> tuple[tuple[Any, str] | None, dict, list[Search]]:
    """The existing tracking store (None if a sqlite one is not there yet), the checked config (whose pretrained
    models may already be registered in that store) and its searches, each search's SearchSpec checked."""
    store = _store(tracking_uri, create=False)
    cfg = load_config(config, _registered(store[0]) if store else None)
    found = searches(cfg)
    for s in found:
        try:
            s.spec(cfg, tracking_uri).check()
        except InputError as e:
            raise InputError(f"{Path(config).name}: {s.stage} search {s.name}: {e}") from None
    return store, cfg, found


def plan(config: str | Path, tracking_uri: str | None = None) -> str:
    """The stages, searches, trial counts and what is already done, as text; runs and writes nothing."""
    store, cfg, found = _checked(config, tracking_uri)
    experiment = store[0].get_experiment_by_name(cfg["experiment"]) if store else None
    done = lambda key: bool(experiment) and finished_search(store[0], experiment.experiment_id, key) is not None
    lines, total, left = [], 0, 0
    for stage in STAGES[:3]:
        group = [s for s in found if s.stage == stage]
        trials_n = sum(s.num_samples for s in group)
        note = "  (report-only: stage 1 uses pretrain.space.arch)" if stage == "architectures" and group else ""
        lines.append(f"stage {STAGES.index(stage)} {stage}: {len(group)} searches, {trials_n} trials{note}")
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
    ev = cfg["evaluate"]
    if ev["folds"] > 1:
        what = (f"every record of PTB-XL-{FINETUNE_HALF}, {ev['folds']} patient-grouped folds x {len(ev['seeds'])} "
                f"seeds x {len(fine)} models = {ev['folds'] * len(ev['seeds']) * len(fine)} retrainings")
    else:
        what = f"PTB-XL-{FINETUNE_HALF} test split, the {len(fine)} registered models"
    lines.append(f"stage 3 evaluate: {what} + majority + classical, {ev['n_boot']} patient-bootstrap resamples  "
                 f"{'done' if eval_done else 'to run'}")
    head = (f"study {cfg['name']} (experiment {cfg['experiment']}): {len(found)} searches, {total} trials, "
            f"{total - left} already done, {left} to run")
    if cfg["fidelity"]:
        head += (f"\nfidelity rate: each search screens at {LOW_RATE} Hz under ASHA, then retrains its top-rung "
                 "configurations at the study's 500 Hz and chooses there")
    return "\n".join([head, *lines])


def run_study(config: str | Path, tracking_uri: str | None = None) -> StudyResult:
    """Run (or resume) the study of a config file: data, stages 0-3, tables; returns what ran and what was reused."""
    import ray

    from search import tracking
    from search.study import crossfit, report
    from search.tuner import init_ray

    start = time.time()
    cfg, found = _checked(config, tracking_uri)[1:]  # before anything is created
    client, uri = _store(tracking_uri, create=True)
    experiment_id = tracking.experiment_id(client, uri, cfg["experiment"])
    datasets = prepare_data(cfg)
    print(f"study: data ready in {time.time() - start:.0f} s: {', '.join(map(str, datasets.values()))}", flush=True)
    study_run = _study_run(client, experiment_id, cfg, config)
    ran, reused, runs = [], [], {}
    started = False  # Ray starts only when something has to train
    status = "FAILED"

    def ray_up() -> None:
        nonlocal started
        started = init_ray(cfg["address"]) or started

    try:
        for i, s in enumerate(found, 1):
            began = time.time()
            run = finished_search(client, experiment_id, s.key)
            if run is None:
                ray_up()
                run = (_resume(client, experiment_id, s, uri)
                       or _run_search(s, cfg, uri, study_run, runs, experiment_id))
                ran.append(s.name)
            else:
                reused.append(s.name)
            runs[s.name] = run
            if s.register_as:
                _register(client, s, run, uri)
            print(f"study: [{i}/{len(found)}] {s.name} {'ran' if s.name in ran else 'reused'} in "
                  f"{time.time() - began:.0f} s (search run {run.info.run_id}, key {s.key})", flush=True)
        tables = report.architecture_tables(client, experiment_id, found, runs, cfg, Path(cfg["workdir"]) / "tables")
        began = time.time()
        out, retrained = crossfit.evaluate(client, cfg, found, runs, datasets["ptbxl"], study_run,
                                           uri, ray_up)
        tables.update(out)
        print(f"study: evaluation in {time.time() - began:.0f} s ({retrained} models trained)", flush=True)
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
    return StudyResult(study_run, ran, reused, tables, wall, retrained)


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


def _run_search(s: Search, cfg: dict, uri: str, study_run: str, runs: dict, experiment_id: str) -> Any:
    from mlflow import MlflowClient

    from search.tuner import run_search

    client = MlflowClient(uri)
    pretrained = {t: f"models:/{runs_model(runs[n])}" for t, n in s.pretrained.items()}
    spec = s.spec(cfg, uri, pretrained, study_run)
    spec = spec.replace(warm_start=warm_starts(client, experiment_id, s, runs))
    if not spec.fidelity:
        return client.get_run(run_search(spec).parent_run_id)
    from search.fidelity import run_fidelity

    # Screened at 100 Hz (on the upstream searches' 100 Hz backbones), chosen at 500 Hz: the 500 Hz search carries
    # the study's tags (it is what a rerun finds and what is registered), the 100 Hz one says whose screen it was.
    screen = spec.replace(pretrained={t: f"models:/{runs_model(runs[n], screen=True)}"
                                      for t, n in s.pretrained.items()})
    low_tags = {f"{TAG}screen_for": s.key, f"{TAG}stage": s.stage, f"{TAG}name": cfg["name"]}
    _, high = run_fidelity(screen, data_dir(cfg, s.dataset), low_tags, pretrained=pretrained, tags=spec.tags)
    return client.get_run(high.parent_run_id)


def warm_starts(client: Any, experiment_id: str, s: Search, runs: dict) -> tuple[str, ...]:
    """The earlier searches (run ids) whose trials seed search `s`, where that is sound: the newest finished run of
    the same search under an older key (the config changed: same task, same space's names), and for a DeepFake
    fine-tune, the PTB-XL-A fine-tune of the same approach (same space, other backbones) run in this study."""
    earlier = client.search_runs(
        [experiment_id], f"tags.`{TAG}search` = '{s.name}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=5)
    out = [r.info.run_id for r in earlier if r.data.tags.get(f"{TAG}search_key") != s.key][:1]
    twin = f"finetune-{s.approach}-ptbxl-a"
    if s.stage == "finetune" and s.source == "deepfake" and twin in runs:
        out.append(runs[twin].info.run_id)
    return tuple(out)


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


MODEL_TAG, SCREEN_MODEL_TAG = f"{TAG}model", f"{TAG}model_{LOW_RATE}hz"  # set by _register on a search run


def runs_model(run: Any, screen: bool = False) -> str:
    """`NAME/VERSION` of the model registered from a search run (tagged by _register); with `screen`, that of its
    100 Hz screen's best trial (`fidelity: rate`)."""
    return run.data.tags[SCREEN_MODEL_TAG if screen else MODEL_TAG]


def _register(client: Any, s: Search, run: Any, uri: str) -> None:
    """Register the search's best trial (the chosen configuration, not an ensemble) under its study name (once per
    search run) and tag the run with it."""
    from search.promote import promote

    wanted = {MODEL_TAG: (run.info.run_id, s.register_as)}
    if "fidelity.low_search" in run.data.tags and s.stage == "pretrain":  # the screen's backbone, for 100 Hz screens
        wanted[SCREEN_MODEL_TAG] = (run.data.tags["fidelity.low_search"], f"{s.register_as}-{LOW_RATE}hz")
    for tag, (search_run, name) in wanted.items():
        if tag not in run.data.tags:
            promotion = promote(search_run, name, metric=s.metric, force=True, tracking_uri=uri, ensemble=1)
            client.set_tag(run.info.run_id, tag, f"{name}/{promotion.version}")
            run.data.tags[tag] = f"{name}/{promotion.version}"


def load_registered(model_uri: str, tracking_uri: str) -> Any:
    """The ecgmodels model of a registered model (`models:/NAME/VERSION` or `models:/NAME@alias`)."""
    from ecgmodels import load_checkpoint

    from search.spec import checkpoint_path

    return load_checkpoint(checkpoint_path(model_uri, tracking_uri))
