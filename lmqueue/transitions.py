"""Every change of a job's state, one function per transition, each one conditional UPDATE.

    queued  -> running               claim_jobs (a worker; also a running job whose lease expired)
    running -> succeeded | failed    store_outcomes (only the worker that holds the job)
    queued | running -> cancelled    cancel_job (its owner), cancel_batch_jobs (its batch stops);
                                     a worker drops a cancelled running row within a few steps
    queued | running -> failed       time_out (past deadline_at: the reaper, or the worker)
    running -> queued | failed       recover_abandoned (its worker is gone: re-send, or give up)
    queued, stamped enqueued_at      mark_enqueued, mark_resent (who sends its message; a
                                     submission stamps it with the insert, unmark_sent
                                     takes it back if the send fails),
                                     mark_held (held_at: a worker holds it, not yet claimed)
    queued -> succeeded              answer_from_cache (a result-cache hit, no worker)
    queued -> succeeded | failed     resolve_followers (a batch line copies the outcome of the
                                     identical line or cached job it waits for: cache_of)

Every state change is a conditional UPDATE, so two processes racing on one job can never both
win: a redelivered message finds its job already claimed or finished and does nothing, and a
job someone else finished (or cancelled, or timed out) keeps its one stored outcome. A running
job whose lease expired (`lease_expired`) has no live holder: it may be claimed again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, bindparam, case, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from lmqueue.errors import cancelled_error, crashed_error, timeout_error
from lmqueue.fleet import dead_workers
from lmqueue.settings import Settings
from lmqueue.tables import Job, JobStatus, now

CHUNK = 500  # ids per IN (...) clause


def lease_expired(t: float) -> ColumnElement[bool]:
    """Running, but its worker stopped renewing the lease before `t`."""
    return and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < t)


def in_chunks(ids: Sequence[str]) -> Iterable[list[str]]:
    for i in range(0, len(ids), CHUNK):
        yield list(ids[i : i + CHUNK])


# --- the owner's side -------------------------------------------------------------------------


def cancel_job(session: Session, job: Job) -> bool:
    """Cancel a job that has not finished. A running job's worker sees it within a few steps
    (its cancellation watcher), frees the slot, and can no longer store a result. Returns False
    when the job is already finished."""
    running = job.status == JobStatus.RUNNING
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_(JobStatus.OPEN))
        .values(
            status=JobStatus.CANCELLED,
            finished_at=now(),
            lease_expires_at=None,
            error=cancelled_error(while_running=running),
        )
    )
    session.refresh(job)
    return bool(result.rowcount)  # type: ignore[attr-defined]


def cancel_batch_jobs(session: Session, batch_id: str, code: str) -> int:
    """Cancel the batch's unfinished jobs, queued and running, in one UPDATE; a worker can no
    longer store a result for them, and drops their rows within a few steps. `code` is
    batch_cancelled or batch_expired."""
    t = now()
    result = session.execute(
        update(Job)
        .where(Job.batch_id == batch_id, Job.status.in_(JobStatus.OPEN))
        .values(
            status=JobStatus.CANCELLED,
            finished_at=t,
            lease_expires_at=None,
            error=cancelled_error(code),
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


# --- the worker's side ------------------------------------------------------------------------


def claim_jobs(session: Session, job_ids: Sequence[str], worker: str, lease_s: float) -> list[Job]:
    """Take the jobs this worker may run now: queued ones, or running ones whose lease expired.

    Jobs that are finished, cancelled, or held by a live lease elsewhere are skipped, so a
    redelivered message never runs a job twice at once and never recomputes a stored result.
    """
    t = now()
    claimed = session.scalars(
        update(Job)
        .where(Job.id.in_(job_ids), or_(Job.status == JobStatus.QUEUED, lease_expired(t)))
        .values(
            status=JobStatus.RUNNING,
            worker=worker,
            started_at=t,
            lease_expires_at=t + lease_s,
            attempts=Job.attempts + 1,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).all()
    if not claimed:
        return []
    return list(session.scalars(select(Job).where(Job.id.in_(claimed))))


def renew_leases(session: Session, job_ids: Iterable[str], worker: str, lease_s: float) -> None:
    ids = list(job_ids)
    if not ids:
        return
    session.execute(
        update(Job)
        .where(Job.id.in_(ids), Job.worker == worker, Job.status == JobStatus.RUNNING)
        .values(lease_expires_at=now() + lease_s)
        .execution_options(synchronize_session=False)
    )


@dataclass
class Outcome:
    """What a worker learned about one job: a result body or an error object."""

    job_id: str
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    microbatch_id: str | None = None
    microbatch_size: int | None = None

    @property
    def status(self) -> str:
        return JobStatus.FAILED if self.error is not None else JobStatus.SUCCEEDED


def store_outcomes(session: Session, outcomes: Sequence[Outcome], worker: str) -> int:
    """Write results in one transaction. Only this worker's running jobs are updated, so a job
    that someone else finished (or cancelled, or timed out) keeps its one stored outcome.

    One UPDATE statement run for every outcome (executemany): a statement per row cost ~0.5 ms
    each in SQLAlchemy and capped a worker at ~2k results/s."""
    if not outcomes:
        return 0
    jobs: Table = Job.__table__  # type: ignore[assignment]  # Core: executemany
    stmt = (
        update(jobs)
        .where(
            jobs.c.id == bindparam("o_id"),
            jobs.c.status == JobStatus.RUNNING,
            jobs.c.worker == bindparam("o_worker"),
        )
        .values(
            status=bindparam("o_status"),
            result=bindparam("o_result", type_=jobs.c.result.type),
            error=bindparam("o_error", type_=jobs.c.error.type),
            finished_at=bindparam("o_at"),
            prompt_tokens=bindparam("o_prompt"),
            completion_tokens=bindparam("o_completion"),
            microbatch_id=bindparam("o_mb"),
            microbatch_size=bindparam("o_mb_size"),
            lease_expires_at=None,
        )
    )
    t = now()
    params = [
        {
            "o_id": o.job_id,
            "o_worker": worker,
            "o_status": o.status,
            "o_result": o.result,
            "o_error": o.error,
            "o_at": t,
            "o_prompt": o.prompt_tokens,
            "o_completion": o.completion_tokens,
            "o_mb": o.microbatch_id,
            "o_mb_size": o.microbatch_size,
        }
        for o in outcomes
    ]
    result = session.execute(stmt, params)
    return int(result.rowcount)  # type: ignore[attr-defined]


# --- deadlines and recovery -------------------------------------------------------------------


def time_out(session: Session, t: float, job_ids: Sequence[str] | None = None) -> list[str]:
    """Fail the queued or running jobs past their deadline (all of them, or those of
    `job_ids`). Returns their ids. The reaper runs it every pass; a worker runs it for the jobs
    it finds expired before it starts them."""
    stmt = update(Job).where(Job.status.in_(JobStatus.OPEN), Job.deadline_at < t)
    if job_ids is not None:
        stmt = stmt.where(Job.id.in_(list(job_ids)))
    result = session.execute(
        stmt.values(
            status=JobStatus.FAILED, error=timeout_error(), finished_at=t, lease_expires_at=None
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    return [str(i) for i in result.scalars()]


def _abandoned(t: float, settings: Settings) -> ColumnElement[bool]:
    """Running with an expired lease, or held by a worker that is down, lost or silent."""
    return and_(
        Job.status == JobStatus.RUNNING,
        or_(lease_expired(t), Job.worker.in_(dead_workers(t, settings))),
    )


def recover_abandoned(
    session: Session, t: float, settings: Settings
) -> tuple[list[tuple[str, str, int]], list[str]]:
    """Running jobs nobody runs any more go back to queued (the caller re-sends them), or fail
    with worker_crashed once claimed `max_attempts` times. Returns ([(id, model, priority)]
    requeued, [id] failed). Attempts are not touched here: claim_jobs counts one per claim."""
    abandoned = _abandoned(t, settings)
    failed = session.execute(
        update(Job)
        .where(abandoned, Job.attempts >= settings.max_attempts)
        .values(
            status=JobStatus.FAILED,
            error=crashed_error(settings.max_attempts),
            finished_at=t,
            lease_expires_at=None,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    failed_ids = [str(i) for i in failed.scalars()]
    requeued = session.execute(
        update(Job)
        .where(abandoned)
        .values(status=JobStatus.QUEUED, worker=None, lease_expires_at=None, enqueued_at=t)
        .returning(Job.id, Job.model, Job.priority)
        .execution_options(synchronize_session=False)
    )
    return [(str(i), str(m), int(p)) for i, m, p in requeued.all()], failed_ids


# --- sending ----------------------------------------------------------------------------------


def mark_enqueued(session: Session, job_ids: Sequence[str], task_id: str | None = None) -> None:
    values: dict[str, Any] = {"enqueued_at": now()}
    if task_id is not None:
        values["task_id"] = task_id
    session.execute(update(Job).where(Job.id.in_(job_ids)).values(**values))


def unmark_sent(session: Session, job_id: str) -> None:
    """The message a submission stamped (create_job's task_id) could not be sent."""
    session.execute(update(Job).where(Job.id == job_id).values(task_id=None, enqueued_at=None))


def record_task(session: Session, job_ids: Sequence[str], task_id: str) -> None:
    """Remember the message (Celery task id) that now carries `job_ids` (a re-send)."""
    for chunk in in_chunks(job_ids):
        session.execute(
            update(Job)
            .where(Job.id.in_(chunk))
            .values(task_id=task_id)
            .execution_options(synchronize_session=False)
        )


def mark_held(session: Session, job_ids: Sequence[str], t: float) -> None:
    """A worker holds these jobs' message on its waiting list (still queued, not claimed):
    stamping held_at tells the reaper the message is not lost, so it neither re-sends the jobs
    nor drops the worker's unacked entry while they wait for a slot. (enqueued_at keeps saying
    when the message was sent.)"""
    for chunk in in_chunks(job_ids):
        session.execute(
            update(Job)
            .where(Job.id.in_(chunk), Job.status == JobStatus.QUEUED)
            .values(held_at=t)
            .execution_options(synchronize_session=False)
        )


def last_seen() -> ColumnElement[float]:
    """When the job's message was last known to exist: sent (enqueued_at), held by a worker
    (held_at), or the job created (never sent)."""
    sent = func.coalesce(Job.enqueued_at, Job.created_at)
    return case((Job.held_at > sent, Job.held_at), else_=sent)


def mark_resent(
    session: Session, ids: Sequence[str], cutoff: float, t: float
) -> list[tuple[str, int]]:
    """Claim the right to re-send: only jobs still queued and last sent before `cutoff` are
    stamped `t`. Returns [(id, priority)] of those the caller must send again."""
    sent_at = last_seen()
    out: list[tuple[str, int]] = []
    for chunk in in_chunks(ids):
        result = session.execute(
            update(Job)
            .where(Job.id.in_(chunk), Job.status == JobStatus.QUEUED, sent_at < cutoff)
            .values(enqueued_at=t)
            .returning(Job.id, Job.priority)
            .execution_options(synchronize_session=False)
        )
        out += [(str(i), int(p)) for i, p in result.all()]
    return out


# --- the result cache -------------------------------------------------------------------------


def answer_from_cache(session: Session, job: Job, source: Job, hit: dict[str, Any]) -> bool:
    """A queued job takes the stored answer of `source` (lmqueue.cache): it finishes at once,
    no worker involved. `hit` says how it matched (kind, similarity) and is kept on the job."""
    t = now()
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.SUCCEEDED,
            result=source.result,
            prompt_tokens=source.prompt_tokens,
            completion_tokens=source.completion_tokens,
            started_at=t,
            finished_at=t,
            cache_key=None,  # the entry is `source`; a copy would only crowd the cache
            cache_hit={**hit, "job_id": source.id},
        )
    )
    session.refresh(job)
    return bool(result.rowcount)  # type: ignore[attr-defined]


def resolve_followers(session: Session, batch_id: str) -> int:
    """Queued lines of a batch that wait for another job (`cache_of`: an identical earlier
    line, or a cached job) copy its outcome once it has one. One UPDATE; returns the count."""
    leader = aliased(Job)

    def of_leader(column: Any) -> Any:
        return select(column).where(leader.id == Job.cache_of).scalar_subquery()

    done = select(leader.id).where(
        leader.id == Job.cache_of,
        leader.status.in_((JobStatus.SUCCEEDED, JobStatus.FAILED)),
    )
    t = now()
    result = session.execute(
        update(Job)
        .where(
            Job.batch_id == batch_id,
            Job.status == JobStatus.QUEUED,
            Job.cache_of.is_not(None),
            done.exists(),
        )
        .values(
            status=of_leader(leader.status),
            result=of_leader(leader.result),
            error=of_leader(leader.error),
            prompt_tokens=of_leader(leader.prompt_tokens),
            completion_tokens=of_leader(leader.completion_tokens),
            started_at=t,
            finished_at=t,
            cache_hit={"kind": "exact"},
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
