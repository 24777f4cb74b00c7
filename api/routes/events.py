"""GET /v1/jobs/{id}/events and GET /v1/batches/{id}/events: server-sent events."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse

from api.deltas import load_job
from api.deps import get_owner
from api.errors import APIError
from api.events import BatchCursor, JobCursor, batch_events, job_events
from api.openapi import errors
from lmqueue.batches.views import get_batch
from lmqueue.db import session_scope

router = APIRouter(tags=["events"], responses=errors(400, 401, 404))

_SSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}
}


@router.get("/v1/jobs/{job_id}/events", response_class=EventSourceResponse, responses=_SSE)
async def job_event_stream(
    job_id: str,
    owner: Annotated[str, Depends(get_owner)],
    last_event_id: Annotated[str | None, Header(max_length=200)] = None,
) -> EventSourceResponse:
    """queued, running, delta (jobs submitted with `stream: true`), then done or error."""
    job = await load_job(owner, job_id)
    if job is None:
        raise APIError(404, f"no job {job_id!r}", code="not_found", param="job_id")
    cursor = JobCursor.parse(last_event_id)
    return EventSourceResponse(job_events(owner, job, cursor), ping=15)


def _batch_exists(owner: str, batch_id: str) -> bool:
    with session_scope() as session:
        return get_batch(session, owner, batch_id) is not None


@router.get("/v1/batches/{batch_id}/events", response_class=EventSourceResponse, responses=_SSE)
async def batch_event_stream(
    batch_id: str,
    owner: Annotated[str, Depends(get_owner)],
    last_event_id: Annotated[str | None, Header(max_length=200)] = None,
) -> EventSourceResponse:
    """progress (request_counts) and line (custom_id, status) in completion order, then done."""
    if not await run_in_threadpool(_batch_exists, owner, batch_id):
        raise APIError(404, f"no batch {batch_id!r}", code="not_found", param="batch_id")
    cursor = BatchCursor.parse(last_event_id)
    return EventSourceResponse(batch_events(owner, batch_id, cursor), ping=15)
