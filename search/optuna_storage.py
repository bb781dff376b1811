"""Optuna's study in a database (`--optuna-storage URI`), e.g. the PostgreSQL database of the MLflow runs.

Ray Tune calls Optuna from the search's driver only, so the database serves persistence and inspection
(optuna-dashboard, `optuna.load_study`), not concurrent writers. In PostgreSQL the study gets its own schema
`optuna`: MLflow and Optuna both keep an `alembic_version` table, and sharing one makes Optuna refuse the database
("no longer compatible with the table schema").
"""
from __future__ import annotations

from data_prep.errors import InputError
from search.server import connect_postgres, is_postgres, mask_uri

SCHEMA = "optuna"


def open_optuna_storage(uri: str):
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
