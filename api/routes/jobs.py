"""Single jobs: submit, poll (with long-poll), list, cancel."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from api.admission import admit, admitted
from api.deps import get_owner, get_session
from api.errors import APIError
from api.openapi import errors
from api.pagination import list_page
from lmqueue import jobs as q
from lmqueue import transitions
from lmqueue.broker import try_enqueue
from lmqueue.db import session_scope
from lmqueue.metrics import JOBS_FINISHED, JOBS_SUBMITTED
from lmqueue.settings import get_settings
from lmqueue.tables import Job, JobStatus
from lmqueue.validation import InvalidRequest, check_request

router = APIRouter(tags=["jobs"], responses=errors(400, 401, 404, 413))


class SubmitJob(BaseModel):
    # strict: the documented types only ("5" is not a priority, 0 is not a bool)
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True)

    model: str | None = Field(default=None, max_length=200)
    endpoint: Literal["/v1/completions", "/v1/chat/completions", "/v1/embeddings"]
    body: dict[str, Any]
    priority: int | None = Field(default=None, ge=0, le=9, description="0-9, 9 runs first")
    timeout: float | None = Field(default=None, gt=0, le=7 * 24 * 3600, description="seconds")


def _not_found(job_id: str) -> APIError:
    return APIError(404, f"no job {job_id!r}", code="not_found", param="job_id")


@router.post("/v1/jobs", status_code=202, responses=errors(409, 429))
def submit_job(
    req: SubmitJob,
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    try:
        model, body = check_request(req.endpoint, req.body, req.model)
    except InvalidRequest as exc:
        raise APIError(400, exc.message, param=exc.param, code=exc.code) from exc
    settings = get_settings()
    if req.timeout is not None and req.timeout > settings.max_job_timeout_s:
        raise APIError(
            400,
            f"timeout: at most {settings.max_job_timeout_s:g} seconds on this server",
            param="timeout",
        )
    admit(session, owner, model, 1, idempotency_key)
    priority = settings.default_priority if req.priority is None else req.priority
    try:
        job, created = q.create_job(
            session,
            owner=owner,
            model=model,
            endpoint=req.endpoint,
            body=body,
            priority=priority,
            idempotency_key=idempotency_key,
            timeout_s=req.timeout,
        )
    except q.IdempotencyConflict as exc:
        raise APIError(409, str(exc), code="idempotency_conflict", param="Idempotency-Key") from exc
    if not created:
        return JSONResponse(q.job_to_dict(job), status_code=200)
    session.commit()  # the store holds the job before any worker can see its message
    admitted(owner, model)
    JOBS_SUBMITTED.labels(model, "job").inc()
    out = q.job_to_dict(job)
    # From here on the job is accepted, whatever fails: a 5xx would make a client that retries
    # on 5xx (the openai SDK does) submit it twice.
    task_id = try_enqueue(model, [job.id], priority)
    if task_id is None:
        out["notice"] = DEFERRED_NOTICE
    else:
        out["task_id"] = task_id
        _mark_sent(session, job.id, task_id)
    return JSONResponse(out, status_code=202)


DEFERRED_NOTICE = (
    "accepted and stored, but the queue (Redis) is unreachable right now: the job will be sent "
    "to a worker by the recovery sweep once the queue is back; do not submit it again"
)


def _mark_sent(session: Session, job_id: str, task_id: str) -> None:
    """Stamp the send. Best effort: if the store fails now, recovery may send it once more
    (harmless: a job runs once however many messages name it)."""
    try:
        transitions.mark_enqueued(session, [job_id], task_id)
        session.commit()
    except SQLAlchemyError:
        session.rollback()


def _load(owner: str, job_id: str) -> Job | None:
    with session_scope() as session:
        return q.get_job(session, owner, job_id)


@router.get("/v1/jobs/{job_id}")
async def get_job(
    job_id: str,
    owner: Annotated[str, Depends(get_owner)],
    wait: Annotated[float, Query(ge=0, le=3600, description="long-poll seconds")] = 0,
) -> dict[str, Any]:
    deadline = time.monotonic() + min(wait, get_settings().long_poll_max_s)
    delay = 0.05
    while True:
        job = await run_in_threadpool(_load, owner, job_id)
        if job is None:
            raise _not_found(job_id)
        if job.status in JobStatus.TERMINAL or time.monotonic() >= deadline:
            return q.job_to_dict(job)
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 0.5)


@router.get("/v1/jobs")
def list_jobs(
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
    status: Annotated[
        str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")
    ] = None,
    after: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    rows, has_more = q.list_jobs(session, owner, status=status, after=after, limit=limit)
    data = [q.job_to_dict(j) for j in rows]
    return list_page(data, has_more)


@router.post("/v1/jobs/{job_id}/cancel", responses=errors(409))
def cancel_job(
    job_id: str,
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
) -> dict[str, Any]:
    job = q.get_job(session, owner, job_id)
    if job is None:
        raise _not_found(job_id)
    if transitions.cancel_job(session, job):
        JOBS_FINISHED.labels(job.model, JobStatus.CANCELLED).inc()
    elif job.status != JobStatus.CANCELLED:
        raise APIError(
            409,
            f"job {job_id} is {job.status}; only a queued or running job can be cancelled",
            code="not_cancellable",
        )
    return q.job_to_dict(job)
