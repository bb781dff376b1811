"""Bad configuration through the real CLI: each malformed search option, search-space file or study file is one
`ecgsearch: error:` line naming the setting, exit code 2, no traceback, and nothing started (no Ray, no MLflow run)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from search.cli import main
from search_fixtures import small_ptbxl  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]

# (extra CLI options or {"space": YAML text}, words the error line must hold)
SEARCH_CASES = {
    "zero trials": (["--num-samples", "0"], ["--num-samples"]),
    "zero epochs": (["--max-epochs", "0"], ["--max-epochs"]),
    "zero concurrency": (["--max-concurrent", "0"], ["--max-concurrent"]),
    "zero cpus": (["--cpus-per-trial", "0"], ["--cpus-per-trial"]),
    "more cpus than the machine": (["--cpus-per-trial", "512"], ["--cpus-per-trial 512", "CPUs"]),
    "a gpu on a cpu machine": (["--gpus-per-trial", "1"], ["--gpus-per-trial 1", "GPUs"]),
    "negative time budget": (["--time-budget", "-5"], ["--time-budget"]),
    "negative retries": (["--max-failures", "-1"], ["--max-failures"]),
    "regression without target": (["--task", "regression"], ["--target"]),
    "transfer without pretrained": (["--approach", "single"], ["--pretrained", "single"]),
    "pretrained not TARGET=URI": (["--approach", "single", "--pretrained", "qrs"], ["--pretrained", "TARGET=URI"]),
    "pretrained unknown target": (["--approach", "single", "--pretrained", "st=/x.pt"], ["--pretrained st", "st"]),
    "pretrained missing file": (["--approach", "single", "--pretrained", "qrs=/nowhere/model.pt"],
                                ["--pretrained qrs", "no checkpoint"]),
    "tracking server not answering": (["--tracking-uri", "http://127.0.0.1:9"], ["--tracking-uri", "does not answer"]),
    "tracking dir missing": (["--tracking-uri", "sqlite:////nowhere/at/all/m.db"], ["--tracking-uri", "does not exist"]),
    "space file missing": (["--config", "/nowhere/space.yaml"], ["search space", "does not exist"]),
    "space not yaml": ({"space": "lr: [0.1, 0.2\n"}, ["search space", "not valid YAML"]),
    "space not a mapping": ({"space": "- lr\n- arch\n"}, ["search space", "mapping"]),
    "unknown key": ({"space": "learning_rate: 0.1\n"}, ["learning_rate"]),
    "wrong type": ({"space": "batch_size: big\n"}, ["batch_size", "'big'", "int"]),
    "inverted range": ({"space": "lr: {low: 0.1, high: 0.001}\n"}, ["lr", "inverted range"]),
    "empty choices": ({"space": "arch: []\n"}, ["arch", "empty"]),
    "unknown architecture": ({"space": "arch: [cnn1d, transformer9000]\n"}, ["arch", "transformer9000"]),
    "range with unknown key": ({"space": "lr: {low: 0.001, high: 0.1, scale: log}\n"}, ["lr", "range"]),
    "range for a name": ({"space": "norm: {low: 1, high: 2}\n"}, ["norm", "range"]),
    "log range from zero": ({"space": "weight_decay: {low: 0.0, high: 0.1, log: true}\n"},
                            ["weight_decay", "log range"]),
    "probability above 1": ({"space": "aug: {noise: {p: 1.5}}\n"}, ["aug.noise.p", "1.5"]),
    "unknown arch hyperparameter": ({"space": "archs: {cnn1d: {heads: 4}}\n"}, ["archs.cnn1d.heads"]),
    "negative arch hyperparameter": ({"space": "archs: {cnn1d: {width: -3}}\n"}, ["arch.width", "-3"]),
}


def no_runs(uri: str) -> bool:
    """True when the store holds no run at all (or was never created)."""
    path = Path(uri[len("sqlite:///"):])
    if not path.exists():
        return True
    client = MlflowClient(uri)
    return not client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("case", SEARCH_CASES)
def test_bad_search_setting_is_one_line_exit_2_and_nothing_starts(case: str, small_ptbxl: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    import ray

    options, words = SEARCH_CASES[case]
    if isinstance(options, dict):
        (tmp_path / "space.yaml").write_text(options["space"])
        options = ["--config", str(tmp_path / "space.yaml")]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["search", "--data", str(small_ptbxl), "--task", "classification", "--num-samples", "2",
            "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray"), *options]
    # the last occurrence of an option wins in argparse, so the case's own options override the defaults above
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and err.startswith("ecgsearch: error: "), err
    assert all(w in err for w in words), err
    assert "Traceback" not in out + err and "MLflow run" not in out
    assert not ray.is_initialized() and not (tmp_path / "ray").exists()
    assert no_runs(uri)


def test_missing_dataset_in_a_real_process_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "search.cli", "search", "--data", str(tmp_path / "nowhere"),
                           "--task", "classification", "--num-samples", "2",
                           "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ecgsearch: error: ") and "nowhere" in last, proc.stderr
    assert not (tmp_path / "m.db").exists() or no_runs(f"sqlite:///{tmp_path / 'm.db'}")


STUDY = yaml.safe_load((REPO / "configs" / "study-small.yaml").read_text())
STUDY_CASES = {
    "unknown section": ({"stages": 3}, ["stages"]),
    "unknown target": ({"pretrain": {"targets": ["hr", "rr"]}}, ["pretrain.targets", "rr"]),
    "zero trials": ({"finetune": {"num_samples": 0}}, ["finetune.num_samples"]),
    "bad rate": ({"data": {"ptbxl": {"root": "ROOT", "rate": 250}}}, ["data.ptbxl.rate", "250"]),
    "inverted range in a stage space": ({"pretrain": {"space": {"lr": {"low": 0.1, "high": 0.01}}}},
                                        ["pretrain.space", "inverted"]),
}


def merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for k, v in changes.items():
        out[k] = merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


@pytest.mark.parametrize("case", STUDY_CASES)
def test_bad_study_setting_is_one_line_exit_2_and_nothing_starts(case: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    import ray

    changes, words = STUDY_CASES[case]
    config = merged({**STUDY, "workdir": str(tmp_path / "work"),
                     "data": {"ptbxl": {"root": str(REPO / "sample_data" / "ptbxl"), "rate": 100},
                              "deepfake": {"count": 8}}}, changes)
    if config["data"]["ptbxl"]["root"] == "ROOT":
        config["data"]["ptbxl"]["root"] = str(REPO / "sample_data" / "ptbxl")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["study", "--config", str(path), "--tracking-uri", uri]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and err.startswith("ecgsearch: error: "), err
    assert all(w in err for w in words), err
    assert "Traceback" not in out + err
    assert not ray.is_initialized() and not (tmp_path / "work").exists() and no_runs(uri)
