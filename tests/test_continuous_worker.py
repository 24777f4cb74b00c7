"""The continuous loop in a real worker process: jobs are claimed when they enter a slot, a job
cancelled while it waits never runs, a running job cancelled or past its deadline leaves its
slot within a few steps, and a worker holding thousands of jobs runs no more than its slots."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from cli.procs import wait_until
from cli.stack import Stack, running
from lmqueue.contract import redis_queue_keys
from tests.conftest import MODEL_CACHE

SLOTS = 2
LONG = 4000  # tokens: seconds of decoding on the tiny long-context model


@pytest.fixture(scope="module")
def long_model_dir() -> Path:
    from worker.demo_model import build_demo_model

    return build_demo_model(MODEL_CACHE / "tiny-long", size="tiny-long")


@pytest.fixture(scope="module")
def loop_stack(
    database_url: str,
    redis_url: str,
    long_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    st = Stack(
        database_url,
        redis_url,
        {"long": long_model_dir},
        tmp_path_factory.mktemp("loop"),
        extra_env={"LMQUEUE_MAX_BATCH_SIZE": str(SLOTS), "LMQUEUE_CANCEL_POLL_S": "0.1"},
    )
    with running(st, ["long"]):
        yield st


def submit(stack: Stack, client: httpx.Client, max_tokens: int, **extra: object) -> str:
    resp = client.post(
        "/v1/jobs",
        json={
            "model": "long",
            "endpoint": "/v1/completions",
            "body": {"prompt": "def main():", "temperature": 0, "max_tokens": max_tokens},
            **extra,
        },
    )
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def status(client: httpx.Client, job_id: str) -> dict[str, object]:
    return client.get(f"/v1/jobs/{job_id}").json()  # type: ignore[no-any-return]


def wait_status(client: httpx.Client, job_id: str, wanted: str, timeout_s: float = 60) -> dict:
    return wait_until(  # type: ignore[no-any-return]
        lambda: j if (j := status(client, job_id))["status"] == wanted else None,
        timeout_s,
        f"job {job_id} to be {wanted}",
        every_s=0.05,
    )


def queue_empty(stack: Stack) -> bool:
    r = redis.Redis.from_url(stack.redis_url)
    try:
        return (
            sum(int(r.llen(k)) for k in redis_queue_keys(stack.queue("long"), stack.key_prefix))
            == 0
        )
    finally:
        r.close()


def cancel(client: httpx.Client, job_id: str) -> None:
    resp = client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 200, resp.text


def test_cancel_waiting_and_running_jobs(loop_stack: Stack) -> None:
    with loop_stack.client() as client:
        long1, long2 = submit(loop_stack, client, LONG), submit(loop_stack, client, LONG)
        for job in (long1, long2):
            wait_status(client, job, "running")
        waiting, short = submit(loop_stack, client, 4), submit(loop_stack, client, 4)
        # Both messages are in the worker now, but the slots are full: the jobs stay queued.
        wait_until(lambda: queue_empty(loop_stack), 30, "the worker to take the messages")
        assert status(client, waiting)["status"] == "queued"
        assert status(client, short)["status"] == "queued"

        cancel(client, waiting)  # waits in the worker: must never run
        cancelled_at = time.monotonic()
        cancel(client, long1)  # runs: must leave its slot within a few steps
        done = wait_status(client, short, "succeeded", timeout_s=30)
        freed_in = time.monotonic() - cancelled_at
        assert status(client, long2)["status"] == "running"  # the other slot is still busy
        gone = status(client, long1)
        assert gone["status"] == "cancelled" and gone["response"] is None
        assert gone["error"]["code"] == "cancelled"  # type: ignore[index]
        never = status(client, waiting)
        assert never["status"] == "cancelled" and never["started_at"] is None
        assert never["attempts"] == 0
        assert done["attempts"] == 1
        cancel(client, long2)
        wait_status(client, long2, "cancelled")
    print(f"slot freed and reused {freed_in:.2f} s after the cancel")


def test_deadline_ends_a_running_row(loop_stack: Stack) -> None:
    with loop_stack.client() as client:
        job = submit(loop_stack, client, LONG, timeout=2)
        wait_status(client, job, "running")
        failed = wait_status(client, job, "failed", timeout_s=30)
        assert failed["error"]["code"] == "timeout"  # type: ignore[index]
        assert failed["started_at"] is not None and failed["response"] is None


def test_held_jobs_are_never_running_beyond_the_slots(
    database_url: str, redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    st = Stack(
        database_url,
        redis_url,
        {"tiny": tiny_model_dir},
        tmp_path,
        extra_env={"LMQUEUE_MAX_BATCH_SIZE": "4", "LMQUEUE_BATCH_LINES_PER_MESSAGE": "32"},
    )
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": f"x = {i}", "max_tokens": 1, "temperature": 0},
        }
        for i in range(2000)
    ]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    with running(st, ["tiny"]), st.client() as client:
        f = client.post(
            "/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", io.BytesIO(data))}
        ).json()
        batch = client.post(
            "/v1/batches",
            json={
                "input_file_id": f["id"],
                "endpoint": "/v1/completions",
                "completion_window": "24h",
            },
        ).json()
        most_running = 0

        def finished() -> bool:
            nonlocal most_running
            b = client.get(f"/v1/batches/{batch['id']}").json()
            most_running = max(most_running, _running_count(st))
            return bool(b["status"] in ("completed", "failed"))

        wait_until(finished, 240, "the 2,000-line batch", every_s=0.05)
    assert 0 < most_running <= 4, most_running


def _running_count(stack: Stack) -> int:
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from lmqueue.tables import Job

    with Session(stack.engine) as s:
        return int(s.scalar(select(func.count()).where(Job.status == "running")) or 0)


def test_jobs_held_past_the_grace_are_not_lost_messages(
    database_url: str, redis_url: str, long_model_dir: Path, tmp_path: Path
) -> None:
    """A worker's waiting jobs outlive the reaper's grace (1 s) behind a long one: their
    unacked entries are then old, and only the watcher's held_at stamps (every grace/4) tell
    the reaper that a live worker holds them. A real reaper pass must find nothing lost."""
    from lmqueue.contract import queue_name
    from scheduler.recovery import Reaper
    from tests.scheduler_load import settings_for

    env = {
        "LMQUEUE_MAX_BATCH_SIZE": "1",
        "LMQUEUE_WORKER_HOLD_JOBS": "8",
        "LMQUEUE_RECOVERY_GRACE_S": "1",
    }
    st = Stack(database_url, redis_url, {"long": long_model_dir}, tmp_path, extra_env=env)
    st.migrate()
    try:
        st.start_api()
        st.start_worker("long", concurrency=8)
        with st.client() as client, settings_for(st) as settings:
            long = submit(st, client, LONG)
            wait_status(client, long, "running")
            held = [submit(st, client, 4) for _ in range(4)]
            wait_until(lambda: queue_empty(st), 30, "the worker to take every message")
            sent: list[list[str]] = []
            reaper = Reaper(
                settings,
                redis.Redis.from_url(redis_url),
                {"long": queue_name("long", settings)},
                send=lambda _m, ids, _p: sent.append(list(ids)),
            )
            taken_at = time.time()
            while time.time() < taken_at + 3:  # past the grace, while they wait for the slot
                assert status(client, long)["status"] == "running", "the long job ended early"
                assert reaper.recover_lost_messages("long", reaper.queues["long"], time.time()) == 0
                time.sleep(0.2)  # a reaper pass every 0.2 s, as a busy scheduler would
            assert sent == []
            cancel(client, long)
            for job in held:
                assert wait_status(client, job, "succeeded")["attempts"] == 1
    finally:
        st.stop()
