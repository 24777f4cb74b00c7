"""Reading batches and presenting them: OpenAI's batch object with live counts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from lmqueue.batches.state import ACTIVE, IN_PROGRESS, Counts, advance, usage_dict
from lmqueue.settings import get_settings
from lmqueue.tables import Batch, Job, JobStatus, now

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
        counts = advance(session, batch, settings) if batch.status in ACTIVE else None
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


# --- finished lines, in completion order (batch events) ---------------------------------------


def finished_lines(
    session: Session, batch_id: str, after: tuple[float, str] | None, until: float | None
) -> list[tuple[float, str, str | None, str]]:
    """(finished_at, job id, custom_id, status) of the batch's finished lines after the cursor
    `after` = (finished_at, job id), in completion order; only those finished by `until` (None:
    all), so a line stored by a transaction that commits late still lands after the cursor."""
    stmt = select(Job.finished_at, Job.id, Job.custom_id, Job.status).where(
        Job.batch_id == batch_id, Job.status.in_(JobStatus.TERMINAL), Job.finished_at.is_not(None)
    )
    if after is not None:
        at, job_id = after
        stmt = stmt.where(or_(Job.finished_at > at, and_(Job.finished_at == at, Job.id > job_id)))
    if until is not None:
        stmt = stmt.where(Job.finished_at <= until)
    rows = session.execute(stmt.order_by(Job.finished_at, Job.id).limit(1000))
    return [(float(r[0] or 0.0), r[1], r[2], r[3]) for r in rows]
