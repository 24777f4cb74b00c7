"""The reaper's rules against a real store (SQLite and Postgres) and real Redis, with no worker
processes: rows are put in the states a crash or a lost message leaves behind."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, update

from cli.stack import Stack
from lmqueue.broker import producer_app
from lmqueue.contract import queue_name, redis_queue_keys
from lmqueue.db import session_scope
from lmqueue.jobs import create_job
from lmqueue.kombu_redis import (
    job_ids_of,
    queued_job_ids,
    reserved_counts,
    unacked_keys,
)
from lmqueue.settings import Settings, get_settings
from lmqueue.tables import Job, WorkerRecord, now
from lmqueue.transitions import claim_jobs, mark_held
from scheduler.recovery import Reaper
from tests.postgres import fresh_postgres_database

pytestmark = pytest.mark.timeout(60)

MODEL = "m1"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'rec.db'}"
        return
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def env(fresh_db: str, redis_url: str, tmp_path: Path) -> Iterator[Settings]:
    """This process's settings point at a fresh store, the test Redis and a private prefix."""
    st = Stack(fresh_db, redis_url, {MODEL: tmp_path}, tmp_path)
    st.migrate()
    from tests.scheduler_load import settings_for

    with settings_for(
        st,
        LMQUEUE_RECOVERY_GRACE_S="5",
        LMQUEUE_MAX_ATTEMPTS="2",
        LMQUEUE_HEARTBEAT_S="1",
    ) as settings:
        yield settings
        r = redis.Redis.from_url(redis_url)
        r.delete(*redis_queue_keys(queue_name(MODEL, settings)))
        r.close()
    st.stop()


def _new_jobs(n: int, enqueued_ago: float = 0.0, **fields: object) -> list[str]:
    ids = []
    with session_scope() as s:
        for i in range(n):
            job, _ = create_job(
                s,
                owner="",
                model=MODEL,
                endpoint="/v1/completions",
                body={"model": MODEL, "prompt": str(i)},
                priority=5,
            )
            ids.append(job.id)
        s.flush()
        values = {"enqueued_at": now() - enqueued_ago, **fields}
        s.execute(update(Job).where(Job.id.in_(ids)).values(**values))
    return ids


def _jobs(ids: list[str]) -> dict[str, Job]:
    with session_scope() as s:
        return {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}


def _reaper(sent: list[tuple[str, list[str], int]]) -> Reaper:
    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url)
    return Reaper(
        settings,
        client,
        {MODEL: queue_name(MODEL, settings)},
        send=lambda m, ids, p: sent.append((m, list(ids), p)),
    )


def _worker(hostname: str, heartbeat_ago: float, status: str = "up") -> None:
    with session_scope() as s:
        t = now()
        s.add(
            WorkerRecord(
                hostname=hostname,
                model=MODEL,
                pid=1,
                started_at=t - 100,
                heartbeat_at=t - heartbeat_ago,
                status=status,
            )
        )


def test_timeouts_fail_queued_and_running_jobs(env: Settings) -> None:
    late = _new_jobs(2, deadline_at=now() - 1)
    on_time = _new_jobs(1, deadline_at=now() + 600)
    with session_scope() as s:
        claim_jobs(s, late[1:], "w/1", 60)
    counts = _reaper([]).run_once(now())
    jobs = _jobs(late + on_time)
    assert counts["timeout"] == 2
    assert [jobs[i].status for i in late] == ["failed", "failed"]
    assert all(jobs[i].error["code"] == "timeout" for i in late)  # type: ignore[index]
    assert jobs[on_time[0]].status == "queued"
    # The worker's late write finds its job no longer running: the timeout stays.
    from lmqueue.transitions import Outcome, store_outcomes

    with session_scope() as s:
        assert store_outcomes(s, [Outcome(late[1], result={"x": 1})], "w/1") == 0


def test_dead_workers_jobs_are_requeued_and_crash_loops_fail(env: Settings) -> None:
    _worker("dead/1", heartbeat_ago=60)
    _worker("lost/2", heartbeat_ago=0, status="lost")
    _worker("alive/3", heartbeat_ago=0)
    ids = _new_jobs(4, enqueued_ago=100)
    with session_scope() as s:
        claim_jobs(s, ids[:1], "dead/1", 600)
        claim_jobs(s, ids[1:2], "lost/2", 600)
        claim_jobs(s, ids[2:3], "alive/3", 600)
        claim_jobs(s, ids[3:], "alive/3", 600)
        # ids[3] is on its 2nd claim (max_attempts=2) and its lease has run out.
        s.execute(update(Job).where(Job.id == ids[3]).values(attempts=2, lease_expires_at=0))
    sent: list[tuple[str, list[str], int]] = []
    t = now()
    counts = _reaper(sent).run_once(t)
    jobs = _jobs(ids)
    assert counts["worker_lost"] == 2 and counts["worker_crashed"] == 1
    assert {i for _m, batch, _p in sent for i in batch} == set(ids[:2])
    for i in ids[:2]:
        assert jobs[i].status == "queued" and jobs[i].worker is None
        assert jobs[i].attempts == 1, "attempts are counted at claim, not at recovery"
        assert jobs[i].enqueued_at is not None and jobs[i].enqueued_at >= t
    assert jobs[ids[2]].status == "running", "a live worker keeps its job"
    assert jobs[ids[3]].status == "failed"
    assert jobs[ids[3]].error["code"] == "worker_crashed"  # type: ignore[index]


