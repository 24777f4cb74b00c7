"""Webhook endpoints of an API key: create, list, read, delete, rotate the signing secret."""

from __future__ import annotations

import base64
import os
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lmqueue.tables import WebhookAttempt, WebhookDelivery, WebhookEndpoint, new_id, now


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def count_endpoints(session: Session, owner: str) -> int:
    stmt = select(func.count()).where(
        WebhookEndpoint.owner == owner, WebhookEndpoint.deleted_at.is_(None)
    )
    return int(session.scalar(stmt) or 0)


def create_endpoint(
    session: Session, owner: str, url: str, events: list[str], description: str
) -> WebhookEndpoint:
    t = now()
    ep = WebhookEndpoint(
        id=new_id("we"),
        owner=owner,
        url=url,
        events=events,
        secret=new_secret(),
        description=description,
        created_at=t,
        scanned_until=t,  # only objects that finish from now on
    )
    session.add(ep)
    session.flush()
    return ep


def get_endpoint(session: Session, owner: str, endpoint_id: str) -> WebhookEndpoint | None:
    stmt = select(WebhookEndpoint).where(
        WebhookEndpoint.id == endpoint_id,
        WebhookEndpoint.owner == owner,
        WebhookEndpoint.deleted_at.is_(None),
    )
    return session.scalars(stmt).first()


def list_endpoints(
    session: Session, owner: str, after: str | None, limit: int
) -> tuple[list[WebhookEndpoint], bool]:
    stmt = select(WebhookEndpoint).where(
        WebhookEndpoint.owner == owner, WebhookEndpoint.deleted_at.is_(None)
    )
    if after:
        stmt = stmt.where(WebhookEndpoint.id < after)
    rows = list(session.scalars(stmt.order_by(WebhookEndpoint.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete_endpoint(session: Session, ep: WebhookEndpoint) -> None:
    """Soft delete: its deliveries and attempts stay readable in the store; pending ones stop."""
    ep.deleted_at = now()


# As Standard Webhooks' reference service: the old secret keeps signing for a day by default,
# so a receiver can be switched over without dropping deliveries; at most a week.
ROTATION_GRACE_S = 24 * 3600.0
ROTATION_GRACE_MAX_S = 7 * 24 * 3600.0


def rotate_secret(ep: WebhookEndpoint, grace_s: float = ROTATION_GRACE_S) -> None:
    """A new secret signs every attempt from now on, retries of older events included; for
    `grace_s` the old one signs them too (0: it stops at once). A second rotation within the
    grace drops the first secret: only the one just replaced is kept."""
    ep.previous_secret = ep.secret if grace_s > 0 else None
    ep.previous_secret_expires_at = now() + grace_s if grace_s > 0 else None
    ep.secret = new_secret()


def signing_secrets(ep: WebhookEndpoint, t: float) -> list[str]:
    """The secrets that sign an attempt made at `t`: the current one, and the previous one
    while its grace lasts."""
    expires = ep.previous_secret_expires_at
    if ep.previous_secret and expires is not None and t < expires:
        return [ep.secret, ep.previous_secret]
    return [ep.secret]


def endpoint_to_dict(ep: WebhookEndpoint, with_secret: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": ep.id,
        "object": "webhook_endpoint",
        "url": ep.url,
        "events": list(ep.events),
        "description": ep.description,
        "created_at": int(ep.created_at),
    }
    if with_secret:  # shown once, when created or rotated
        out["secret"] = ep.secret
    if len(signing_secrets(ep, now())) > 1:  # the old secret still signs
        out["previous_secret_expires_at"] = int(ep.previous_secret_expires_at or 0)
    return out


def list_deliveries(
    session: Session, endpoint_id: str, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """Newest first, each with every attempt (what the receiver answered, when)."""
    stmt = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    if after:
        stmt = stmt.where(WebhookDelivery.id < after)
    rows = list(session.scalars(stmt.order_by(WebhookDelivery.id.desc()).limit(limit + 1)))
    page = rows[:limit]
    attempts: dict[str, list[dict[str, Any]]] = {d.id: [] for d in page}
    if page:
        q = select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(list(attempts)))
        for a in session.scalars(q.order_by(WebhookAttempt.id)):
            attempts[a.delivery_id].append(
                {
                    "at": a.at,
                    "status_code": a.status_code,
                    "error": a.error,
                    "duration_ms": round(a.duration_ms, 1),
                }
            )
    data = [
        {
            "id": d.id,
            "object": "webhook_delivery",
            "event_type": d.event_type,
            "object_id": d.object_id,
            "status": d.status,
            "attempts": attempts[d.id],
            "next_attempt_at": d.next_attempt_at if d.status == "pending" else None,
            "created_at": d.created_at,
            "delivered_at": d.delivered_at,
        }
        for d in page
    ]
    return data, len(rows) > limit
