"""Single jobs: submit, poll (with long-poll), list, cancel."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from api.deps import get_owner, get_session
from api.errors import APIError
from api.openapi import errors
from api.pagination import list_page
from api.submit import submit, validated
from lmqueue import jobs as q
from lmqueue import transitions
from lmqueue.db import session_scope
from lmqueue.metrics import JOBS_FINISHED
from lmqueue.settings import get_settings
from lmqueue.tables import Job, JobStatus

router = APIRouter(tags=["jobs"], responses=errors(400, 401, 404, 413))


class SubmitJob(BaseModel):
    # strict: the documented types only ("5" is not a priority, 0 is not a bool)
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True)

    model: str | None = Field(default=None, max_length=200)
    endpoint: Literal["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses"]
    body: dict[str, Any]
    priority: int | None = Field(default=None, ge=0, le=9, description="0-9, 9 runs first")
    timeout: float | None = Field(default=None, gt=0, le=7 * 24 * 3600, description="seconds")
    stream: bool = Field(
        default=False, description="publish per-step deltas to GET /v1/jobs/{id}/events"
    )
    cache: bool = Field(
        default=True, description="false: never answer from (or fill) the result cache"
    )


def _not_found(job_id: str) -> APIError:
    return APIError(404, f"no job {job_id!r}", code="not_found", param="job_id")


@router.post("/v1/jobs", status_code=202, responses=errors(409, 429))
def submit_job(
    req: SubmitJob,
    owner: Annotated[str, Depends(get_owner)],
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    # The session is opened here, not by Depends(get_session): a sync generator dependency
    # costs two more thread-pool hops (enter, exit) on the API's busiest path.
    model, body = validated(req.endpoint, req.body, req.model, req.stream)
    with session_scope() as session:
        job, created, notice = submit(
            session,
            owner,
            model,
            req.endpoint,
            body,
            priority=req.priority,
            timeout_s=req.timeout,
            idempotency_key=idempotency_key,
            use_cache=req.cache,
        )
        out = q.job_to_dict(job)
    if notice:
        out["notice"] = notice
    return JSONResponse(out, status_code=202 if created else 200)


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
