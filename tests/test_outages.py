"""Honest answers during outages, with the services really stopped: Redis down means a committed
job is accepted (202 and a notice) and sent later by recovery; the store down means 503 with
Retry-After and nothing created. Each test counts the jobs that finally run: exactly one per
accepted request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from cli.procs import wait_until
from cli.stack import Stack
from lmqueue.tables import Batch, FileObject, Job
from tests.conftest import MODEL_CACHE
from tests.faults import RedisServer, TcpProxy
from tests.postgres import fresh_postgres_database

pytestmark = pytest.mark.slow

FAST_RECOVERY = {
    "LMQUEUE_RECOVERY_GRACE_S": "2",
    "LMQUEUE_RECOVERY_SCAN_INTERVAL_S": "1",
    "LMQUEUE_SCHEDULER_BACKEND": "none",
}
BODY = {"prompt": "hello", "max_tokens": 2, "temperature": 0}


def _submit(client: httpx.Client, i: int, max_tokens: int = 2) -> httpx.Response:
    body = {**BODY, "prompt": f"p{i}", "max_tokens": max_tokens}
    return client.post(
        "/v1/jobs", json={"model": "tiny", "endpoint": "/v1/completions", "body": body}
    )


def _count(stack: Stack, model: type) -> int:
    with Session(stack.engine) as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.stop()


def test_redis_down_submits_are_accepted_and_run_once(
    own_redis: RedisServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    st = Stack(
        f"sqlite:///{tmp_path / 'lmqueue.db'}",
        own_redis.url,
        {"tiny": tiny_model_dir},
        tmp_path,
        extra_env=FAST_RECOVERY,
    )
    st.migrate()
    try:
        st.start_api()
        st.start_worker("tiny")
        st.start_scheduler()
        with st.client() as client:
            # Long enough to be in flight (received, not acked) when Redis goes: celery 5.7.0's
            # worker died of exactly that ("Unrecoverable error" while closing the lost
            # connection), and nothing ran again.
            before = [_submit(client, i, max_tokens=200) for i in range(2)]
            assert all(r.status_code == 202 and r.json()["task_id"] for r in before)

            own_redis.stop()
            during = [_submit(client, 10 + i) for i in range(5)]
            for r in during:
                assert r.status_code == 202, r.text
                assert "unreachable" in r.json()["notice"]
                assert r.json()["task_id"] is None  # the stamped message was never sent
            own_redis.start()  # an empty Redis: the deferred messages were never sent

            ids = [r.json()["id"] for r in before + during]
            jobs = st.wait_jobs_done(ids, timeout_s=180)
        assert [j.status for j in jobs] == ["succeeded"] * len(ids), st.worker_logs()
        assert all(w.alive() for w in st.workers), st.worker_logs()  # it rode out the outage
        assert _count(st, Job) == len(ids)  # one job per accepted request, none twice
        assert all(j.task_id for j in jobs)  # recovery's message is recorded on the job
    finally:
        st.stop()


@pytest.mark.postgres
def test_store_down_is_503_with_retry_after_and_creates_nothing(
    redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    with fresh_postgres_database() as direct_url:
        url = make_url(direct_url)
        proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
        proxy.start()
        proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
        st = Stack(proxied, redis_url, {"tiny": tiny_model_dir}, tmp_path)
        st.migrate()
        try:
            st.start_api()
            st.start_worker("tiny")
            with st.client() as client:
                ok = _submit(client, 0)
                assert ok.status_code == 202, ok.text

                proxy.stop()
                refused = [_submit(client, 1 + i) for i in range(3)]
                upload = client.post(
                    "/v1/files",
                    data={"purpose": "batch"},
                    files={"file": ("in.jsonl", b'{"custom_id": "a"}\n')},
                )
                batch = client.post(
                    "/v1/batches",
                    json={"input_file_id": "file_x", "endpoint": "/v1/completions"},
                )
                for r in [*refused, upload, batch]:
                    assert r.status_code == 503, r.text
                    assert int(r.headers["Retry-After"]) > 0
                    assert r.json()["error"]["code"] == "store_unavailable"
                proxy.start()

                after = _submit(client, 9)
                assert after.status_code == 202, after.text
                ids = [ok.json()["id"], after.json()["id"]]
                jobs = st.wait_jobs_done(ids, timeout_s=180)
            assert [j.status for j in jobs] == ["succeeded"] * 2, st.worker_logs()
            assert _count(st, Job) == 2  # nothing of the refused requests was created
            assert _count(st, FileObject) == 0 and _count(st, Batch) == 0
            assert not list((tmp_path / "data" / "files").glob(".upload-*"))
        finally:
            st.stop()
            proxy.stop()


@pytest.mark.postgres
def test_store_cut_under_a_running_worker_fails_no_running_row(
    redis_url: str, tmp_path: Path
) -> None:
    """Postgres cut while two rows decode and a deadline falls due: the worker cannot expire the
    late row, so admission pauses and the other row keeps decoding. Before, the failed UPDATE
    failed the step "as a whole": every running row ended `engine_error`."""
    from worker.demo_model import build_demo_model

    long_dir = build_demo_model(MODEL_CACHE / "tiny-long", size="tiny-long")
    with fresh_postgres_database() as direct_url:
        url = make_url(direct_url)
        proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
        proxy.start()
        proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
        env = {"LMQUEUE_MAX_BATCH_SIZE": "2", "LMQUEUE_CANCEL_POLL_S": "0.1"}
        st = Stack(proxied, redis_url, {"long": long_dir}, tmp_path, extra_env=env)
        st.migrate()
        try:
            st.start_api()
            worker = st.start_worker("long")
            with st.client() as client:
                # Still decoding when its deadline falls due during the cut: 4,000 tokens took
                # 2.4 s on a quiet fast host (within a 3 s deadline, so the row could end
                # `succeeded`, seen once in CI); after a 3,000-token prompt they take 3.3 s.
                late = _submit_long(client, 4000, timeout=2, prompt="def main():\n" * 600)
                going = _submit_long(client, 4000)
                waiting = _submit_long(client, 4)
                wait_until(lambda: _statuses(st, [late, going]) == ["running"] * 2, 60, "2 rows")
                proxy.stop()
                wait_until(
                    lambda: "admission paused" in worker.log_path.read_text(errors="replace"),
                    60,
                    "the worker to notice the store is gone when the deadline falls due",
                )
                proxy.start()
                st.engine.dispose()  # this test's own pooled connections went with the cut
                jobs = {j.id: j for j in st.wait_jobs_done([late, going, waiting], 180)}
        finally:
            st.stop()
            proxy.stop()
    assert jobs[late].status == "failed" and jobs[late].error["code"] == "timeout"
    logs = worker.tail(200)
    assert jobs[going].status == "succeeded", (jobs[going].error, logs)
    assert jobs[going].attempts == 1 and jobs[waiting].status == "succeeded", logs


def _submit_long(
    client: httpx.Client, max_tokens: int, timeout: int | None = None, prompt: str = "def main():"
) -> str:
    body = {"prompt": prompt, "temperature": 0, "max_tokens": max_tokens}
    job = {"model": "long", "endpoint": "/v1/completions", "body": body}
    r = client.post("/v1/jobs", json={**job, **({"timeout": timeout} if timeout else {})})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _statuses(stack: Stack, ids: list[str]) -> list[str]:
    return [str(j.status) for j in stack.jobs(ids)]
