"""The search's views: Optuna's own Plotly figures over the trials, written as one self-contained HTML page
(plotly.js embedded: the MLflow artifact viewer shows it with no internet) logged on the search's parent run. MLflow
3.17 previews an HTML artifact of up to 50 MiB in an `<iframe sandbox="allow-scripts">` of a blob: URL: the page's
inline scripts run there, but nothing can be fetched from it.

ASHA stops trials at different epochs, so a trial's best value after 2 epochs is no rival of one after 10. The
figures compare trials at one epoch: the last epoch that at least `MIN_COMPARED` trials reached (all of them when
fewer scored). Those trials are COMPLETE in the rebuilt Optuna study with their best value up to that epoch; the
others are PRUNED, so the intermediate-values figure still shows every trial's curve and where ASHA cut it.
"""
from __future__ import annotations

import html
import tempfile
import warnings
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from mlflow.tracking import MlflowClient

MIN_COMPARED = 3
TOP_PARAMS = 8  # parameters shown in the parallel-coordinates and slice figures, most important first


def comparable_epoch(curves: dict[int, dict[int, float]]) -> int:
    """The last epoch that at least MIN_COMPARED of the curves reached (every curve when fewer exist)."""
    reached = sorted((max(c) for c in curves.values() if c), reverse=True)
    if not reached:
        return 0
    return reached[min(MIN_COMPARED, len(reached)) - 1]


def rebuild_study(table: pd.DataFrame, curves: dict[int, dict[int, float]], space: Any, mode: str, epoch: int,
                  storage: str | None = None, name: str | None = None) -> optuna.Study:
    """An Optuna study of the trials (in memory, or in `storage` as `name`): COMPLETE with the best value up to
    `epoch` for those that reached it, PRUNED (their curve only) for the others; failed trials are left out."""
    best = max if mode == "max" else min
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize" if mode == "max" else "minimize")
    for row in table.itertuples():
        curve = curves.get(row.trial_number)
        if not curve:
            continue
        params, dists = space.searched(row.config)
        reached = max(curve) >= epoch
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, intermediate_values=curve,
            state=optuna.trial.TrialState.COMPLETE if reached else optuna.trial.TrialState.PRUNED,
            value=best(v for e, v in curve.items() if e <= epoch) if reached else None,
            user_attrs={"trial_number": int(row.trial_number), "run_id": row.run_id}))
    return study


def figures(study: optuna.Study, metric: str, epoch: int) -> dict[str, Any]:
    """Optuna's Plotly figures of the study, by title; those it cannot draw (too few trials, one value) left out."""
    from optuna import visualization as vis

    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    at = f"{metric} (best up to epoch {epoch})"
    out = {"Optimisation history": lambda: vis.plot_optimization_history(study, target_name=at),
           "Intermediate values (where ASHA stopped each trial)": lambda: vis.plot_intermediate_values(study)}
    importances: dict[str, float] = {}
    if len(complete) >= 2:
        try:
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (RuntimeError, ValueError):  # no parameter varies among the compared trials
            importances = {}
    if importances:
        top = list(importances)[:TOP_PARAMS]
        out["Parameter importance (fANOVA)"] = lambda: vis.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target_name=at)
        out["Parallel coordinates"] = lambda: vis.plot_parallel_coordinate(study, params=top, target_name=at)
        out["Slice"] = lambda: vis.plot_slice(study, params=top, target_name=at)
    drawn = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for title, draw in out.items():
            try:
                drawn[title] = draw()
            except (ValueError, RuntimeError):  # Optuna refuses a figure it has too little data for
                continue
    return drawn


def page(title: str, note: str, figs: dict[str, Any]) -> str:
    """One HTML page of the figures, plotly.js embedded once (about 5 MB), no network needed."""
    parts = []
    for i, (name, fig) in enumerate(figs.items()):
        fig.update_layout(title=name, height=520, margin={"l": 60, "r": 30, "t": 60, "b": 60})
        parts.append(fig.to_html(full_html=False, include_plotlyjs=i == 0, default_width="100%"))
    body = "\n".join(f"<section>{p}</section>" for p in parts) or "<p>No figure: too few trials reported.</p>"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:16px}section{margin-bottom:24px}</style></head>"
            f"<body><h2>{html.escape(title)}</h2><p>{html.escape(note)}</p>{body}</body></html>")


