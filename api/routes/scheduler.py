"""GET /v1/scheduler: recent scaling decisions and the workers seen lately (read-only).

Reads the store only (the `scaling_events` and `workers` tables); no scheduler import.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from api.deps import get_session
from lmqueue.models import now
from lmqueue.scheduling import (
    event_to_dict,
    recent_scaling_events,
    recent_workers,
    worker_to_dict,
)
from lmqueue.settings import get_settings

router = APIRouter(tags=["scheduler"])


@router.get("/v1/scheduler")
def scheduler_status(
    session: Annotated[Session, Depends(get_session)],
    limit: Annotated[int, Query(ge=1, le=500, description="how many recent decisions")] = 50,
    queue: Annotated[str | None, Query(max_length=200)] = None,
    workers_since_s: Annotated[float, Query(ge=0, le=7 * 24 * 3600)] = 3600,
) -> dict[str, Any]:
    settings = get_settings()
    events = recent_scaling_events(session, limit, queue)
    workers = recent_workers(session, now() - workers_since_s)
    return {
        "object": "scheduler",
        "events": [event_to_dict(e) for e in events],
        "workers": [worker_to_dict(w, settings) for w in workers],
    }
