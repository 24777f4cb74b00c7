"""Bulk batches (OpenAI Batch API): creation, the lazy state machine, counts, presentation.

State machine, advanced by `advance_batch` / `advance_batches` (idempotent; the API calls it on
every GET of a batch and the scheduler calls `advance_batches` periodically):

    validating -> in_progress            batch_ingest inserted and enqueued every line
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
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from lmqueue.broker import enqueue_jobs, producer_app
from lmqueue.files import generated_file
from lmqueue.schemas import ENDPOINTS
from lmqueue.settings import Settings, get_settings
from lmqueue.tables import Batch, Job, JobStatus, new_id, now

log = logging.getLogger(__name__)

VALIDATING, FAILED, IN_PROGRESS, FINALIZING = "validating", "failed", "in_progress", "finalizing"
COMPLETED, EXPIRED, CANCELLING, CANCELLED = "completed", "expired", "cancelling", "cancelled"
ACTIVE = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)
TERMINAL = (FAILED, COMPLETED, EXPIRED, CANCELLED)

_WINDOW = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
PUBLISH_PIPELINE = 500  # Redis commands buffered per pipelined round trip


class BatchInputError(ValueError):
    """A create/cancel/retry request that cannot be honoured; maps to a 4xx."""

    def __init__(
        self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400
    ):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


# --- parameters -------------------------------------------------------------------------------


def parse_window(text: str, max_s: int) -> int:
    """ "24h", "7d", "30m", "90s" -> seconds. OpenAI only knows "24h"; any duration works here."""
    m = _WINDOW.match(text or "")
    if not m:
        raise BatchInputError(
            f"completion_window must be a duration like '24h', '7d', '30m' or '90s', got {text!r}",
            "completion_window",
        )
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)]
    if not 1 <= seconds <= max_s:
        raise BatchInputError(
            f"completion_window must be between 1s and {max_s}s (LMQUEUE_BATCH_MAX_WINDOW_S)",
            "completion_window",
        )
    return seconds


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """OpenAI's rules: at most 16 keys, keys up to 64 characters, string values up to 512."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise BatchInputError("metadata must be an object of string values", "metadata")
    if len(metadata) > MAX_METADATA_KEYS:
        raise BatchInputError(f"metadata has more than {MAX_METADATA_KEYS} keys", "metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            msg = f"metadata key {key[:20]!r}… is longer than {MAX_METADATA_KEY} characters"
            raise BatchInputError(msg, "metadata")
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            msg = f"metadata[{key!r}] must be a string of at most {MAX_METADATA_VALUE} characters"
            raise BatchInputError(msg, f"metadata.{key}")
    return dict(metadata)


def check_endpoint(endpoint: str) -> str:
    if endpoint not in ENDPOINTS:
        raise BatchInputError(
            f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}", "endpoint"
        )
    return endpoint


def new_batch(
    *,
    owner: str,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: Any,
    parent_batch_id: str | None = None,
    settings: Settings | None = None,
) -> Batch:
    """A validated, not yet ingested batch (status validating). Raises BatchInputError."""
    settings = settings or get_settings()
    window_s = parse_window(completion_window, settings.batch_max_window_s)
    t = now()
    return Batch(
        id=new_id("batch"),
        owner=owner,
        endpoint=check_endpoint(endpoint),
        input_file_id=input_file_id,
        completion_window=completion_window.strip(),
        status=VALIDATING,
        parent_batch_id=parent_batch_id,
        metadata_=check_metadata(metadata),
        created_at=t,
        expires_at=t + window_s,
    )


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


def _transition(session: Session, batch: Batch, expect: str, **values: Any) -> bool:
    """Move `batch` from `expect` to values["status"] only if it is still in `expect`."""
    result = session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.status == expect)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.refresh(batch)
    return bool(result.rowcount)  # type: ignore[attr-defined]


