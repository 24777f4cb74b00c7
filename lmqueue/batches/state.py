"""A batch's state machine: every batch transition is here, and nowhere else.

State machine, advanced by `advance_batch` / `advance_batches` (idempotent; the API calls it on
every GET of a batch and the scheduler calls `advance_batches` periodically):

    validating -> in_progress            ingest inserted every line, held for the dispatcher
    validating -> failed                 invalid lines, or the ingesting process died first
    in_progress -> finalizing -> completed   once every job of the batch is terminal
    in_progress -> expired               past expires_at: queued jobs are cancelled
                                         (batch_expired), then once running ones finish
    cancelling -> cancelled              queued jobs cancelled (batch_cancelled) in one UPDATE,
                                         then once running ones finish

So a batch in a terminal status has only terminal jobs and its output never changes. Every
transition is a conditional UPDATE on the current status: concurrent callers (API processes,
the scheduler) cannot both win, and only the winner creates the output/error file rows.
Counts come from the jobs table (GROUP BY status), never from counters kept by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from lmqueue.batches import BatchInputError
from lmqueue.files import generated_file
from lmqueue.settings import Settings, get_settings
from lmqueue.tables import Batch, Job, JobStatus, now
from lmqueue.transitions import cancel_batch_jobs, resolve_followers

log = logging.getLogger(__name__)

VALIDATING, FAILED, IN_PROGRESS, FINALIZING = "validating", "failed", "in_progress", "finalizing"
COMPLETED, EXPIRED, CANCELLING, CANCELLED = "completed", "expired", "cancelling", "cancelled"
ACTIVE = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)
TERMINAL = (FAILED, COMPLETED, EXPIRED, CANCELLED)
RETRYABLE = (COMPLETED, EXPIRED, CANCELLED)  # retry_failed needs a finished batch


# --- counts -----------------------------------------------------------------------------------


@dataclass
class Counts:
    by_status: dict[str, int] = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    @property
    def completed(self) -> int:
        return self.by_status.get(JobStatus.SUCCEEDED, 0)

    @property
    def failed(self) -> int:
        """Lines in the error file: failed ones and ones that never ran (cancelled/expired)."""
        return self.by_status.get(JobStatus.FAILED, 0) + self.cancelled

    @property
    def cancelled(self) -> int:
        return self.by_status.get(JobStatus.CANCELLED, 0)

    @property
    def active(self) -> int:
        return self.by_status.get(JobStatus.QUEUED, 0) + self.by_status.get(JobStatus.RUNNING, 0)

    def usage(self) -> dict[str, Any]:
        return usage_dict(self.input_tokens, self.output_tokens)


def usage_dict(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def job_counts(session: Session, batch_ids: Sequence[str]) -> dict[str, Counts]:
    """Per batch: jobs by status and token sums, in one GROUP BY."""
    out: dict[str, Counts] = {b: Counts() for b in batch_ids}
    if not batch_ids:
        return out
    rows = session.execute(
        select(
            Job.batch_id,
            Job.status,
            func.count(),
            func.coalesce(func.sum(Job.prompt_tokens), 0),
            func.coalesce(func.sum(Job.completion_tokens), 0),
        )
        .where(Job.batch_id.in_(list(batch_ids)))
        .group_by(Job.batch_id, Job.status)
    ).all()
    for batch_id, status, n, prompt, completion in rows:
        c = out[str(batch_id)]
        c.by_status[status] = int(n)
        c.input_tokens += int(prompt or 0)
        c.output_tokens += int(completion or 0)
    return out


# --- transitions ------------------------------------------------------------------------------


def _set(session: Session, batch_id: str, expect: str, **values: Any) -> bool:
    """The one UPDATE of every batch transition: only if the batch is still in `expect`."""
    result = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status == expect)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _transition(session: Session, batch: Batch, expect: str, **values: Any) -> bool:
    """Move a loaded `batch` from `expect` to values["status"] (see _set), and reload it."""
    moved = _set(session, batch.id, expect, **values)
    session.refresh(batch)
    return moved


def fail_batch(session: Session, batch: Batch, errors: list[dict[str, Any]]) -> bool:
    return _transition(
        session,
        batch,
        VALIDATING,
        status=FAILED,
        failed_at=now(),
        errors={"object": "list", "data": errors},
    )


def record_ingested(session: Session, batch_id: str, total: int, model: str | None) -> bool:
    """Stamp the line count (and the one model, if only one) on a batch still validating; False
    when it moved meanwhile (cancelled while its file was read)."""
    return _set(session, batch_id, VALIDATING, total=total, model=model)


def start_batch(session: Session, batch_id: str, t: float) -> bool:
    """validating -> in_progress, once every line is inserted (held: the dispatcher sends)."""
    return _set(session, batch_id, VALIDATING, status=IN_PROGRESS, in_progress_at=t)


def _finish(session: Session, batch: Batch, expect: str, status: str, counts: Counts) -> bool:
    """The terminal transition; the winner also creates the output and error file rows."""
    t = now()
    output = generated_file(batch, "output") if counts.completed else None
    error = generated_file(batch, "error") if counts.failed else None
    stamps = {COMPLETED: "completed_at", EXPIRED: "expired_at", CANCELLED: "cancelled_at"}
    values: dict[str, Any] = {
        "status": status,
        stamps[status]: t,
        "total": counts.total,
        "completed": counts.completed,
        "failed": counts.failed,
        "usage": counts.usage(),
        "output_file_id": output.id if output else None,
        "error_file_id": error.id if error else None,
    }
    if status == COMPLETED:
        values["finalizing_at"] = t  # results are rendered on demand: finalizing is instant
    if not _transition(session, batch, expect, **values):
        return False
    session.add_all([f for f in (output, error) if f is not None])
    return True


def _advance_running(session: Session, batch: Batch, counts: Counts, t: float) -> Counts:
    expected = batch.status
    if expected == CANCELLING:
        if counts.active and cancel_batch_jobs(session, batch.id, "batch_cancelled"):
            counts = job_counts(session, [batch.id])[batch.id]
        if not counts.active:
            _finish(session, batch, CANCELLING, CANCELLED, counts)
        return counts
    expiring = batch.expires_at is not None and t >= batch.expires_at
    if expiring and counts.active and cancel_batch_jobs(session, batch.id, "batch_expired"):
        counts = job_counts(session, [batch.id])[batch.id]
    if not counts.active:
        status = EXPIRED if expiring and counts.cancelled else COMPLETED
        _finish(session, batch, expected, status, counts)
    return counts


def _recover_validating(session: Session, batch: Batch, t: float, settings: Settings) -> None:
    """A batch validating for too long lost the process that ingested it. If its lines were
    inserted (one transaction, held for the dispatcher), go on."""
    if t - batch.created_at < settings.batch_stale_validation_s:
        return
    any_job = session.scalar(select(func.count()).where(Job.batch_id == batch.id))
    if not any_job:
        # Nothing was stored: the scheduler's housekeeping ingests it again from its input
        # file (lmqueue.batches.ingest.resume_interrupted_ingests), or fails it if that is gone.
        return
    _transition(session, batch, VALIDATING, status=IN_PROGRESS, in_progress_at=t)


def advance(session: Session, batch: Batch, settings: Settings) -> Counts | None:
    """Advance one loaded batch; returns its live counts (None when terminal or validating)."""
    t = now()
    if batch.status == VALIDATING:
        _recover_validating(session, batch, t, settings)
        if batch.status == VALIDATING:
            return None
    if batch.status in TERMINAL:
        return None
    resolve_followers(session, batch.id)  # lines waiting for an identical line's result
    counts = job_counts(session, [batch.id])[batch.id]
    if batch.status == FINALIZING:  # left by an older process between two steps
        _finish(session, batch, FINALIZING, COMPLETED, counts)
        return counts
    return _advance_running(session, batch, counts, t)


def advance_batch(session: Session, batch_id: str) -> Batch | None:
    """Bring one batch's status up to date (see the module docstring). Idempotent; the caller
    commits. Returns the batch, or None if it does not exist."""
    batch = session.get(Batch, batch_id, populate_existing=True)
    if batch is not None:
        advance(session, batch, get_settings())
    return batch


def advance_batches(session: Session, limit: int = 1000) -> int:
    """Advance every active batch: the scheduler process calls this periodically. Each batch is
    advanced and committed in its own transaction; one that fails is rolled back and logged,
    and the others go on. Returns how many batches changed status."""
    ids = session.scalars(
        select(Batch.id).where(Batch.status.in_(ACTIVE)).order_by(Batch.id).limit(limit)
    ).all()
    session.commit()
    settings = get_settings()
    changed = 0
    for batch_id in ids:
        try:
            batch = session.get(Batch, batch_id, populate_existing=True)
            if batch is None:
                continue
            before = batch.status
            advance(session, batch, settings)
            session.commit()
        except Exception:  # one broken batch must not stop the others
            session.rollback()
            log.exception("advancing batch %s failed", batch_id)
            continue
        changed += batch.status != before
    return changed


def cancel_batch(session: Session, batch: Batch) -> None:
    """Ask a batch to stop: queued lines are cancelled now, running ones finish."""
    if batch.status in (CANCELLING, CANCELLED):
        return
    if batch.status in TERMINAL:
        raise BatchInputError(
            f"batch {batch.id} is {batch.status}; it can no longer be cancelled",
            code="not_cancellable",
            status=409,
        )
    if not _transition(session, batch, batch.status, status=CANCELLING, cancelling_at=now()):
        batch = session.get(Batch, batch.id, populate_existing=True) or batch
        return cancel_batch(session, batch)  # it moved meanwhile: decide again
    advance(session, batch, get_settings())
