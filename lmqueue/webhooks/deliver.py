"""Send due deliveries: sign (Standard Webhooks), POST, record the attempt, schedule a retry.

Every attempt of one delivery carries the same `webhook-id` (the delivery id), so a receiver
can drop duplicates; the timestamp and signature are fresh each time. Retries back off
exponentially (webhook_backoff_s doubling, capped) and stop webhook_retry_window_s after the
event. A delivery is leased (next_attempt_at pushed past the attempt's timeout) by a
conditional UPDATE before it is sent, so two scheduler processes never send it at once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from lmqueue.db import session_scope
from lmqueue.metrics import WEBHOOK_ATTEMPTS
from lmqueue.settings import Settings
from lmqueue.tables import WebhookAttempt, WebhookDelivery, WebhookEndpoint, now
from lmqueue.webhooks.endpoints import signing_secrets
from lmqueue.webhooks.targets import BadTarget, check_target

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@dataclass
class Leased:
    delivery_id: str
    url: str
    secrets: list[str]  # each signs (the previous one too, during a rotation's grace)
    payload: str
    attempts: int
    created_at: float


def signed_headers(secrets: Sequence[str], msg_id: str, payload: str, at: float) -> dict[str, str]:
    """Standard Webhooks headers; several secrets give space-separated signatures, any one of
    which verifies (how the spec carries a rotation)."""
    stamp = datetime.fromtimestamp(int(at), UTC)
    signatures = [Webhook(secret).sign(msg_id, stamp, payload) for secret in secrets]
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at)),
        "webhook-signature": " ".join(signatures),
        "content-type": "application/json",
        "user-agent": "lmqueue-webhooks",
    }


def lease_due(session: Session, t: float, settings: Settings, limit: int = 64) -> list[Leased]:
    """Pending deliveries due by `t`, each leased for one attempt."""
    rows = session.execute(
        select(WebhookDelivery, WebhookEndpoint)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= t)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    ).all()
    out = []
    for d, ep in rows:
        if ep.deleted_at is not None:
            d.status = FAILED  # its endpoint is gone: nothing to retry
            continue
        won = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == d.id,
                WebhookDelivery.status == PENDING,
                WebhookDelivery.next_attempt_at == d.next_attempt_at,
            )
            .values(next_attempt_at=t + settings.webhook_timeout_s + 30)
            .execution_options(synchronize_session=False)
        )
        if won.rowcount:  # type: ignore[attr-defined]
            secrets = signing_secrets(ep, t)
            out.append(Leased(d.id, ep.url, secrets, d.payload, d.attempts, d.created_at))
    return out


def backoff_s(attempts: int, settings: Settings) -> float:
    """Delay before attempt `attempts + 1`: base, 2x base, 4x base, ... capped."""
    return float(
        min(settings.webhook_backoff_s * 2 ** (attempts - 1), settings.webhook_backoff_max_s)
    )


def send(item: Leased, client: httpx.Client, settings: Settings) -> tuple[int | None, str | None]:
    """One attempt; (status code, error text) with error None on a 2xx answer."""
    try:
        check_target(item.url, settings.webhook_allow_private_targets)
        headers = signed_headers(item.secrets, item.delivery_id, item.payload, now())
        resp = client.post(item.url, content=item.payload.encode(), headers=headers)
    except (BadTarget, httpx.HTTPError) as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500]
    if 200 <= resp.status_code < 300:
        return resp.status_code, None
    return resp.status_code, f"HTTP {resp.status_code}"


def record(item: Leased, code: int | None, error: str | None, took_s: float, s: Settings) -> None:
    t = now()
    attempts = item.attempts + 1
    values: dict[str, object] = {"attempts": attempts}
    if error is None:
        values.update(status=DELIVERED, delivered_at=t)
    else:
        retry_at = t + backoff_s(attempts, s)
        if retry_at > item.created_at + s.webhook_retry_window_s:
            values["status"] = FAILED
        else:
            values["next_attempt_at"] = retry_at
    WEBHOOK_ATTEMPTS.labels("ok" if error is None else "error").inc()
    with session_scope() as session:
        session.add(
            WebhookAttempt(
                delivery_id=item.delivery_id,
                at=t,
                status_code=code,
                error=error,
                duration_ms=took_s * 1000,
            )
        )
        session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id == item.delivery_id).values(**values)
        )


def attempt(item: Leased, client: httpx.Client, settings: Settings) -> bool:
    started = time.monotonic()
    code, error = send(item, client, settings)
    record(item, code, error, time.monotonic() - started, settings)
    return error is None
