"""What a researcher sees of a search, read back through the MLflow client after a tiny real search (4 trials of 2
epochs, one at a time so ASHA's decisions are reproducible, trial 2 failing): run names and tags that tell finished,
stopped and failed trials apart, the winner marked, only sampled params (4 significant digits), metric names apart
from params, where each trial ran, the search's description and shared view, the Optuna views as self-contained
HTML, the Optuna study file a running search keeps, the progress lines, `ecgsearch compare`, and the CLI's help."""
from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from search import tracking
from search.cli import build_parser, main
from search.compare import compare_searches
from search.spec import SearchSpec
from search.tuner import SearchResult, run_search
from search.views import recorded_study
from search_fixtures import local_ray, small_ptbxl  # noqa: F401 (fixtures)

TINY = {"arch": "cnn1d", "archs": {"cnn1d": {"width": 8, "depth": 3}}, "batch_size": 32, "patience": 5}


@pytest.fixture(scope="module")
def search(local_ray, small_ptbxl: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[SearchResult, str, str]:
    """The search, its store and what it printed."""
    tmp = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = run_search(SearchSpec(small_ptbxl, "classification", num_samples=4, max_epochs=2, max_concurrent=1,
                                       space_overrides=TINY, tracking_uri=uri, storage_path=str(tmp / "ray"),
                                       name="ui", seed=3, grace_period=1, top_k=2,
                                       fault={"trials": [2], "epoch": 1, "kind": "raise"}))
    return result, uri, printed.getvalue()


def trial_runs(result: SearchResult, uri: str) -> dict[int, object]:
    runs = MlflowClient(uri).search_runs([result.experiment_id],
                                         f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    return {int(r.data.tags["trial_number"]): r for r in runs}


def test_runs_table_tells_finished_stopped_and_failed_apart_and_marks_the_winner(search) -> None:
    result, uri, _ = search
    runs, table = trial_runs(result, uri), result.table.set_index("trial_number")
    assert set(table["status"]) == {"finished", "pruned", "failed"}  # ASHA stopped one, trial 2 failed
    for number, run in runs.items():
        state = tracking.STATES[table.loc[number, "status"]]
        assert run.data.tags["state"] == state
        assert run.info.run_name.lstrip("★ ").startswith(f"{number:02d} {state}")
        assert run.info.status == ("FAILED" if state == "failed" else "FINISHED")
    stopped = MlflowClient(uri).search_runs([result.experiment_id], "tags.state = 'stopped'")
    assert {r.info.run_id for r in stopped} == set(table.loc[table["status"] == "pruned", "run_id"])
    assert {r.info.run_name.split()[2] for r in stopped} == {f"{int(e)}/2" for e in
                                                            table.loc[table["status"] == "pruned", "epochs"]}
    winners = [n for n, r in runs.items() if r.data.tags.get("winner") == "true"]
    assert winners == [result.best["trial_number"]] and runs[winners[0]].info.run_name.startswith("★ ")
    assert all(not r.info.run_name.startswith("★") for n, r in runs.items() if n != winners[0])


def test_trial_params_are_its_sampled_values_and_metrics_never_share_their_names(search) -> None:
    result, uri, _ = search
    parent = MlflowClient(uri).get_run(result.parent_run_id)
    assert {"data", "task", "max_epochs", "seed"} <= set(parent.data.params)  # constants: on the search's run
    for run in trial_runs(result, uri).values():
        params, metrics = run.data.params, run.data.metrics
        assert not {"data", "task", "target", "fault", "max_epochs", "seed", "trial_number"} & set(params)
        assert {"lr", "weight_decay", "schedule"} <= set(params)
        assert params["arch"] == "cnn1d" and params["arch.width"] == "8"  # fixed in this space, as given
        for name in ("lr", "weight_decay", "aug.noise.p", "arch.dropout"):  # sampled: 4 significant digits
            mantissa = re.fullmatch(r"-?([0-9.]+)(e[-+]?[0-9]+)?", params[name])
            assert mantissa and len(mantissa.group(1).replace(".", "").lstrip("0")) <= 4, params[name]
        assert not set(metrics) & set(params) and not {"lr", "epoch", "time_this_iter_s"} & set(metrics)
        if run.data.tags["state"] == "failed":  # failed before its first report: nothing measured, no placement
            continue
        assert {"train_lr", "train_loss", "val_loss", "val_auc", "best_val_auc"} <= set(metrics)
        tags = run.data.tags
        assert tags["ray.hostname"] and tags["ray.node_ip"] and len(tags["ray.node_id"]) > 20  # where it ran
        assert "gpu_fraction" not in run.data.tags  # a CPU trial


def test_search_run_describes_the_search_and_its_link_opens_the_trials_best_first(search) -> None:
    result, uri, _ = search
    client = MlflowClient(uri)
    experiment = client.get_experiment(result.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's classic view
    best = result.best
    note = client.get_run(result.parent_run_id).data.tags["mlflow.note.content"]
    link = f"#/experiments/{result.experiment_id}/runs/{best['run_id']}?workflowType=machine_learning"
    assert f"[trial {best['trial_number']}]({link})" in note
    assert "1 finished" in note or "2 finished" in note
    assert "1 failed" in note and "wall time" in note and "search_views.html" in note
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{result.parent_run_id}"])
    assert view["searchFilter"] == f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"
    assert view["orderByKey"] == "metrics.`best_val_auc`" and view["orderByAsc"] is False
    assert {"metrics.`best_val_auc`", "params.`lr`", "tags.`state`"} <= set(view["selectedColumns"])
    assert f"viewStateShareKey={result.parent_run_id}&workflowType=machine_learning" in result.ui_url()
    assert result.ui_url() in result.summary()  # what `ecgsearch search` prints at the end


def test_optuna_views_are_self_contained_html_and_compare_trials_at_one_epoch(search, tmp_path: Path) -> None:
    result, uri, _ = search
    client = MlflowClient(uri)
    page = Path(client.download_artifacts(result.parent_run_id, "search_views.html", str(tmp_path))).read_text()
    # MLflow 3.17 previews an HTML artifact up to 50 MiB in an <iframe sandbox="allow-scripts"> of a blob: URL, so
    # the page's own inline scripts run there but nothing can be fetched: plotly.js inside, every script inline
    assert 1_000_000 < len(page.encode()) < 50 * 2**20 and "<script src=" not in page and "<link" not in page
    assert page.count("Plotly.newPlot") >= 3
    for title in ("Optimisation history", "Intermediate values", "Parameter importance", "Parallel coordinates"):
        assert title in page
    db = client.download_artifacts(result.parent_run_id, "optuna_study.db", str(tmp_path))
    study = optuna.load_study(study_name="ui", storage=f"sqlite:///{db}")
    table = result.table.set_index("trial_number")
    states = {t.user_attrs["trial_number"]: t.state for t in study.trials}
    assert 2 not in states  # the failed trial reported nothing
    epoch = sorted(table.loc[list(states), "epochs"], reverse=True)[min(3, len(states)) - 1]  # 3 reached it
    reached = {n for n in states if table.loc[n, "epochs"] >= epoch}
    assert {n for n, s in states.items() if s == optuna.trial.TrialState.COMPLETE} == reached
    assert f"{len(reached)} of {len(states)} trials reached epoch {epoch}" in page


def test_search_keeps_its_optuna_study_in_a_file_beside_its_ray_state_for_the_live_dashboard(search) -> None:
    """No --optuna-storage: the study is a sqlite file named after the search in its storage path, recorded on its
    run, holding every trial as the searcher was told it (what `ecgsearch dashboard` shows while a search runs)."""
    result, uri, _ = search
    run = MlflowClient(uri).get_run(result.parent_run_id)
    recorded = run.data.params["optuna_storage"]
    assert recorded == f"sqlite:///{result.storage.parent / 'ui-optuna.db'}" and (result.storage.parent /
                                                                                  "ui-optuna.db").is_file()
    study = optuna.load_study(study_name="ui", storage=recorded_study(run))
    table = result.table.set_index("trial_number")
    assert sorted(t.number for t in study.trials) == sorted(table.index)  # Optuna's numbers are the trial numbers
    for trial in study.trials:
        if table.loc[trial.number, "status"] == "failed":
            assert trial.state == optuna.trial.TrialState.FAIL
        else:
            assert trial.value == pytest.approx(table.loc[trial.number, "best_val_auc"])
            assert trial.params["lr"] == pytest.approx(table.loc[trial.number, "lr"])


def test_progress_lines_say_done_running_queued_best_and_time_without_carriage_returns(search) -> None:
    _, _, printed = search
    assert "\r" not in printed and "\x1b" not in printed
    ended = [line for line in printed.splitlines() if line.startswith("[")]
    assert len(ended) == 4 and ended[-1].startswith("[4/4]")
    assert re.search(r"stopped by ASHA at epoch 1 of 2", printed) and "FAILED" in printed
    status = r"\d/4 done, \d running, \d queued; best val_auc [01]\.\d{4} \(trial \d\); \d+:\d\d elapsed"
    assert re.search(status, printed)


def test_compare_puts_the_best_trial_with_its_interval_in_a_table_logged_on_a_run(search) -> None:
    result, uri, _ = search
    table, run_id = compare_searches([result.name], uri)
    row = table.iloc[0]
    assert row["search"] == "ui" and row["approach"] == "baseline" and row["source"] == "ptbxl"
    assert row["value"] == pytest.approx(result.best["best_val_auc"]) and row["ci_low"] <= row["ci_high"]
    assert row["best_trial"] == str(result.best["trial_number"]) and row["epochs"] >= 1
    client = MlflowClient(uri)
    assert {"compare.md", "compare.csv"} <= {a.path for a in client.list_artifacts(run_id)}
    assert client.get_run(run_id).data.tags["compared"] == result.parent_run_id


def test_cli_explains_itself(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 0
    assert "ecgsearch demo" in capsys.readouterr().out  # bare `ecgsearch` prints the help
    with pytest.raises(SystemExit):
        main(["--version"])
    assert re.match(r"ecgsearch \d+\.\d+", capsys.readouterr().out)

    def leaves(parser, path=""):
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs:
            yield path, parser
        for action in subs:
            for name, child in action.choices.items():
                yield from leaves(child, f"{path} {name}".strip())

    found = dict(leaves(build_parser()))
    assert {"search", "demo", "dashboard", "compare", "data ptbxl", "ui"} <= set(found)
    for path, parser in found.items():
        assert "example:" in (parser.epilog or ""), path
        for action in parser._actions:
            assert action.help, f"ecgsearch {path} {action.option_strings or action.dest}: no help"
    search_help = found["search"].format_help()
    assert all(a in search_help for a in ("baseline  train from scratch", "single", "fused"))
    assert "(default: 2)" in search_help  # --max-concurrent