def stop_jobs(session: Session, batch_id: str, code: str) -> int:
    """Cancel the batch's jobs that have not started (and running ones whose worker is gone:
    lease expired) in one UPDATE; a worker can no longer store a result for them."""
    t = now()
    result = session.execute(
        update(Job)
        .where(
            Job.batch_id == batch_id,
            or_(
                Job.status == JobStatus.QUEUED,
                (Job.status == JobStatus.RUNNING) & (Job.lease_expires_at < t),
            ),
        )
        .values(
            status=JobStatus.CANCELLED,
            finished_at=t,
            lease_expires_at=None,
            error={"code": code, "message": code.replace("_", " ")},
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def fail_batch(session: Session, batch: Batch, errors: list[dict[str, Any]]) -> bool:
    return _transition(
        session,
        batch,
        VALIDATING,
        status=FAILED,
        failed_at=now(),
        errors={"object": "list", "data": errors},
    )


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
        if counts.active and stop_jobs(session, batch.id, "batch_cancelled"):
            counts = job_counts(session, [batch.id])[batch.id]
        if not counts.active:
            _finish(session, batch, CANCELLING, CANCELLED, counts)
        return counts
    expiring = batch.expires_at is not None and t >= batch.expires_at
    if expiring and counts.active and stop_jobs(session, batch.id, "batch_expired"):
        counts = job_counts(session, [batch.id])[batch.id]
    if not counts.active:
        status = EXPIRED if expiring and counts.cancelled else COMPLETED
        _finish(session, batch, expected, status, counts)
    return counts


def _recover_validating(session: Session, batch: Batch, t: float, settings: Settings) -> None:
    """A batch validating for too long lost the process that ingested it. If its lines were
    inserted (one transaction), re-send their messages and go on; otherwise fail it."""
    if t - batch.created_at < settings.batch_stale_validation_s:
        return
    queued = session.execute(
        select(Job.model, Job.id)
        .where(Job.batch_id == batch.id, Job.status == JobStatus.QUEUED)
        .order_by(Job.id)
    ).all()
    any_job = session.scalar(select(func.count()).where(Job.batch_id == batch.id))
    if not any_job:
        msg = "validation was interrupted (the API process stopped); create the batch again"
        fail_batch(
            session,
            batch,
            [{"code": "validation_interrupted", "message": msg, "param": None, "line": None}],
        )
        return
    by_model: dict[str, list[str]] = defaultdict(list)
    for model, job_id in queued:
        by_model[model].append(job_id)
    enqueue_lines(by_model, settings)
    _transition(session, batch, VALIDATING, status=IN_PROGRESS, in_progress_at=t)


def enqueue_lines(by_model: dict[str, list[str]], settings: Settings) -> int:
    """Send the jobs of each model in messages of `batch_lines_per_message` ids, in order,
    through one producer whose publishes are pipelined to Redis (kombu's Producer.batch): one
    round trip per message would cost more than validating and inserting the lines.
    Returns the number of messages."""
    per = settings.batch_lines_per_message
    app = producer_app()
    sent = 0
    with app.producer_or_acquire() as producer, _pipelined(producer):
        for model, ids in by_model.items():
            for i in range(0, len(ids), per):
                enqueue_jobs(model, ids[i : i + per], settings.batch_priority, app, producer)
                sent += 1
    return sent


def _pipelined(producer: Any) -> AbstractContextManager[Any]:
    batch = getattr(producer, "batch", None)  # kombu >= 5.7; older ones publish one by one
    return batch(PUBLISH_PIPELINE) if batch is not None else nullcontext()


def _advance(session: Session, batch: Batch, settings: Settings) -> Counts | None:
    """Advance one loaded batch; returns its live counts (None when terminal or validating)."""
    t = now()
    if batch.status == VALIDATING:
        _recover_validating(session, batch, t, settings)
        if batch.status == VALIDATING:
            return None
    if batch.status in TERMINAL:
        return None
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
        _advance(session, batch, get_settings())
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
            _advance(session, batch, settings)
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
    _advance(session, batch, get_settings())


# --- reading ----------------------------------------------------------------------------------


def get_batch(session: Session, owner: str, batch_id: str) -> Batch | None:
    stmt = select(Batch).where(Batch.id == batch_id, Batch.owner == owner)
    return session.scalars(stmt.execution_options(populate_existing=True)).first()


def list_batches(
    session: Session, owner: str, *, after: str | None, limit: int
) -> tuple[list[Batch], bool]:
    """Newest first; `after` is the last id of the previous page."""
    stmt = select(Batch).where(Batch.owner == owner)
    if after:
        stmt = stmt.where(Batch.id < after)
    rows = list(session.scalars(stmt.order_by(Batch.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def view_batches(session: Session, batches: Iterable[Batch]) -> list[dict[str, Any]]:
    """Advance each batch, then present it with live counts."""
    settings = get_settings()
    out = []
    for batch in batches:
        counts = _advance(session, batch, settings) if batch.status in ACTIVE else None
        out.append(batch_to_dict(batch, counts))
    return out


def _ts(value: float | None) -> int | None:
    return int(value) if value is not None else None


def _estimate(batch: Batch, counts: Counts, t: float) -> int | None:
    """Measured throughput since the batch started, extrapolated to the lines left."""
    done = counts.total - counts.active
    if batch.status != IN_PROGRESS or not batch.in_progress_at or done <= 0 or not counts.active:
        return None
    rate = done / max(t - batch.in_progress_at, 1e-3)
    return int(t + counts.active / rate)


def batch_to_dict(batch: Batch, counts: Counts | None = None) -> dict[str, Any]:
    """OpenAI's batch object (plus model, parent_batch_id, estimated_completion_at)."""
    if counts is not None:
        total, completed, failed = counts.total, counts.completed, counts.failed
        usage: dict[str, Any] | None = counts.usage()
    else:
        total, completed, failed = batch.total, batch.completed, batch.failed
        usage = batch.usage or usage_dict(0, 0)
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": batch.model,
        "errors": batch.errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": int(batch.created_at),
        "in_progress_at": _ts(batch.in_progress_at),
        "expires_at": _ts(batch.expires_at),
        "finalizing_at": _ts(batch.finalizing_at),
        "completed_at": _ts(batch.completed_at),
        "failed_at": _ts(batch.failed_at),
        "expired_at": _ts(batch.expired_at),
        "cancelling_at": _ts(batch.cancelling_at),
        "cancelled_at": _ts(batch.cancelled_at),
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "metadata": batch.metadata_,
        "usage": usage,
        "parent_batch_id": batch.parent_batch_id,
        "estimated_completion_at": _estimate(batch, counts, now()) if counts else None,
    }
