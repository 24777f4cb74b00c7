"""Webhook outbox and delivery rules, in process against a migrated SQLite store (the end to
end path, with a real receiver and scheduler, is tests/test_webhooks.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from lmqueue.db import dispose_engines, session_scope
from lmqueue.migrate import upgrade_head
from lmqueue.settings import Settings, get_settings, reset_settings
from lmqueue.tables import Job, JobStatus, WebhookAttempt, WebhookDelivery, now
from lmqueue.webhooks.deliver import backoff_s
from lmqueue.webhooks.endpoints import create_endpoint, delete_endpoint
from lmqueue.webhooks.events import collect_events
from scheduler.webhooks import Dispatcher

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Settings]:
    url = f"sqlite:///{tmp_path / 'hooks.db'}"
    upgrade_head(url)
    monkeypatch.setenv("LMQUEUE_DATABASE_URL", url)
    monkeypatch.setenv("LMQUEUE_WEBHOOK_TIMEOUT_S", "2")
    reset_settings()
    yield get_settings()
    dispose_engines()
    reset_settings()


def _job(job_id: str, owner: str, finished_at: float, batch_id: str | None = None) -> Job:
    return Job(
        id=job_id,
        owner=owner,
        model="m",
        endpoint="/v1/completions",
        body={},
        status=JobStatus.SUCCEEDED,
        result={"ok": True},
        finished_at=finished_at,
        batch_id=batch_id,
    )


def test_backoff_doubles_and_is_capped() -> None:
    s = Settings(webhook_backoff_s=5, webhook_backoff_max_s=60)
    assert [backoff_s(n, s) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


def test_outbox_records_each_event_once(store: Settings) -> None:
    with session_scope() as session:
        ep = create_endpoint(session, "alice", "http://127.0.0.1:9/x", ["job.succeeded"], "")
        t0 = ep.created_at
        session.add_all(
            [
                _job("job_old", "alice", t0 - 1),  # before the endpoint existed
                _job("job_a", "alice", t0 + 0.001),
                _job("job_line", "alice", t0 + 0.001, batch_id="batch_x"),  # a batch line
                _job("job_bob", "bob", t0 + 0.001),  # another key's job
            ]
        )
    for _ in range(2):  # scans overlap; the second adds nothing
        with session_scope() as session:
            collect_events(session, now())
    with session_scope() as session:
        rows = session.scalars(select(WebhookDelivery)).all()
        assert [(d.event_type, d.object_id) for d in rows] == [("job.succeeded", "job_a")]
        body = json.loads(rows[0].payload)
        assert body["id"] == rows[0].id and body["data"]["id"] == "job_a"


def _pending(session: object, endpoint_id: str, msg_id: str) -> None:
    session.add(  # type: ignore[attr-defined]
        WebhookDelivery(
            id=msg_id,
            endpoint_id=endpoint_id,
            owner="alice",
            event_type="job.succeeded",
            object_id="job_" + msg_id,
            payload="{}",
            status="pending",
            attempts=0,
            next_attempt_at=now(),
            created_at=now(),
        )
    )


def _attempts(msg_id: str) -> list[WebhookAttempt]:
    with session_scope() as session:
        stmt = select(WebhookAttempt).where(WebhookAttempt.delivery_id == msg_id)
        return list(session.scalars(stmt))


def test_refused_targets_unreachable_receivers_and_the_retry_window(
    store: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    with session_scope() as session:
        private = create_endpoint(session, "alice", "http://127.0.0.1:9/x", ["job.succeeded"], "")
        gone = create_endpoint(session, "alice", "http://127.0.0.1:9/y", ["job.succeeded"], "")
        _pending(session, private.id, "msg_private")
        _pending(session, gone.id, "msg_gone")
        delete_endpoint(session, gone)
    dispatcher = Dispatcher(store)
    try:
        assert dispatcher.pass_once() == 1  # the deleted endpoint's delivery is not sent
        (refused,) = _attempts("msg_private")
        assert refused.status_code is None and "BadTarget" in (refused.error or "")
        with session_scope() as session:
            d = session.get(WebhookDelivery, "msg_private")
            assert d is not None and d.status == "pending" and d.attempts == 1
            assert d.next_attempt_at >= now() + store.webhook_backoff_s - 1
            gone_row = session.get(WebhookDelivery, "msg_gone")
            assert gone_row is not None and gone_row.status == "failed"
        # Allowed, but nothing listens on port 9; past the retry window it is given up.
        allowed = Settings(**{**store.model_dump(), "webhook_allow_private_targets": True,
                              "webhook_retry_window_s": 0.001})  # fmt: skip
        with session_scope() as session:
            d = session.get(WebhookDelivery, "msg_private")
            assert d is not None
            d.next_attempt_at = now()
        late = Dispatcher(allowed)
        try:
            assert late.pass_once() == 1
        finally:
            late.close()
        second = _attempts("msg_private")[1]
        assert second.status_code is None and "Connect" in (second.error or "")
        with session_scope() as session:
            d = session.get(WebhookDelivery, "msg_private")
            assert d is not None and d.status == "failed" and d.attempts == 2
    finally:
        dispatcher.close()
