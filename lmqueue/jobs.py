"""Jobs: create (with idempotency keys), read, list, present. Every later change of a job's
state is in lmqueue.transitions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lmqueue.cache import shown_result
from lmqueue.tables import Job, JobStatus, new_id, now
from lmqueue.transitions import lease_expired


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before for a different request."""


def create_job(
    session: Session,
    *,
    owner: str,
    model: str,
    endpoint: str,
    body: dict[str, Any],
    priority: int,
    idempotency_key: str | None = None,
    timeout_s: float | None = None,
    cache_key: str | None = None,
    task_id: str | None = None,
) -> tuple[Job, bool]:
    """Insert a queued job; with an idempotency key, return the existing job instead.

    `task_id`: the message the caller will send right after committing, stamped now (with
    enqueued_at) so that a submission costs one transaction, not two. Returns (job, created).
    """
    if idempotency_key:
        existing = by_idempotency_key(session, owner, idempotency_key)
        if existing is not None:
            return _same_request_or_conflict(existing, model, endpoint, body), False
    created_at = now()
    job = Job(
        id=new_id("job"),
        owner=owner,
        model=model,
        endpoint=endpoint,
        body=body,
        status=JobStatus.QUEUED,
        priority=priority,
        idempotency_key=idempotency_key,
        created_at=created_at,
        deadline_at=created_at + timeout_s if timeout_s else None,
        cache_key=cache_key,
        task_id=task_id,
        enqueued_at=created_at if task_id else None,
    )
    if not idempotency_key:  # a fresh random id cannot collide: no savepoint round trips
        session.add(job)
        return job, True
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        # A concurrent request with the same key won the insert: answer with its job.
        existing = by_idempotency_key(session, owner, idempotency_key)
        if existing is None:
            raise
        return _same_request_or_conflict(existing, model, endpoint, body), False
    return job, True


def by_idempotency_key(session: Session, owner: str, key: str) -> Job | None:
    stmt = select(Job).where(Job.owner == owner, Job.idempotency_key == key)
    return session.scalars(stmt).first()


def _same_request_or_conflict(job: Job, model: str, endpoint: str, body: dict[str, Any]) -> Job:
    if (job.model, job.endpoint, job.body) != (model, endpoint, body):
        raise IdempotencyConflict("Idempotency-Key was already used for a different request")
    return job


def get_job(session: Session, owner: str, job_id: str) -> Job | None:
    return session.scalars(select(Job).where(Job.id == job_id, Job.owner == owner)).first()


def list_jobs(
    session: Session, owner: str, *, status: str | None, after: str | None, limit: int
) -> tuple[list[Job], bool]:
    """Newest first; `after` is the last id of the previous page. Returns (page, has_more)."""
    stmt = select(Job).where(Job.owner == owner, Job.batch_id.is_(None))
    if status:
        stmt = stmt.where(Job.status == status)
    if after:
        stmt = stmt.where(Job.id < after)
    rows = list(session.scalars(stmt.order_by(Job.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def open_job_counts(session: Session) -> dict[tuple[str, str], int]:
    """{(model, status): n} for queued and running jobs: the store's side of queue depth (the
    API's metrics, the scheduler's backlog)."""
    stmt = (
        select(Job.model, Job.status, func.count())
        .where(Job.status.in_(JobStatus.OPEN))
        .group_by(Job.model, Job.status)
    )
    return {(m, s): int(n) for m, s, n in session.execute(stmt)}


def finished_since(session: Session, t: float, models: Sequence[str]) -> int:
    """Jobs of `models` that reached a final state after `t` (the scheduler's summary line; on
    the index (model, finished_at))."""
    stmt = select(func.count()).where(Job.model.in_(list(models)), Job.finished_at > t)
    return int(session.scalar(stmt) or 0)


# --- what a worker reads (it changes nothing: lmqueue.transitions does) ----------------------


def offered_jobs(session: Session, job_ids: Sequence[str]) -> list[Job]:
    """The jobs of a message a worker may still run: queued, or running with an expired lease
    (read only; the worker claims each one when it enters a slot)."""
    t = now()
    stmt = select(Job).where(
        Job.id.in_(job_ids),
        or_(Job.status == JobStatus.QUEUED, lease_expired(t)),
    )
    return list(session.scalars(stmt))


def unknown_job_ids(session: Session, job_ids: Sequence[str]) -> list[str]:
    """The ids the store has no job for (a message meant for another deployment's store)."""
    known = set(session.scalars(select(Job.id).where(Job.id.in_(job_ids))))
    return [i for i in job_ids if i not in known]


def jobs_to_drop(
    session: Session, running: Sequence[str], waiting: Sequence[str], worker: str
) -> set[str]:
    """Of a worker's running jobs, those it no longer holds (cancelled, timed out, claimed
    elsewhere); of its waiting ones, those already finished or cancelled. One query: a worker's
    watcher runs this every `cancel_poll_s` while it holds work."""
    ids = [*running, *waiting]
    if not ids:
        return set()
    rows = session.execute(select(Job.id, Job.status, Job.worker).where(Job.id.in_(ids)))
    state = {job_id: (status, owner) for job_id, status, owner in rows}
    drop = {i for i in running if state.get(i) != (JobStatus.RUNNING, worker)}
    drop |= {i for i in waiting if i in state and state[i][0] not in JobStatus.OPEN}
    return drop


# --- presentation -----------------------------------------------------------------------------


def job_to_dict(job: Job) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": job.id,
        "object": "job",
        "model": job.model,
        "endpoint": job.endpoint,
        "status": job.status,
        "priority": job.priority,
        "created_at": int(job.created_at),
        "started_at": int(job.started_at) if job.started_at else None,
        "finished_at": int(job.finished_at) if job.finished_at else None,
        "attempts": job.attempts,
        "task_id": job.task_id,  # the Celery task in Flower that carries it (None before sent)
        "response": shown_result(job.result, job.cache_hit),
        "error": job.error,
    }
    out["cached"] = job.cache_hit is not None
    if job.cache_hit is not None:
        out["cache"] = {"job_id": job.cache_of, **job.cache_hit}
    if job.microbatch_id:
        out["microbatch"] = {"id": job.microbatch_id, "size": job.microbatch_size}
    return out