def metric_curves(client: MlflowClient, table: pd.DataFrame, metric: str) -> dict[int, dict[int, float]]:
    """Each trial's validation metric per epoch, from its child run (trials that reported none left out)."""
    curves = {int(row.trial_number): {m.step: m.value for m in client.get_metric_history(row.run_id, metric)}
              for row in table.itertuples() if isinstance(row.run_id, str)}
    return {n: c for n, c in curves.items() if c}


STUDY_FILE = "optuna_study.db"  # the rebuilt study as an Optuna sqlite storage, for `ecgsearch dashboard`


def log_views(client: MlflowClient, parent: str, table: pd.DataFrame, space: Any, metric: str, mode: str) -> None:
    """On the parent run: `search_views.html` and the same study as `optuna_study.db` (study named after the
    search); nothing when no trial reported the metric."""
    curves = metric_curves(client, table, metric)
    epoch = comparable_epoch(curves)
    if not epoch:
        return
    name = client.get_run(parent).info.run_name
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / STUDY_FILE
        storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
        study = rebuild_study(table, curves, space, mode, epoch, storage, name)
        compared = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
        note = (f"{compared} of {len(curves)} trials reached epoch {epoch}: the figures compare them on their best "
                f"{metric} up to epoch {epoch}; the others appear only in the intermediate values, where ASHA "
                "stopped them.")
        client.log_text(parent, page(f"search {name}: {metric}", note, figures(study, metric, epoch)),
                        "search_views.html")
        storage.engine.dispose()
        client.log_artifact(parent, str(path))


def recorded_study(run: Any) -> Any:
    """The Optuna storage a search keeps its study in, as its parent run records it (param `optuna_storage`: the
    sqlite file beside its Ray state by default); it holds the trials as the searcher saw them, live while the
    search runs."""
    from data_prep.errors import InputError
    from search.optuna_storage import open_optuna_storage

    name, uri = run.info.run_name, run.data.params.get("optuna_storage", "null")
    if uri in ("", "null", "None"):
        raise InputError(f"search {name}: no {STUDY_FILE} on its run and no Optuna storage recorded (its study was "
                         "in memory)")
    if "***" in uri:
        raise InputError(f"search {name}: its study is in {uri}; give that URI with its password as --optuna-storage")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise InputError(f"search {name}: no study file at {uri.removeprefix('sqlite:///')} (the search ran on "
                         "another machine?)")
    return open_optuna_storage(uri)


def serve_dashboard(search: str, tracking_uri: str | None = None, optuna_storage: str | None = None,
                    port: int = 8080) -> int:
    """optuna-dashboard on 127.0.0.1 over a search's Optuna study until Ctrl-C: the study in `optuna_storage` if
    given; else the study a finished search logged (`optuna_study.db`: trials compared at one epoch); else, while
    the search runs (or after it was interrupted), the live study its run records (`recorded_study`)."""
    import optuna_dashboard

    from search.optuna_storage import open_optuna_storage
    from search.promote import find_search
    from search.server import mask_uri
    from search.tracking import open_store

    client, _ = open_store(tracking_uri)
    run = find_search(client, search)
    with tempfile.TemporaryDirectory() as tmp:
        if optuna_storage:
            storage: Any = open_optuna_storage(optuna_storage)
            what = f"live study in {mask_uri(optuna_storage)}"
        elif STUDY_FILE in {a.path for a in client.list_artifacts(run.info.run_id)}:
            path = client.download_artifacts(run.info.run_id, STUDY_FILE, tmp)
            storage, what = optuna.storages.RDBStorage(f"sqlite:///{path}"), f"the finished search's {STUDY_FILE}"
        else:
            storage, what = recorded_study(run), f"live study in {run.data.params['optuna_storage']}"
        print(f"optuna-dashboard on search {run.info.run_name} ({what}): open http://127.0.0.1:{port}/dashboard "
              "(Ctrl-C stops it)", flush=True)
        try:
            optuna_dashboard.run_server(storage, host="127.0.0.1", port=port)
        except KeyboardInterrupt:
            pass
    return 0
