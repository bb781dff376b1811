"""Shared fixtures: copies of the embedded sample data, so no test touches the originals."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


@pytest.fixture(scope="session", autouse=True)
def outside_the_repository(tmp_path_factory: pytest.TempPathFactory):
    """Every test runs in a temporary working directory, so what lands in a default place (mlflow.db, an MLflow
    experiment's ./mlruns, ray_results) never lands in the repository."""
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(here)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The embedded sample data (read-only: copy before changing anything)."""
    return SAMPLE


@pytest.fixture
def ptbxl_root(tmp_path: Path) -> Path:
    """A private copy of the embedded PTB-XL sample (488 records at 100 Hz, 40 at 500 Hz)."""
    dst = tmp_path / "ptbxl"
    shutil.copytree(SAMPLE / "ptbxl", dst)
    return dst


@pytest.fixture
def asc_dir(tmp_path: Path) -> Path:
    """A private copy of the four published DeepFake .asc ECGs."""
    dst = tmp_path / "deepfake-asc"
    shutil.copytree(SAMPLE / "deepfake-asc", dst)
    return dst
