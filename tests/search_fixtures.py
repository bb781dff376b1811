"""Fixtures for search tests: a small prepared PTB-XL subset, a local Ray on 2 CPUs and a sqlite MLflow store.

Import them into a test module (`from search_fixtures import local_ray, small_ptbxl, store`; pytest puts tests/ on
sys.path).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
RECORDS = 120


@pytest.fixture(scope="session")
def small_ptbxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 120 records of the embedded PTB-XL sample at 100 Hz, prepared with a seeded 70/10/20 split."""
    from data_prep.ptbxl import prepare_ptbxl

    root = tmp_path_factory.mktemp("ptbxl-subset") / "root"
    shutil.copytree(SAMPLE / "ptbxl", root, ignore=shutil.ignore_patterns("records500"))
    db = pd.read_csv(root / "ptbxl_database.csv")
    db.head(RECORDS).to_csv(root / "ptbxl_database.csv", index=False)
    return prepare_ptbxl(root, root.parent / "prepared", split="random", workers=1)


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray with 2 CPUs for the module's searches (run_search uses it and leaves it running)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A fresh sqlite MLflow store in the test's tmp_path."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
