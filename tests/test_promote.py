"""Promotion to the MLflow registry: the alias `champion` moves only on improvement (and says so otherwise),
`force` moves it anyway, and the registered pyfunc predicts exactly what the trial's checkpoint does; `ecgsearch ui`
serves the same store on 127.0.0.1."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from data_prep.dataset import open_dataset
from ecgmodels import load_checkpoint
from search.cli import main
from search.promote import promote
from search.spec import SearchSpec
from search.tuner import SearchResult, run_search
from search_fixtures import local_ray, small_ptbxl  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]

TINY = {"arch": "cnn1d", "archs": {"cnn1d": {"width": 8, "depth": 3}}, "batch_size": 32, "schedule": "constant",
        "lead_stats": False,
        "aug": {a: {"p": 0.0} for a in ("noise", "wander", "scale", "shift", "lead_dropout", "time_mask")}}


@pytest.fixture(scope="module")
def searches(local_ray, small_ptbxl: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """A weak search (one epoch at a tiny learning rate) and a stronger one, in one store."""
    tmp = tmp_path_factory.mktemp("promote")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    runs = [run_search(SearchSpec(small_ptbxl, "classification", num_samples=2, max_epochs=epochs, tracking_uri=uri,
                                  space_overrides={**TINY, "lr": lr}, storage_path=tmp / "ray", name=name, top_k=1,
                                  forest=False))
            for name, lr, epochs in (("weak", 1e-6, 1), ("strong", 3e-3, 4))]
    # 10 val rows, one of them not NORM: the learning rate alone does not decide which is better, so rank them
    weak, strong = sorted(runs, key=lambda r: r.best["best_val_auc"])
    assert strong.best["best_val_auc"] > weak.best["best_val_auc"]  # the premise of the test
    return uri, {"weak": weak, "strong": strong}


def champion(uri: str, name: str = "ecg") -> str:
    return str(MlflowClient(uri).get_model_version_by_alias(name, "champion").version)


def test_champion_moves_only_on_improvement_and_force_overrides(searches: tuple[str, dict],
                                                                capsys: pytest.CaptureFixture) -> None:
    uri, found = searches
    first = promote(found["strong"].name, "ecg", tracking_uri=uri)  # by search name
    assert first.moved and "first champion" in first.message and champion(uri) == first.version

    worse = promote(found["weak"].parent_run_id, "ecg", tracking_uri=uri)  # by run id
    assert not worse.moved and "does not beat" in worse.message and "--force" in worse.message
    assert worse.version != first.version and champion(uri) == first.version  # registered, alias kept

    assert main(["promote", "--search", found["weak"].name, "--name", "ecg", "--force", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out  # the same trial again: no duplicate version, the one it has is forced champion
    assert "forced" in out and f"is already ecg version {worse.version}: nothing registered" in out, out
    assert champion(uri) == worse.version

    better = promote(found["strong"].name, "ecg", tracking_uri=uri)
    assert better.moved and "beats" in better.message and champion(uri) == better.version == first.version
    assert len(MlflowClient(uri).search_model_versions("name = 'ecg'")) == 2


def test_registered_model_predicts_what_the_checkpoint_does(searches: tuple[str, dict], small_ptbxl: Path,
                                                            tmp_path: Path) -> None:
    uri, found = searches
    promoted = promote(found["strong"].name, "ecg-equal", tracking_uri=uri)
    client = MlflowClient(uri)
    version = client.get_model_version("ecg-equal", promoted.version)
    assert version.tags["search_run_id"] == found["strong"].parent_run_id
    assert version.tags["run_id"] == found["strong"].best["run_id"]
    assert version.tags["dataset_hash"] == open_dataset(small_ptbxl).content_hash
    assert float(version.tags["val_auc"]) == pytest.approx(found["strong"].best["best_val_auc"])

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/ecg-equal@champion")
    x = np.asarray(open_dataset(small_ptbxl).signals[:16], dtype=np.float32)
    got = model.predict(x)
    checkpoint = client.download_artifacts(version.tags["run_id"], "model.pt", str(tmp_path))
    with torch.inference_mode():
        want = torch.softmax(load_checkpoint(checkpoint).eval()(torch.from_numpy(x)), 1).numpy()
    assert got.shape == (16, 5) and np.allclose(got.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert tuple(model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 8, 1000)

    # The registered model needs torch, numpy and mlflow, not ecgsearch: load it where the project is not importable.
    np.save(tmp_path / "x.npy", x)
    script = f"""
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f)]  # the project's editable install
sys.path = [p for p in sys.path if p not in ("", {str(REPO)!r})]
import mlflow, numpy as np
mlflow.set_tracking_uri({uri!r})
got = mlflow.pyfunc.load_model("models:/ecg-equal@champion").predict(np.load("x.npy"))
assert not {{"search", "data_prep"}} & set(sys.modules), "the project was imported"
import ecgmodels
print(ecgmodels.__file__)
np.save("got.npy", got)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(REPO) not in done.stdout  # ecgmodels came with the model, not from the repository
    np.testing.assert_allclose(np.load(tmp_path / "got.npy"), want, rtol=0, atol=1e-6)


def test_ui_serves_the_store_on_localhost_and_stops_with_its_process(searches: tuple[str, dict]) -> None:
    uri, found = searches
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen([sys.executable, "-m", "search.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
                          stdout=subprocess.PIPE, text=True)
    try:
        line = ui.stdout.readline()
        link = f"http://127.0.0.1:{port}/#/experiments/{found['strong'].experiment_id}/runs?workflowType=machine_learning"
        assert link in line
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id="
                                         f"{found['strong'].parent_run_id}")
        run = json.loads(urllib.request.urlopen(request, timeout=10).read())["run"]
        assert run["info"]["run_name"] == found["strong"].name
    finally:
        ui.terminate()
        assert ui.wait(30) == 143
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
