"""lmqueue.jobs.jobs_to_drop, the watcher's one query, against a real store (SQLite, Postgres):
which of a worker's jobs it must let go."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update

from cli.stack import Stack
from lmqueue.db import session_scope
from lmqueue.jobs import create_job, jobs_to_drop
from lmqueue.tables import Job, JobStatus
from lmqueue.transitions import claim_jobs
from tests.postgres import fresh_postgres_database
from tests.scheduler_load import settings_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> Iterator[None]:
    def use(url: str) -> Iterator[None]:
        st = Stack(url, redis_url, {"m": tmp_path}, tmp_path)
        st.migrate()
        with settings_for(st):
            yield

    if request.param == "sqlite":
        yield from use(f"sqlite:///{tmp_path / 'drop.db'}")
        return
    with fresh_postgres_database() as url:
        yield from use(url)


def _jobs(n: int) -> list[str]:
    with session_scope() as s:
        jobs = [
            create_job(
                s, owner="", model="m", endpoint="/v1/completions", body={"prompt": "x"}, priority=5
            )[0]
            for _ in range(n)
        ]
        s.flush()
        return [j.id for j in jobs]


def _set(ids: list[str], **values: object) -> None:
    with session_scope() as s:
        s.execute(update(Job).where(Job.id.in_(ids)).values(**values))


def test_running_jobs_no_longer_held_and_finished_waiting_ones_are_dropped(store: None) -> None:
    run = _jobs(4)
    wait = _jobs(3)
    with session_scope() as s:
        claim_jobs(s, run, "w1", lease_s=60)
    _set(run[1:2], status=JobStatus.CANCELLED)  # cancelled while it ran
    _set(run[2:3], worker="w2")  # its lease ran out and another worker claimed it
    _set(wait[0:1], status=JobStatus.SUCCEEDED)  # a re-sent copy finished elsewhere
    _set(wait[1:2], status=JobStatus.CANCELLED)
    gone = "job-never-stored"
    with session_scope() as s:
        drop = jobs_to_drop(s, [*run, gone], wait, "w1")
    # A running id the store does not know is not held either; a waiting one is left to its
    # task (it skips it).
    assert drop == {run[1], run[2], gone, wait[0], wait[1]}
    with session_scope() as s:
        assert jobs_to_drop(s, [], [], "w1") == set()
        assert jobs_to_drop(s, run[3:], wait[2:], "w1") == set()
