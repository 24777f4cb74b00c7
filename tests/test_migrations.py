"""Migrations upgrade an empty database to head, on SQLite and on Postgres."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from lmqueue.migrate import upgrade_head
from tests.postgres import fresh_postgres_database

pytestmark = pytest.mark.timeout(120)

TABLES = {"jobs", "files", "batches", "api_keys", "workers", "scaling_events", "alembic_version"}


def _check(url: str) -> None:
    upgrade_head(url)
    upgrade_head(url)  # a second run is a no-op
    engine = create_engine(url)
    assert set(inspect(engine).get_table_names()) >= TABLES
    with engine.connect() as conn:
        assert conn.execute(text("select version_num from alembic_version")).scalar()
    engine.dispose()


def test_sqlite_upgrade_from_empty(tmp_path: Path) -> None:
    _check(f"sqlite:///{tmp_path / 'fresh.db'}")


@pytest.mark.postgres
def test_postgres_upgrade_from_empty() -> None:
    with fresh_postgres_database() as url:
        _check(url)
