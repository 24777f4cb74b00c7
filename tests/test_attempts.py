"""Attempts count computations, not deliveries: jobs a worker holds (prefetched, waiting for a
slot) when it is killed keep attempts 0, so the max_attempts cap never fails them as
worker_crashed; only the job that was really running spends an attempt."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.procs import wait_until
from cli.stack import Stack
from tests.conftest import MODEL_CACHE
from tests.test_continuous_worker import (
    LONG,
    queue_empty,
    status,
    submit,
    wait_status,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def long_model_dir() -> Path:
    from worker.demo_model import build_demo_model

    return build_demo_model(MODEL_CACHE / "tiny-long", size="tiny-long")


def test_prefetched_jobs_spend_no_attempt_when_their_worker_dies(
    redis_url: str,
    long_model_dir: Path,
    tmp_path: Path,
) -> None:
    st = Stack(
        f"sqlite:///{tmp_path / 'lmqueue.db'}",
        redis_url,
        {"long": long_model_dir},
        tmp_path,
        extra_env={
            "LMQUEUE_MAX_BATCH_SIZE": "1",
            "LMQUEUE_MAX_ATTEMPTS": "1",  # one crash of a real start fails a job
            "LMQUEUE_RECOVERY_GRACE_S": "2",
            "LMQUEUE_RECOVERY_SCAN_INTERVAL_S": "1",
            "LMQUEUE_SCHEDULER_BACKEND": "none",
        },
    )
    st.migrate()
    try:
        st.start_api()
        st.start_scheduler()
        with st.client() as client:
            worker = st.start_worker("long")
            blocker = submit(st, client, LONG)
            wait_status(client, blocker, "running")
            held = [submit(st, client, 2) for _ in range(4)]
            wait_until(lambda: queue_empty(st), 30, "the worker to take every message")
            assert [status(client, j)["attempts"] for j in held] == [0] * 4

            worker.kill()  # kill -9 while the jobs wait in it
            crashed = wait_status(client, blocker, "failed", timeout_s=60)
            assert crashed["error"]["code"] == "worker_crashed"  # type: ignore[index]
            assert crashed["attempts"] == 1
            for job in held:  # never started: not failed, still queued for the next worker
                assert status(client, job)["status"] == "queued"

            st.start_worker("long")
            done = [wait_status(client, j, "succeeded", timeout_s=120) for j in held]
        assert [j["attempts"] for j in done] == [1] * 4
    finally:
        st.stop()
