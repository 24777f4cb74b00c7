"""PostgreSQL for tests: the server to use, and a fresh database per session or test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text

from cli.procs import scratch_postgres_database

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_admin_url() -> str | None:
    """TEST_POSTGRES_URL, else DATABASE_URL if it is Postgres, else the local default if it
    answers. In CI a missing server is an error, never a skip."""
    url = os.environ.get("TEST_POSTGRES_URL") or os.environ.get("DATABASE_URL", "")
    if not url.startswith("postgresql"):
        url = DEFAULT_PG
    try:
        engine = create_engine(url)
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
        return url
    except Exception as exc:
        if os.environ.get("CI"):
            raise RuntimeError(f"CI needs PostgreSQL at {url}: {exc}") from exc
        return None


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    admin = postgres_admin_url()
    if admin is None:
        pytest.skip("no PostgreSQL reachable (set TEST_POSTGRES_URL); CI always runs these")
    with scratch_postgres_database(admin) as url:
        yield url
