"""GET /metrics: Prometheus text format, behind a key: the API port is public, and queue depths,
model names and worker counts are nobody else's business.

LMQUEUE_METRICS_KEY set: Prometheus sends it as a bearer token (`authorization.credentials` in
a scrape config). Unset, with API keys on: an admin API key. With auth off (a loopback-only
local run) it is open, like the rest of the API."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from api.auth import _bearer, admin_only, principal_of
from api.errors import APIError
from lmqueue.contract import queue_name
from lmqueue.db import session_scope
from lmqueue.jobs import open_job_counts
from lmqueue.metrics import QueueCollector, register_once
from lmqueue.registry import get_registry
from lmqueue.settings import get_settings

router = APIRouter(tags=["operations"])


def _store_counts() -> dict[tuple[str, str], int]:
    with session_scope() as session:
        return open_job_counts(session)


def install_queue_collector() -> None:
    register_once(
        "queues",
        QueueCollector(
            models=lambda: get_registry().keys(),
            redis_url=lambda: get_settings().redis_url,
            queue_of=queue_name,
            store_counts=_store_counts,
        ),
    )


def _allowed(credentials: HTTPAuthorizationCredentials | None) -> None:
    settings = get_settings()
    given = credentials.credentials.strip() if credentials else ""
    if settings.metrics_key:
        if hmac.compare_digest(given.encode(), settings.metrics_key.encode()):
            return
        if not settings.auth_enabled:  # the key is the only way in; no API keys to fall back on
            raise APIError(
                401,
                "/metrics needs 'Authorization: Bearer <LMQUEUE_METRICS_KEY>'",
                code="invalid_api_key",
                type_="invalid_request_error",
                headers={"WWW-Authenticate": "Bearer"},
            )
    admin_only(principal_of(credentials))


@router.get("/metrics", include_in_schema=False)
def metrics(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Response:
    _allowed(credentials)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
