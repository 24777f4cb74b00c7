"""GET /v1/scheduler: recent scaling decisions and the workers seen lately (read-only).

Reads the store only (the `scaling_events` and `workers` tables); no scheduler import.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from api.auth import require_admin
from api.deps import get_session
from api.openapi import errors
from lmqueue.fleet import (
    event_to_dict,
    recent_scaling_events,
    recent_workers,
    worker_to_dict,
)
from lmqueue.settings import get_settings
from lmqueue.tables import now

# Admin only: worker hostnames and queue sizes are operational detail, not a tenant's business.
router = APIRouter(
    tags=["scheduler"], dependencies=[Depends(require_admin)], responses=errors(401, 403, 400)
)


@router.get("/v1/scheduler")
def scheduler_status(
    session: Annotated[Session, Depends(get_session, scope="function")],
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
