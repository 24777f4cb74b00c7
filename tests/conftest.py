"""Shared fixtures: a real Redis, SQLite and Postgres databases, a tiny real HF model, and a
running stack (API + worker processes) per database backend."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.embedded import EmbeddedRedis
from cli.stack import Stack
from lmqueue.broker import redis_reachable
from tests.postgres import fresh_postgres_database

MODEL_CACHE = Path(os.environ.get("LMQUEUE_TEST_CACHE", Path.home() / ".cache" / "lmqueue-tests"))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The machine's Redis if it answers, else an embedded one started for this session."""
    url = (
        os.environ.get("TEST_REDIS_URL")
        or os.environ.get("REDIS_URL")
        or "redis://127.0.0.1:6379/0"
    )
    if redis_reachable(url):
        yield url
        return
    server = EmbeddedRedis()
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from worker.demo_model import build_demo_model

    return build_demo_model(MODEL_CACHE / "tiny", size="tiny")


@pytest.fixture(
    scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'lmqueue.db'}"
        return
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def stack(
    database_url: str,
    redis_url: str,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """API + one worker for model "tiny"; model "idle" is served by the API but has no worker
    (its jobs stay queued, which the cancel tests need)."""
    st = Stack(
        database_url,
        redis_url,
        {"tiny": tiny_model_dir, "idle": tiny_model_dir},
        tmp_path_factory.mktemp("logs"),
    )
    st.migrate()
    try:
        st.start_api()
        st.start_worker("tiny")
        yield st
    finally:
        st.stop()
