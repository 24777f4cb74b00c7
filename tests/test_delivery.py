"""Delivery guarantees: a redelivered message never recomputes a stored result, and priority
decides which queued job a worker takes first."""

from __future__ import annotations

import pytest
import redis

from cli.procs import wait_until
from cli.stack import Stack
from lmqueue.broker import enqueue_jobs, producer_app, reset_producer
from lmqueue.contract import queue_name
from lmqueue.settings import Settings, reset_settings

pytestmark = pytest.mark.timeout(180)


@pytest.fixture()
def producer_for(stack: Stack, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """This test process as a producer on the stack's broker and queue prefix."""
    monkeypatch.setenv("REDIS_URL", stack.redis_url)
    monkeypatch.setenv("LMQUEUE_QUEUE_PREFIX", stack.queue_prefix)
    monkeypatch.setenv("LMQUEUE_DEPLOYMENT", stack.key_prefix[:-1])
    reset_settings()
    reset_producer()
    yield producer_app()
    reset_settings()
    reset_producer()


def test_redelivered_message_does_not_recompute(stack: Stack, producer_for: object) -> None:
    with stack.client() as client:
        job_id = stack.submit(client, "tiny", "compute me once", max_tokens=3)
        first = stack.wait_job(client, job_id)
    before = stack.jobs([job_id])[0]
    # The same message again, as a broker redelivery (or a recovery re-enqueue) would send it.
    enqueue_jobs("tiny", [job_id], 5)
    enqueue_jobs("tiny", [job_id], 5)
    r = redis.Redis.from_url(stack.redis_url)
    wait_until(
        lambda: r.llen(stack.key_prefix + stack.queue("tiny")) == 0,
        30,
        "the duplicates to be consumed",
    )
    # The worker acks only after its task returns; a probe job queued behind them proves
    # the duplicates were handled, not merely fetched.
    with stack.client() as client:
        stack.wait_job(client, stack.submit(client, "tiny", "probe", max_tokens=1))
    after = stack.jobs([job_id])[0]
    assert (after.attempts, after.microbatch_id, after.finished_at) == (
        before.attempts,
        before.microbatch_id,
        before.finished_at,
    )
    assert after.result == first["response"]


def test_higher_priority_runs_first(stack: Stack) -> None:
    with stack.client() as client:
        # "idle" has no worker yet: the jobs wait in Redis until we start one.
        low = [stack.submit(client, "idle", f"low {i}", max_tokens=1) for i in range(4)]
        high = client.post(
            "/v1/jobs",
            json={
                "model": "idle",
                "endpoint": "/v1/completions",
                "priority": 9,
                "body": {"prompt": "urgent", "max_tokens": 1, "temperature": 0},
            },
        ).json()["id"]
    worker = stack.start_worker("idle", concurrency=1, env={"LMQUEUE_MAX_BATCH_SIZE": "1"})
    try:
        jobs = {j.id: j for j in stack.wait_jobs_done([*low, high], timeout_s=120)}
    finally:
        worker.stop()
        stack.workers.remove(worker)
    first = min(jobs.values(), key=lambda j: j.started_at or 0)
    assert first.id == high, "the priority-9 job should be taken before earlier priority-5 jobs"
    assert all(j.status == "succeeded" for j in jobs.values())


def test_queue_name_uses_prefix() -> None:
    assert queue_name("m", Settings(queue_prefix="p")) == "p.m"
