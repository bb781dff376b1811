"""Warm start: a new search begins with the finished trials of earlier searches on the same space.

    study_storage = seed(spec, space, client, parent_run_id, study_storage)   # in run_search, before the searcher

Each earlier search's child runs (params = its trials' sampled values, metric `best_<metric>`) are read from MLflow
and fitted to the current SearchSpace (`fit_trial`): a dimension the space no longer searches is dropped, a choice
it no longer has is dropped, a number outside the new range is dropped from a reused trial (its value was measured
elsewhere) and clipped into range for an enqueued configuration. The fitted trials go into the Optuna study the
searcher then loads (`study.add_trials`: TPE starts from them) and their top-k configurations are enqueued first
(`study.enqueue_trial`). Ray's `OptunaSearch(evaluated_rewards=...)` refuses a define-by-run space, hence the study.
The search's run gets `warm_start.json` (what was reused, dropped and clipped) and the params `warm_start_trials`
and `warm_start_enqueued`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna

from data_prep.errors import InputError
from search.space import Dim, SearchSpace

TOP_K = 3


@dataclass
class Fitted:
    """One earlier trial in the current space's Optuna names: the values kept as they were (`params`), the clipped
    configuration to enqueue (`point`), and what was dropped or clipped."""

    run_id: str
    value: float
    params: dict[str, Any]
    point: dict[str, Any]
    distributions: dict[str, optuna.distributions.BaseDistribution]
    dropped: list[str] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)


def _parse(dim: Dim, text: str) -> tuple[Any, Any] | None:
    """(value as logged, value fitted into the dim) of a logged param text, or None when the dim cannot take it."""
    if dim.choices is not None:
        found = [c for c in dim.choices if text in (str(c), f"{c:.4g}" if isinstance(c, float) else str(c))]
        return (found[0], found[0]) if found else None
    try:
        value = int(round(float(text))) if dim.is_int else float(text)
    except ValueError:
        return None
    fitted = min(max(value, dim.low), dim.high)
    if dim.step:
        fitted = dim.low + round((fitted - dim.low) / dim.step) * dim.step
        fitted = int(fitted) if dim.is_int else min(fitted, dim.high)
    return value, fitted


def fit_trial(space: SearchSpace, run_id: str, params: dict[str, str], value: float) -> Fitted:
    """An earlier trial's logged params (config name -> text) fitted to `space` (see the module's docstring)."""
    fitted = Fitted(run_id, value, {}, {}, {})
    config = {name: d.value for name, d in space.dims.items() if d.fixed}
    searched = [d for d in space.dims.values() if not d.fixed]
    used = set()
    for dims in (searched, None):  # the plain dims first: arch and schedule choose the conditional ones
        if dims is None:
            dims = [d for d in (*space.arch_dims.get(config.get("arch"), []),
                                *space.schedule_dims.get(config.get("schedule"), [])) if not d.fixed]
        for d in dims:
            used.add(d.name)
            if d.name not in params:
                continue
            parsed = _parse(d, params[d.name])
            if parsed is None:
                fitted.dropped.append(f"{d.name}={params[d.name]} (not a choice of the space)")
                continue
            raw, value_in = parsed
            key = d.key or d.name
            config[d.name] = value_in
            fitted.point[key] = value_in
            if raw == value_in or (isinstance(raw, float) and abs(raw - value_in) <= 1e-9 * max(1.0, abs(raw))):
                fitted.params[key], fitted.distributions[key] = value_in, d.distribution()
            else:
                fitted.clipped.append(f"{d.name}={params[d.name]} -> {value_in}")
    fitted.dropped += [f"{k} (not searched here)" for k in sorted(set(params) - used)]
    return fitted


def read_search(client: Any, search: str, space: SearchSpace, metric: str) -> tuple[Any, list[Fitted]]:
    """An earlier search's parent run and its finished trials fitted to `space`."""
    from search.promote import find_search

    parent = find_search(client, search)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    key = f"best_{metric}"
    finished = [c for c in children if c.info.status == "FINISHED" and key in c.data.metrics]
    if children and not any(key in c.data.metrics for c in children):
        raise InputError(f"--warm-start {search}: its trials have no {key} (another task?)")
    return parent, [fit_trial(space, c.info.run_id, c.data.params, c.data.metrics[key]) for c in finished]


def seed(spec: Any, space: SearchSpace, client: Any, parent_run_id: str, storage: Any = None) -> Any:
    """The Optuna storage for the search's searcher, holding a study named after the search with the warm-start
    searches' trials added and their top-k enqueued (`storage` unchanged when `spec.warm_start` is empty; an
    in-memory storage when it was None); what was reused is logged on the search's run."""
    if not spec.warm_start:
        return storage
    from search.tracking import log_params

    metric, mode = spec.metric
    storage = storage or optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name=spec.name, load_if_exists=True,
                                direction="maximize" if mode == "max" else "minimize")
    reused, report = [], {}
    for search in spec.warm_start:
        parent, trials = read_search(client, search, space, metric)
        reused += trials
        report[search] = {"run_id": parent.info.run_id, "trials": [
            {"run_id": t.run_id, f"best_{metric}": t.value, "dropped": t.dropped, "clipped": t.clipped}
            for t in trials]}
    study.add_trials([optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=t.value)
                      for t in reused])
    best = sorted(reused, key=lambda t: t.value, reverse=mode == "max")[:TOP_K]
    for t in best:
        study.enqueue_trial(t.point, user_attrs={"warm_start_run": t.run_id})
    client.log_dict(parent_run_id, {"searches": report, "enqueued": [t.run_id for t in best]}, "warm_start.json")
    log_params(client, parent_run_id, {"warm_start_trials": len(reused), "warm_start_enqueued": len(best)})
    print(f"warm start: {len(reused)} trials of {', '.join(spec.warm_start)}, the best {len(best)} enqueued",
          flush=True)
    return storage