def test_lost_messages_are_resent_and_present_ones_are_not(env: Settings) -> None:
    settings = env
    queue = queue_name(MODEL, settings)
    r = redis.Redis.from_url(settings.redis_url)
    in_queue = _new_jobs(3, enqueued_ago=100)
    lost = _new_jobs(2, enqueued_ago=100)
    recent = _new_jobs(2, enqueued_ago=0)  # within the grace: its message may be in flight
    never_sent = _new_jobs(1, enqueued_at=None)
    with session_scope() as s:
        s.execute(update(Job).where(Job.id.in_(never_sent)).values(created_at=now() - 100))
    from lmqueue.broker import enqueue_jobs

    enqueue_jobs(MODEL, in_queue[:2], 5)
    enqueue_jobs(MODEL, in_queue[2:], 9)  # another priority list
    assert queued_job_ids(r, queue) == set(in_queue)
    sent: list[tuple[str, list[str], int]] = []
    t = now()
    counts = _reaper(sent).run_once(t)
    assert counts["lost_message"] == 3
    assert sorted(i for _m, batch, _p in sent for i in batch) == sorted(lost + never_sent)
    jobs = _jobs(lost + never_sent + in_queue)
    assert all((jobs[i].enqueued_at or 0) >= t for i in lost + never_sent)
    assert all((jobs[i].enqueued_at or 0) < t - 50 for i in in_queue)
    # A second pass inside the grace re-sends nothing.
    sent.clear()
    reaper = _reaper(sent)
    assert reaper.run_once(now())["lost_message"] == 0 and not sent
    assert recent  # (untouched: checked by the count above)
    r.close()


def _fake_unacked(r: redis.Redis, queue: str, job_ids: list[str], taken_ago: float) -> str:
    """An unacked entry exactly as kombu writes it, for a message built by the producer."""
    from lmqueue.broker import enqueue_jobs

    enqueue_jobs(MODEL, job_ids, 5)
    key = next(k for k in redis_queue_keys(queue) if r.llen(k))
    raw = r.rpop(key)
    assert raw is not None
    msg = json.loads(raw)
    tag = msg["properties"]["delivery_tag"]
    unacked, index = unacked_keys()  # this process's deployment (the env fixture's)
    r.hset(unacked, tag, json.dumps([msg, "", queue]))
    r.zadd(index, {tag: time.time() - taken_ago})
    return str(tag)


def test_unacked_messages_count_until_their_holder_is_gone(env: Settings) -> None:
    settings = env
    queue = queue_name(MODEL, settings)
    r = redis.Redis.from_url(settings.redis_url)
    fresh = _new_jobs(1, enqueued_ago=100)  # taken a moment ago: its worker will claim it
    running = _new_jobs(1, enqueued_ago=100)  # taken long ago, running under a live lease
    orphan = _new_jobs(1, enqueued_ago=100)  # taken long ago, never claimed: holder died
    held = _new_jobs(1, enqueued_ago=100)  # taken long ago, waiting for a slot in a live worker
    _worker("alive/1", heartbeat_ago=0)
    with session_scope() as s:
        claim_jobs(s, running, "alive/1", 600)
    tags = [
        _fake_unacked(r, queue, fresh, taken_ago=0),
        _fake_unacked(r, queue, running, taken_ago=100),
        _fake_unacked(r, queue, orphan, taken_ago=100),
        _fake_unacked(r, queue, held, taken_ago=100),
    ]
    with session_scope() as s:  # what the holder's watcher does (worker.runtime)
        mark_held(s, held, now())
    unacked, index = unacked_keys()
    try:
        assert reserved_counts(r, [queue]) == {queue: 4}
        sent: list[tuple[str, list[str], int]] = []
        counts = _reaper(sent).run_once(now())
        assert counts["lost_message"] == 1
        assert [batch for _m, batch, _p in sent] == [orphan]
        assert r.hexists(unacked, tags[0]) and r.hexists(unacked, tags[1])
        assert not r.hexists(unacked, tags[2]), "the dead holder's entry is dropped"
        assert r.hexists(unacked, tags[3]), "a held, unclaimed job is not a lost message"
        assert reserved_counts(r, [queue]) == {queue: 3}
    finally:
        for tag in tags:
            r.hdel(unacked, tag)
            r.zrem(index, tag)
        r.close()


def test_job_ids_of_reads_real_messages(env: Settings) -> None:
    queue = queue_name(MODEL, env)
    producer_app().send_task(
        "lmqueue.process_jobs", kwargs={"job_ids": ["job_x", "job_y"]}, queue=queue
    )
    r = redis.Redis.from_url(env.redis_url)
    raws = [m for k in redis_queue_keys(queue) for m in r.lrange(k, 0, -1)]
    r.close()
    assert [job_ids_of(m) for m in raws] == [["job_x", "job_y"]]
    assert job_ids_of(b"not json") == [] and job_ids_of('{"body": "x"}') == []
