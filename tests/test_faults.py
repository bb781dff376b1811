"""Faults on real processes: the search driver stopped by Ctrl-C and then killed with SIGKILL while resuming, then
resumed to the end (one child run per trial, finished trials untouched, Optuna continuing, the best matching the
child runs); a trial's worker process dying (retried from its checkpoint, or FAILED with its reason when it keeps
dying). Each test prints the wall time it measured for the fault table."""
from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray.cloudpickle as pickle
from mlflow.tracking import MlflowClient
from optuna.samplers import TPESampler

from search.cli import main
from search.spec import SearchSpec
from search.tuner import run_search
from search_fixtures import local_ray, small_ptbxl  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
TINY = {"arch": "cnn1d", "archs": {"cnn1d": {"width": 8, "depth": 3}}, "batch_size": 32, "patience": 5}
TRIALS = 8


def children(client: MlflowClient, parent) -> dict[int, object]:
    """trial number -> child run (deleted runs excluded); fails on a duplicate."""
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    numbers = [int(r.data.tags["trial_number"]) for r in runs]
    assert len(numbers) == len(set(numbers)), f"duplicate child runs: {sorted(numbers)}"
    return dict(zip(numbers, runs))


def history(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_auc"))


def start(args: list[str]) -> subprocess.Popen:
    """The ecgsearch CLI in its own process group (so a SIGKILL of the group takes its Ray with it)."""
    return subprocess.Popen([sys.executable, "-m", "search.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_ended(process: subprocess.Popen, count: int, out: list[str]) -> None:
    """Read the CLI's output until `count` more trials have ended ("[k/N] trial ..." lines)."""
    seen = 0
    for line in process.stdout:
        out.append(line)
        seen += re.match(r"\[\d+/\d+\] trial", line) is not None
        if seen >= count:
            return
    pytest.fail("the search ended before the fault could be injected:\n" + "".join(out[-30:]))


@pytest.mark.timeout(300)
def test_interrupted_then_killed_search_resumes_without_losing_or_repeating_trials(small_ptbxl: Path,
                                                                                   tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(str(TINY).replace("'", ""))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t0 = time.monotonic()

    # Ctrl-C (SIGINT to the driver only) after 2 trials ended: a clean stop, the parent run KILLED + interrupted
    search, out = start(["search", "--data", str(small_ptbxl), "--task", "classification", "--num-samples",
                         str(TRIALS), "--max-epochs", "3", "--config", str(space), "--tracking-uri", uri,
                         "--storage-path", str(tmp_path / "ray"), "--name", "tiny", "--seed", "1", "--cv", "1"]), []
    wait_for_ended(search, 2, out)
    search.send_signal(signal.SIGINT)
    out += search.stdout.readlines()
    assert search.wait(60) == 130, "".join(out[-20:])
    assert f"ecgsearch resume tiny --tracking-uri {uri}" in out[-1] and "Traceback" not in "".join(out)
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("ecgsearch").experiment_id],
                                "attributes.run_name = 'tiny'")[0]
    assert parent.info.status == "KILLED" and parent.data.tags["interrupted"] == "true"
    # the race a SIGKILL can hit: a trial's run ended in MLflow after Tune last saved its state (Tune resumes it)
    raced = [r for r in children(client, parent).values()
             if r.info.status == "RUNNING" and history(client, r.info.run_id)][:1]
    for run in raced:
        client.set_terminated(run.info.run_id, "FINISHED")
    before = {n: (r.info.run_id, history(client, r.info.run_id)) for n, r in children(client, parent).items()
              if r.info.status == "FINISHED"}
    assert len(before) >= 2

    # The resume's driver killed with SIGKILL (its whole process group, Ray included) after one more trial ended
    resume, out = start(["resume", "tiny", "--tracking-uri", uri]), []
    wait_for_ended(resume, 1, out)
    os.killpg(resume.pid, signal.SIGKILL)
    resume.wait(30)
    before.update({n: (r.info.run_id, history(client, r.info.run_id))
                   for n, r in children(client, parent).items() if r.info.status == "FINISHED" and n not in before})

    # Resumed again, by run id, in this process: it finishes
    assert main(["resume", parent.info.run_id, "--tracking-uri", uri]) == 0

    runs = children(client, parent)
    assert sorted(runs) == list(range(TRIALS))  # none lost, none duplicated
    assert all(r.info.status == "FINISHED" for r in runs.values())
    for number, (run_id, metrics) in before.items():  # finished before a fault: same run, not trained again
        assert runs[number].info.run_id == run_id and history(client, run_id) == metrics, number
    repeated = 0
    for number, run in runs.items():  # every epoch there; a continued trial repeats only epochs after its best one
        steps = [s for s, _ in history(client, run.info.run_id)]
        assert sorted(set(steps)) == list(range(1, max(steps) + 1)), (number, steps)
        repeated += len(steps) - len(set(steps))
    print(f"\nfault: Ctrl-C, then SIGKILL of the resuming driver: {TRIALS} trials in {time.monotonic() - t0:.0f} s "
          f"over 3 driver starts; epochs trained twice (after a trial's best checkpoint): {repeated}; "
          f"trials whose run ended after Tune's last save: {len(raced)}")
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and "interrupted" not in parent.data.tags
    assert parent.data.tags["resumed"] == "2"
    best = max(r.data.metrics["best_val_auc"] for r in runs.values())
    assert parent.data.metrics["best_val_auc"] == pytest.approx(best)
    assert runs[int(parent.data.tags["best_trial_number"])].data.metrics["best_val_auc"] == pytest.approx(best)

    # The restored searcher is Optuna's TPE, and its study holds every trial's result
    state = pickle.loads(Path(sorted(glob.glob(str(tmp_path / "ray/tiny/searcher-state-*.pkl")))[-1]).read_bytes())
    assert isinstance(state["_sampler"], TPESampler)
    assert sorted(t.number for t in state["_ot_study"].trials if t.value is not None) == list(range(TRIALS))


@pytest.mark.timeout(240)
def test_a_killed_trial_process_is_retried_from_its_checkpoint(local_ray, small_ptbxl: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t0 = time.monotonic()
    # trial 0's process exits at epoch 2 of its first attempt: retried from its epoch-1 checkpoint
    result = run_search(SearchSpec(small_ptbxl, "classification", num_samples=2, max_epochs=3, space_overrides=TINY,
                        asha=False, tracking_uri=uri, storage_path=tmp_path / "ray", max_failures=1,
                        fault={"trials": [0], "epoch": 2, "kind": "exit"}))
    crashed = time.monotonic() - t0
    client = MlflowClient(uri)
    runs = children(client, client.get_run(result.parent_run_id))
    assert sorted(runs) == [0, 1] and all(r.info.status == "FINISHED" for r in runs.values())
    assert [s for s, _ in history(client, runs[0].info.run_id)] == [1, 2, 3]  # epoch 1 not trained again
    assert list(result.table["status"]) == ["finished", "finished"]

    # a trial whose process dies at epoch 1 every time: FAILED with its reason after the retry, the other finishes
    t0 = time.monotonic()
    result = run_search(SearchSpec(small_ptbxl, "classification", num_samples=2, max_epochs=1, space_overrides=TINY,
                        asha=False, tracking_uri=uri, storage_path=tmp_path / "ray", max_failures=1,
                        fault={"trials": [1], "epoch": 1, "kind": "exit"}))
    runs = children(client, client.get_run(result.parent_run_id))
    assert runs[0].info.status == "FINISHED" and runs[1].info.status == "FAILED"
    reason = runs[1].data.tags["failure_reason"]
    assert "died" in reason.lower() or "exit" in reason.lower(), reason
    print(f"\nfault: trial process killed: retried from checkpoint, search {crashed:.0f} s; "
          f"keeps dying: FAILED after 1 retry, search {time.monotonic() - t0:.0f} s")
