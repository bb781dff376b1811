"""Security: checkpoints load with weights_only (a pickled payload is refused, never run), the MLflow server listens
on 127.0.0.1 only, and a password in the tracking or Optuna storage URI never reaches MLflow params/tags or output."""
from __future__ import annotations

import os
import re
import socket
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cluster_fixtures import free_port, postgres_uri  # noqa: F401 (fixture)
from ecgmodels import load_checkpoint
from search.cli import main
from search.server import start_server
from search_fixtures import small_ptbxl  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "s3cret-pw-93"


class Payload:
    """Unpickling this runs os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_every_torch_load_in_the_code_is_weights_only() -> None:
    calls = []
    for path in [*REPO.glob("*/**/*.py")]:
        if ".venv" in path.parts or "tests" in path.parts:
            continue
        calls += [(path, m.group(0)) for m in re.finditer(r"torch\.load\([^)]*\)", path.read_text())]
    assert calls, "no torch.load found: the scan is broken"
    assert all("weights_only=True" in call for _, call in calls), [c for c in calls if "weights_only=True" not in c[1]]


def test_a_pickled_payload_in_a_checkpoint_is_refused_and_never_runs(small_ptbxl: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    torch.save({"config": Payload(marker), "frozen": 0, "state_dict": {}, "extra": {}}, tmp_path / "model.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(tmp_path / "model.pt")
    code = main(["search", "--data", str(small_ptbxl), "--task", "classification", "--approach", "single",
                 "--pretrained", f"qrs={tmp_path / 'model.pt'}", "--num-samples", "1",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("ecgsearch: error: --pretrained qrs=") and "loads safely" in err, err
    assert not marker.exists()


def non_loopback_ip() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        return s.getsockname()[0]


def test_mlflow_server_listens_on_loopback_only(tmp_path: Path) -> None:
    ip = non_loopback_ip()
    if ip.startswith("127."):
        pytest.skip("this machine has no non-loopback address to try")
    port = free_port()
    server = start_server(f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "artifacts", port=port)
    try:
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200
        with socket.socket() as s:
            assert s.connect_ex((ip, port)) != 0, f"the MLflow server answers on {ip}:{port}"
    finally:
        server.stop()


@pytest.mark.timeout(240)
def test_a_password_in_the_tracking_and_optuna_uris_is_never_logged_or_printed(postgres_uri, small_ptbxl: Path,
                                                                                tmp_path: Path, capfd) -> None:
    import ray

    secret_uri = postgres_uri.replace("postgres@", f"postgres:{PASSWORD}@")  # trust auth: any password works
    assert PASSWORD in secret_uri
    space = tmp_path / "space.yaml"
    space.write_text("arch: cnn1d\narchs: {cnn1d: {width: 8, depth: 3}}\nbatch_size: 32\n")
    code = main(["search", "--data", str(small_ptbxl), "--task", "classification", "--num-samples", "1",
                 "--max-epochs", "1", "--config", str(space), "--tracking-uri", secret_uri,
                 "--optuna-storage", secret_uri, "--storage-path", str(tmp_path / "ray"), "--name", "pw"])
    assert not ray.is_initialized()
    out, err = capfd.readouterr()
    assert code == 0, err[-2000:]
    assert PASSWORD not in out + err and "postgres:***@" in out
    client = MlflowClient(secret_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 2  # the search and its trial
    for run in runs:
        logged = {**run.data.params, **run.data.tags}
        assert not [k for k, v in logged.items() if PASSWORD in v], run.info.run_name
    # a failed connection names the database with the password masked
    assert main(["search", "--data", str(small_ptbxl), "--task", "classification", "--num-samples", "1",
                 "--tracking-uri", secret_uri + "_missing"]) == 2
    out, err = capfd.readouterr()
    assert PASSWORD not in out + err and "***" in err
