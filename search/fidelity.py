"""Multi-fidelity across sampling rate: judge configurations at 100 Hz, retrain the best at 500 Hz.

    from search.fidelity import run_fidelity
    low, high = run_fidelity(spec, "prepared/ptbxl-500")   # spec.data: the 100 Hz dataset of the same records

The 100 Hz search runs under ASHA as usual; the configurations that reached its top rung (not stopped by the
scheduler), best first, up to `spec.top_k`, are enqueued (`study.enqueue_trial`, in order) into a 500 Hz search
on the same records, which trains each of them to `max_epochs` and chooses the champion at 500 Hz. The two datasets
must hold the same records in the same halves and splits (`pair`). Lineage: every 500 Hz child run is tagged
`fidelity.from_run` / `fidelity.from_trial` (the 100 Hz trial it came from) and the 500 Hz search run
`fidelity.low_search` (the 100 Hz search's run).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from data_prep.dataset import PreparedDataset, open_dataset
from data_prep.errors import InputError
from search.optuna_storage import study_file_uri
from search.warmstart import Fitted, fit_trial

LOW, HIGH = 100, 500


def pair(low: str | Path, high: str | Path) -> tuple[PreparedDataset, PreparedDataset]:
    """The 100 Hz and 500 Hz datasets, checked to hold the same records (ids, order, halves, splits)."""
    a, b = open_dataset(low), open_dataset(high)
    for ds, rate in ((a, LOW), (b, HIGH)):
        if ds.rate != rate:
            raise InputError(f"--fidelity rate: {ds.path} is at {ds.rate} Hz, expected {rate} Hz")
    ids_a, ids_b = list(a.labels["record_id"]), list(b.labels["record_id"])
    if ids_a != ids_b:
        only_a, only_b = sorted(set(ids_a) - set(ids_b)), sorted(set(ids_b) - set(ids_a))
        what = (f"record {only_a[0]} is only in {a.path}" if only_a else f"record {only_b[0]} is only in {b.path}"
                if only_b else "the records are in another order")
        raise InputError(f"--fidelity rate: {a.path} ({len(ids_a)} records) and {b.path} ({len(ids_b)}) differ: "
                         f"{what}; prepare both rates from the same database")
    for column in ("half", "split"):
        differ = (a.labels[column] != b.labels[column]).to_numpy()
        if differ.any():
            record = a.labels["record_id"].iloc[differ.argmax()]
            raise InputError(f"--fidelity rate: record {record} is in {column} {a.labels[column].iloc[differ.argmax()]}"
                             f" at {LOW} Hz and {b.labels[column].iloc[differ.argmax()]} at {HIGH} Hz")
    return a, b


def top_rung(client: Any, parent_run_id: str, space: Any, metric: str, mode: str, k: int) -> list[tuple[Any, Fitted]]:
    """The finished search's trials that ASHA did not stop (they reached its top rung), best first, at most k:
    (child run, its configuration fitted to `space`)."""
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    key = f"best_{metric}"
    top = [c for c in children if c.info.status == "FINISHED" and c.data.tags.get("stopped_by") != "scheduler"
           and key in c.data.metrics]
    top.sort(key=lambda c: c.data.metrics[key], reverse=mode == "max")
    return [(c, fit_trial(space, c.info.run_id, c.data.params, c.data.metrics[key])) for c in top[:k]]


def high_spec(spec: Any, high: str | Path, picks: list[tuple[Any, Fitted]], storage_dir: Path) -> Any:
    """The 500 Hz search: the picks enqueued in order into its Optuna study (a sqlite file under `storage_dir`
    unless the spec names an Optuna storage), one trial each, trained to max_epochs."""
    name = f"{spec.name}-{HIGH}hz"
    uri = spec.optuna_storage or study_file_uri(storage_dir, name)
    study = optuna.create_study(storage=uri, study_name=name, load_if_exists=True,
                                direction="maximize" if spec.metric[1] == "max" else "minimize")
    for run, fitted in picks:
        study.enqueue_trial(fitted.point, user_attrs={"fidelity.from_run": run.info.run_id,
                                                      "fidelity.from_trial": run.data.tags.get("trial_number", "")})
    return spec.replace(data=str(high), name=name, num_samples=len(picks), asha=False, fidelity=None,
                        optuna_storage=uri, warm_start=())


def tag_lineage(client: Any, low_parent: str, high_result: Any, storage_uri: str) -> None:
    """Name, on each 500 Hz child run, the 100 Hz trial whose configuration it retrained."""
    study = optuna.load_study(study_name=high_result.name, storage=storage_uri)
    origin = {t.number: t.user_attrs for t in study.trials if "fidelity.from_run" in t.user_attrs}
    client.set_tag(high_result.parent_run_id, "fidelity.low_search", low_parent)
    for _, row in high_result.table.iterrows():
        attrs = origin.get(int(row["trial_number"]))
        if attrs:
            for key, value in attrs.items():
                client.set_tag(row["run_id"], key, str(value))


def run_fidelity(spec: Any, high: str | Path, low_tags: dict[str, str] | None = None,
                 **high_changes: Any) -> tuple[Any, Any]:
    """The 100 Hz search of `spec` (data at 100 Hz), then the 500 Hz search of its top-rung configurations on the
    same records at `high`; returns both SearchResults (the champion is the 500 Hz one's best). `low_tags` replace
    the spec's tags on the 100 Hz search's run; `high_changes` are SearchSpec fields of the 500 Hz search (e.g. its
    `pretrained` backbones at 500 Hz, its `tags`)."""
    from search.tuner import run_search

    pair(spec.data, high)
    base = spec.replace(fidelity=None)
    low = run_search(base if low_tags is None else base.replace(tags=low_tags))
    inputs = base.replace(name=low.name).validate()
    picks = top_rung(inputs.client, low.parent_run_id, inputs.space, low.metric, low.mode, max(1, spec.top_k))
    if not picks:
        raise InputError(f"--fidelity rate: no trial of {low.name} reached the top rung; nothing to retrain at "
                         f"{HIGH} Hz")
    retrain = high_spec(base.replace(name=low.name), high, picks, Path(low.storage).parent).replace(**high_changes)
    result = run_search(retrain)
    tag_lineage(inputs.client, low.parent_run_id, result, retrain.optuna_storage)
    return low, result
