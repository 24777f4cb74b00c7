"""OpenAI's synchronous endpoints, through the queue: POST /v1/completions,
/v1/chat/completions and /v1/embeddings take OpenAI's bodies, submit a job by the same path as
POST /v1/jobs (admission, priorities, autoscaling, recovery), wait for it and answer in OpenAI's
shape; `stream: true` answers OpenAI's chunk stream (`data: {...}` ..., `data: [DONE]`), built
from the job's deltas. A client that goes away cancels its job: nobody would read the answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from api.chunks import base64_embeddings, chunk, final_text, usage_chunk
from api.deltas import load_job
from api.deps import get_owner
from api.errors import APIError
from api.events import JobCursor, job_events
from api.openapi import errors
from api.submit import submit, validated
from lmqueue import jobs as q
from lmqueue import transitions
from lmqueue.cache import shown_result
from lmqueue.db import session_scope
from lmqueue.metrics import JOBS_FINISHED
from lmqueue.schemas import CHAT, COMPLETIONS, EMBEDDINGS
from lmqueue.tables import Job, JobStatus

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"], responses=errors(400, 401, 409, 413, 429))

_BODY = {"requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}}}


@router.post("/v1/completions", openapi_extra=_BODY)
async def completions(request: Request, owner: Annotated[str, Depends(get_owner)]) -> Response:
    return await _serve(request, owner, COMPLETIONS)


@router.post("/v1/chat/completions", openapi_extra=_BODY)
async def chat_completions(request: Request, owner: Annotated[str, Depends(get_owner)]) -> Response:
    return await _serve(request, owner, CHAT)


@router.post("/v1/embeddings", openapi_extra=_BODY)
async def embeddings(request: Request, owner: Annotated[str, Depends(get_owner)]) -> Response:
    return await _serve(request, owner, EMBEDDINGS)


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        raise APIError(400, f"body: not valid JSON ({exc})", param="body") from exc
    if not isinstance(body, dict):
        raise APIError(400, "body must be a JSON object", param="body")
    return body


async def _serve(request: Request, owner: str, endpoint: str) -> Response:
    body = await _json_body(request)
    stream = body.pop("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream: must be a boolean", param="stream")
    if endpoint == EMBEDDINGS:
        stream = False  # OpenAI's embeddings never stream; the field means nothing there
    options = body.pop("stream_options", None) or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    # The openai SDK asks for base64 vectors by default: the job stores floats, the answer is
    # encoded here.
    base64 = endpoint == EMBEDDINGS and body.get("encoding_format") == "base64"
    if base64:
        body.pop("encoding_format")
    model, full = validated(endpoint, body, None, stream)
    job = await run_in_threadpool(_submit, owner, model, endpoint, full)
    if stream:
        return EventSourceResponse(_chunks(request, owner, job, include_usage), ping=15)
    finished = await _wait(request, owner, job)
    if finished is None:
        return Response(status_code=499)  # nobody is listening any more
    if base64 and finished.status == JobStatus.SUCCEEDED and finished.result is not None:
        return JSONResponse(base64_embeddings(finished.result))
    return _answer(finished)


def _submit(owner: str, model: str, endpoint: str, body: dict[str, Any]) -> Job:
    with session_scope() as session:
        job, _, _ = submit(session, owner, model, endpoint, body)
        return job


def _cancel(owner: str, job_id: str) -> None:
    with session_scope() as session:
        job = q.get_job(session, owner, job_id)
        if job is not None and transitions.cancel_job(session, job):
            JOBS_FINISHED.labels(job.model, JobStatus.CANCELLED).inc()
            log.info("job %s cancelled: its synchronous client went away", job_id)


async def _cancel_shielded(owner: str, job_id: str) -> None:
    with anyio.CancelScope(shield=True):  # runs while the request's task is being cancelled
        await run_in_threadpool(_cancel, owner, job_id)


def _answer(job: Job) -> JSONResponse:
    if job.status == JobStatus.SUCCEEDED and job.result is not None:
        return JSONResponse(shown_result(job.result, job.cache_hit))
    err = dict(job.error or {})
    status = int(err.pop("status_code", 0) or (409 if job.status == JobStatus.CANCELLED else 500))
    return JSONResponse({"error": err}, status_code=status)


async def _wait(request: Request, owner: str, job: Job) -> Job | None:
    """The finished job, or None when the client hung up (its job is then cancelled)."""
    delay = 0.02
    while job.status not in JobStatus.TERMINAL:
        if await request.is_disconnected():
            await _cancel_shielded(owner, job.id)
            return None
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.2)
        job = await load_job(owner, job.id) or job
    return job


def _data(body: Any) -> dict[str, str]:
    return {"data": json.dumps(body, separators=(",", ":"))}


async def _chunks(
    request: Request, owner: str, job: Job, include_usage: bool
) -> AsyncIterator[dict[str, str]]:
    created, endpoint, finished = int(time.time()), job.endpoint, False
    sent, first = "", True
    try:
        async for ev in job_events(owner, job, JobCursor(stage=1)):
            data = json.loads(ev["data"])
            if ev["event"] == "delta":
                if data.get("start"):
                    sent = ""  # a retried attempt: what the client has is a prefix of it again
                if data["text"] or first:
                    yield _data(
                        chunk(endpoint, job.id, job.model, created, data["text"], None, first)
                    )
                    sent, first = sent + data["text"], False
            elif ev["event"] == "done":
                finished = True
                for body in _last_chunks(data, endpoint, created, sent, first, include_usage):
                    yield _data(body)
                yield {"data": "[DONE]"}
            elif ev["event"] == "error":
                finished = True
                err = {k: v for k, v in (data["error"] or {}).items() if k != "status_code"}
                yield _data({"error": err})
    finally:
        if not finished:
            await _cancel_shielded(owner, job.id)


def _last_chunks(
    job: dict[str, Any], endpoint: str, created: int, sent: str, first: bool, usage: bool
) -> list[dict[str, Any]]:
    """The text the deltas did not carry (none, normally), the finish reason, the usage."""
    result = job["response"] or {}
    text, reason = final_text(result, endpoint)
    rest = text[len(sent) :] if text.startswith(sent) else ""
    out = [chunk(endpoint, job["id"], job["model"], created, rest, reason, first)]
    if usage:
        out.append(usage_chunk(endpoint, job["id"], job["model"], created, result.get("usage")))
    return out
