"""Optuna's study in a database (`--optuna-storage URI`), e.g. the PostgreSQL database of the MLflow runs; without
one, a search keeps its study in a sqlite file beside its Ray state (`<storage path>/<name>-optuna.db`), so
`ecgsearch dashboard` can follow it live with no database server.

Ray Tune calls Optuna from the search's driver only, so the database serves persistence and inspection
(optuna-dashboard, `optuna.load_study`), not concurrent writers. In PostgreSQL the study gets its own schema
`optuna`: MLflow and Optuna both keep an `alembic_version` table, and sharing one makes Optuna refuse the database
("no longer compatible with the table schema").
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from data_prep.errors import InputError
from search.server import connect_postgres, is_postgres, mask_uri

SCHEMA = "optuna"
STUDY_SUFFIX = "-optuna.db"


def study_file_uri(storage_dir: str | Path, name: str) -> str:
    """The sqlite URI of the study file of search `name` whose Ray state lies under `storage_dir` (the folder is
    created): `<storage_dir>/<name>-optuna.db`."""
    path = Path(storage_dir).resolve() / f"{name}{STUDY_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def drop_study(storage: Any, name: str) -> None:
    """Delete study `name` from `storage` if an earlier search of that name left one there: a new search starts from
    an empty study (Optuna's trial numbers are the search's trial numbers)."""
    import optuna

    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        pass


def open_optuna_storage(uri: str) -> Any:
    """An `optuna.storages.RDBStorage` on `uri` (tables created now, in the driver, before any trial)."""
    import optuna
    import sqlalchemy.exc

    kwargs = {}
    if is_postgres(uri):
        with connect_postgres(uri, "--optuna-storage") as conn:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        kwargs["engine_kwargs"] = {"connect_args": {"options": f"-csearch_path={SCHEMA}"}}
    try:
        return optuna.storages.RDBStorage(uri, **kwargs)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        raise InputError(f"--optuna-storage {mask_uri(uri)}: cannot open it "
                         f"({str(e).splitlines()[0].replace(uri, mask_uri(uri))})") from None
