"""`ecgsearch compare SEARCH...`: several searches' best trials side by side (approach, source, the validation
metric with its 95% patient-bootstrap interval, epochs, trials, wall time), printed and logged as `compare.md` /
`compare.csv` on a run of its own (named `compare-...`, tag `compared` = the searches' run ids).

The interval is of the validation rows that also selected the trial (its `val_predictions.npz`): it says how much
those rows can tell searches apart, not how the model will do on new patients (the study's test rows do that).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from search.evaluate import bootstrap_ci
from search.metrics import macro_auc, mae

METRICS = {"val_auc": macro_auc, "val_mae": mae}


def best_trial_row(client: Any, parent: Any) -> dict[str, Any]:
    """One search's row: its settings, best trial, metric with interval, epochs and wall time."""
    tags, metrics = parent.data.tags, parent.data.metrics
    metric = "val_auc" if tags.get("task") == "classification" else "val_mae"
    row: dict[str, Any] = {
        "search": parent.info.run_name, "approach": tags.get("approach"), "source": tags.get("source"),
        "target": tags.get("task") if tags.get("target") in (None, "None") else tags["target"],
        "trials": tags.get("trials", ""), "stopped": int(metrics.get("trials_pruned", 0)),
        "failed": int(metrics.get("trials_failed", 0)),
        "wall_time": (f"{((parent.info.end_time or time.time() * 1000) - parent.info.start_time) / 60000:.1f} min"),
        "metric": metric, "best_trial": tags.get("best_trial_number", ""), "value": metrics.get(f"best_{metric}"),
        "ci_low": np.nan, "ci_high": np.nan, "epochs": 0}
    run_id = tags.get("best_run_id")
    if run_id:
        row["epochs"] = len(client.get_metric_history(run_id, metric))
        if "val_predictions.npz" in {a.path for a in client.list_artifacts(run_id)}:
            with tempfile.TemporaryDirectory() as tmp:
                npz = np.load(client.download_artifacts(run_id, "val_predictions.npz", tmp))
                _, row["ci_low"], row["ci_high"] = bootstrap_ci(npz["y_true"], npz["y_score"], METRICS[metric])
    return row


def compare_searches(searches: list[str], tracking_uri: str | None = None) -> tuple[pd.DataFrame, str]:
    """The comparison table of the searches (names or run ids) and the id of the run it was logged on."""
    from search.promote import find_search
    from search.tracking import experiment_id, open_store

    client, uri = open_store(tracking_uri)
    parents = [find_search(client, s) for s in searches]
    table = pd.DataFrame([best_trial_row(client, p) for p in parents])
    experiment = experiment_id(client, uri, client.get_experiment(parents[0].info.experiment_id).name)
    run = client.create_run(experiment, run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={"compared": ",".join(p.info.run_id for p in parents)})
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / "compare.csv", index=False)
        client.log_artifact(run.info.run_id, str(Path(tmp) / "compare.csv"))
    client.log_text(run.info.run_id, format_table(table), "compare.md")
    client.set_tag(run.info.run_id, "mlflow.note.content", format_table(table))
    client.set_terminated(run.info.run_id, "FINISHED")
    return table, run.info.run_id


def format_table(table: pd.DataFrame) -> str:
    """The table as Markdown, the metric as `value [low, high]`."""
    shown = table.assign(**{"value (95% CI)": [
        "-" if pd.isna(r.value) else
        f"{r.value:.4f}" + ("" if pd.isna(r.ci_low) else f" [{r.ci_low:.4f}, {r.ci_high:.4f}]")
        for r in table.itertuples()]}).drop(columns=["value", "ci_low", "ci_high"])
    rows = [list(map(str, shown.columns))] + [[str(v) for v in r] for r in shown.itertuples(index=False)]
    return "\n".join("| " + " | ".join(r) + " |" for r in [rows[0], ["---"] * len(rows[0]), *rows[1:]])
