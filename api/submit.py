"""One path into the queue for every single job: /v1/jobs and OpenAI's synchronous endpoints
alike go through validation, admission, the store and the broker here, so a synchronous request
gets the same priorities, quotas, autoscaling and recovery as any queued job."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from api.admission import admit, admitted
from api.errors import APIError
from lmqueue import cache, semantic, transitions
from lmqueue import jobs as q
from lmqueue.broker import BROKER_ERRORS, enqueue_jobs, send_semantic_lookup
from lmqueue.metrics import JOBS_FINISHED, JOBS_SUBMITTED
from lmqueue.registry import get_model
from lmqueue.schemas import EMBEDDINGS
from lmqueue.settings import get_settings
from lmqueue.tables import Job
from lmqueue.validation import InvalidRequest, check_request


def validated(
    endpoint: str, body: Any, model: str | None, stream: bool
) -> tuple[str, dict[str, Any]]:
    """(model, body) ready to store; `stream` asks the worker for per-step deltas."""
    if stream and isinstance(body, dict):
        if endpoint == EMBEDDINGS:
            raise APIError(400, "stream: embeddings do not stream", param="stream")
        body = {**body, "stream": True}
    try:
        return check_request(endpoint, body, model, allow_stream=True)
    except InvalidRequest as exc:
        raise APIError(400, exc.message, param=exc.param, code=exc.code) from exc


def submit(
    session: Session,
    owner: str,
    model: str,
    endpoint: str,
    body: dict[str, Any],
    *,
    priority: int | None = None,
    timeout_s: float | None = None,
    idempotency_key: str | None = None,
    use_cache: bool = True,
) -> tuple[Job, bool, str | None]:
    """Admit, store, commit, enqueue. Returns (job, created, notice); an idempotent replay is
    not created again. Once committed the job is accepted whatever fails next: with Redis
    unreachable it is sent by the recovery sweep later and `notice` says so (a 5xx would make a
    client that retries on 5xx, as the openai SDK does, submit it twice). A deterministic
    request found in the key's result cache is answered at once (no worker, no message); one
    of a model with a semantic cache goes first to the embedding model's worker, which looks
    for a near neighbour and then sends it on."""
    settings = get_settings()
    if timeout_s is not None and timeout_s > settings.max_job_timeout_s:
        raise APIError(
            400,
            f"timeout: at most {settings.max_job_timeout_s:g} seconds on this server",
            param="timeout",
        )
    admit(session, owner, model, 1, idempotency_key)
    priority = settings.default_priority if priority is None else priority
    key = cache.cache_key(owner, model, endpoint, body, settings) if use_cache else None
    source = cache.lookup(session, owner, key, settings) if key else None
    if key:
        cache.count(model, "exact", source is not None)
    # The message's id is chosen now and stamped with the insert: one commit per submission
    # (the send comes after it, so the store holds the job before any worker can see it).
    task_id = None if source is not None else str(uuid.uuid4())
    try:
        job, created = q.create_job(
            session,
            owner=owner,
            model=model,
            endpoint=endpoint,
            body=body,
            priority=priority,
            idempotency_key=idempotency_key,
            timeout_s=timeout_s,
            cache_key=None if source is not None else key,
            task_id=task_id,
        )
    except q.IdempotencyConflict as exc:
        raise APIError(409, str(exc), code="idempotency_conflict", param="Idempotency-Key") from exc
    if not created:
        return job, created, None
    if source is not None:
        transitions.answer_from_cache(session, job, source, {"kind": "exact"})
    session.commit()
    admitted(owner, model)
    JOBS_SUBMITTED.labels(model, "job").inc()
    if source is not None:
        JOBS_FINISHED.labels(model, job.status).inc()
        return job, created, None
    spec = get_model(model)
    try:
        if key and semantic.enabled(spec, endpoint):
            send_semantic_lookup(spec.semantic_cache, [job.id], priority, task_id)
        else:
            enqueue_jobs(model, [job.id], priority, task_id=task_id)
    except BROKER_ERRORS:
        _unmark_sent(session, job)
        return job, created, DEFERRED_NOTICE
    return job, created, None


DEFERRED_NOTICE = (
    "accepted and stored, but the queue (Redis) is unreachable right now: the job will be sent "
    "to a worker by the recovery sweep once the queue is back; do not submit it again"
)


def _unmark_sent(session: Session, job: Job) -> None:
    """The message stamped with the insert was never sent: say so (no task id, never sent).
    Best effort: recovery re-sends a lost single job either way, from its creation time."""
    try:
        transitions.unmark_sent(session, job.id)
        session.commit()
    except SQLAlchemyError:
        session.rollback()
