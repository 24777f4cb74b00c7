"""Turn finished jobs and batches into deliveries (an outbox read from the store).

Each endpoint remembers how far it was scanned (`scanned_until`). A pass reads the objects of
its owner that finished since then, minus an overlap (a writer stamps `finished_at` before it
commits, so a row can appear a little after its time), and inserts one delivery per (endpoint,
event, object): the unique constraint makes overlaps and concurrent scanners harmless. No
producer of job or batch transitions has to know about webhooks.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lmqueue.batches.views import batch_to_dict
from lmqueue.jobs import job_to_dict
from lmqueue.tables import (
    Batch,
    Job,
    JobStatus,
    WebhookDelivery,
    WebhookEndpoint,
    new_id,
)

OVERLAP_S = 10.0
_BATCH_STAMPS = {
    "batch.completed": ("completed", Batch.completed_at),
    "batch.failed": ("failed", Batch.failed_at),
    "batch.expired": ("expired", Batch.expired_at),
    "batch.cancelled": ("cancelled", Batch.cancelled_at),
}
_JOB_STATUS = {"job.succeeded": JobStatus.SUCCEEDED, "job.failed": JobStatus.FAILED}

Found = tuple[str, str, float, dict[str, Any]]  # (event type, object id, finished at, object)


def _batch_events(session: Session, ep: WebhookEndpoint, lo: float, hi: float) -> list[Found]:
    out: list[Found] = []
    for event, (status, stamp) in _BATCH_STAMPS.items():
        if event not in ep.events:
            continue
        stmt = select(Batch, stamp).where(
            Batch.owner == ep.owner, Batch.status == status, stamp > lo, stamp <= hi
        )
        rows = session.execute(stmt).all()
        out += [(event, b.id, float(at or hi), batch_to_dict(b)) for b, at in rows]
    return out


def _job_events(session: Session, ep: WebhookEndpoint, lo: float, hi: float) -> list[Found]:
    """Single jobs only: a batch's lines are reported by its batch.* event."""
    statuses = [s for e, s in _JOB_STATUS.items() if e in ep.events]
    if not statuses:
        return []
    event_of = {s: e for e, s in _JOB_STATUS.items()}
    stmt = select(Job).where(
        Job.owner == ep.owner,
        Job.finished_at > lo,
        Job.finished_at <= hi,
        Job.batch_id.is_(None),
        Job.status.in_(statuses),
    )
    return [
        (event_of[j.status], j.id, float(j.finished_at or hi), job_to_dict(j))
        for j in session.scalars(stmt)
    ]


def payload(delivery_id: str, event: str, at: float, data: dict[str, Any]) -> str:
    """The event body (Standard Webhooks' type/timestamp/data, plus OpenAI's id/object)."""
    body = {
        "id": delivery_id,
        "object": "event",
        "type": event,
        "created_at": int(at),
        "timestamp": datetime.fromtimestamp(at, UTC).isoformat(),
        "data": data,
    }
    return json.dumps(body, separators=(",", ":"))


def _record(session: Session, ep: WebhookEndpoint, found: list[Found], t: float) -> int:
    if not found:
        return 0
    have = set(
        session.execute(
            select(WebhookDelivery.event_type, WebhookDelivery.object_id).where(
                WebhookDelivery.endpoint_id == ep.id,
                WebhookDelivery.object_id.in_([f[1] for f in found]),
            )
        ).all()
    )
    added = 0
    for event, object_id, at, data in found:
        if (event, object_id) in have:
            continue
        delivery_id = new_id("msg")
        row = WebhookDelivery(
            id=delivery_id,
            endpoint_id=ep.id,
            owner=ep.owner,
            event_type=event,
            object_id=object_id,
            payload=payload(delivery_id, event, at, data),
            status="pending",
            attempts=0,
            next_attempt_at=t,
            created_at=t,
        )
        try:
            with session.begin_nested():
                session.add(row)
            added += 1
        except IntegrityError:
            continue  # another scanner recorded it first
    return added


def collect_events(session: Session, t: float) -> int:
    """One pass over every live endpoint; returns the number of deliveries added."""
    endpoints = session.scalars(
        select(WebhookEndpoint).where(WebhookEndpoint.deleted_at.is_(None))
    ).all()
    added = 0
    for ep in endpoints:
        lo = max(ep.created_at, ep.scanned_until - OVERLAP_S)
        found = _batch_events(session, ep, lo, t) + _job_events(session, ep, lo, t)
        added += _record(session, ep, found, t)
        ep.scanned_until = t
    return added
