"""GET /metrics: Prometheus text format (unauthenticated, like every Prometheus target; keep
the port on the internal network)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

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


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
