"""Ingest a batch: validate its input file in one streaming pass and insert one job per line in
bulk, held: the dispatcher (lmqueue.batches.dispatch) meters them into Redis, fairly between
API keys.

Runs after POST /v1/batches has answered (a FastAPI background task), or directly (tests).
All job rows are inserted in ONE transaction, chunk by chunk as the file is read: a file with
an invalid line rolls back, so nothing is enqueued, and memory stays flat whatever the size.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Table, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from lmqueue import cache
from lmqueue.batches.dispatch import poke
from lmqueue.batches.state import VALIDATING, fail_batch, record_ingested, start_batch
from lmqueue.db import get_sessionmaker, session_scope
from lmqueue.errors import batch_error
from lmqueue.files import content_path
from lmqueue.jsonl import LineError, validate_file
from lmqueue.metrics import JOBS_SUBMITTED
from lmqueue.quotas import line_cost
from lmqueue.settings import Settings, get_settings
from lmqueue.tables import Batch, FileObject, Job, JobStatus, now
from lmqueue.transitions import resolve_followers

log = logging.getLogger(__name__)

INSERT_CHUNK = 1000
# Core insert (executemany): no ORM unit-of-work per row.
JOBS: Table = Job.__table__  # type: ignore[assignment]


def job_id_prefix(batch_id: str) -> str:
    """Shared by all lines of one batch, and derived from the batch id (its creation time in
    ms and 3 of its random bytes): an ingest that is resumed or runs twice inserts the same
    ids, so the second one conflicts instead of duplicating lines."""
    return f"job_{batch_id.removeprefix('batch_')[:18]}"


def line_job_id(prefix: str, line_no: int) -> str:
    """Job ids sort in input line order, so outputs and result pages come in file order."""
    return f"{prefix}{line_no:08x}"


@dataclass
class Ingested:
    total: int = 0
    by_model: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    errors: list[dict[str, Any]] = field(default_factory=list)
    followers: int = 0  # lines that copy an identical line or a cached job, never sent


@dataclass
class _Pending:
    """Valid lines waiting for the next chunk insert, with their result-cache keys."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)
    leaders: dict[str, str] = field(default_factory=dict)  # cache key -> the job that computes it


def _flush(session: Session, batch: Batch, pending: _Pending, out: Ingested, s: Settings) -> None:
    """Insert the pending rows. A line identical to an earlier line of the batch, or to a live
    cache entry of its owner, waits for that job (`cache_of`) instead of being sent: the
    result is computed once (lmqueue.transitions.resolve_followers copies it)."""
    wanted = {k for k in pending.keys if k and k not in pending.leaders}
    pending.leaders.update(cache.lookup_many(session, batch.owner, wanted, s))
    for row, key in zip(pending.rows, pending.keys, strict=True):
        leader = pending.leaders.get(key) if key else None
        if leader is not None:
            row["cache_of"] = leader
            out.followers += 1
        else:
            if key:
                pending.leaders[key] = row["id"]
                row["cache_key"] = key
            out.by_model[row["model"]].append(row["id"])
        if key:
            cache.count(row["model"], "exact", leader is not None)
    if pending.rows:
        session.execute(insert(JOBS), pending.rows)
    pending.rows, pending.keys = [], []


def _insert_lines(session: Session, batch: Batch, path: Path, settings: Settings) -> Ingested:
    """Validate every line; insert the valid ones in chunks until the first invalid one, then
    only collect errors (up to batch_max_errors). The caller commits or rolls back."""
    out = Ingested()
    prefix, t = job_id_prefix(batch.id), now()
    pending = _Pending()
    lines = validate_file(
        path,
        batch.endpoint,
        max_lines=settings.batch_max_lines,
        max_line_bytes=settings.max_request_bytes,
    )
    for item in lines:
        if isinstance(item, LineError):
            out.errors.append(item.as_dict())
            pending.rows, pending.keys = [], []
            if len(out.errors) >= settings.batch_max_errors:
                break
            continue
        if out.errors:
            continue  # keep reading only to report the other invalid lines
        job_id = line_job_id(prefix, item.line_no)
        pending.rows.append(
            _row(batch, job_id, item.line_no, item.custom_id, item.model, item.body, t, settings)
        )
        pending.keys.append(
            cache.cache_key(batch.owner, item.model, batch.endpoint, item.body, settings)
        )
        out.total += 1
        if len(pending.rows) >= INSERT_CHUNK:
            _flush(session, batch, pending, out, settings)
    if not out.errors:
        _flush(session, batch, pending, out, settings)
    return out


def _row(
    batch: Batch,
    job_id: str,
    line_no: int,
    custom_id: str,
    model: str,
    body: dict[str, Any],
    t: float,
    settings: Settings,
) -> dict[str, Any]:
    return {
        "id": job_id,
        "owner": batch.owner,
        "model": model,
        "endpoint": batch.endpoint,
        "body": body,
        "status": JobStatus.QUEUED,
        "priority": settings.batch_priority,
        "batch_id": batch.id,
        "custom_id": custom_id,
        "line_no": line_no,
        "created_at": t,
        # Held: no message yet. The dispatcher stamps enqueued_at when it sends the line.
        "enqueued_at": None,
        "attempts": 0,
        "cache_key": None,  # set by _flush: every row of one executemany has the same keys
        "cache_of": None,
        "cost_tokens": line_cost(body),
    }


def _fail(batch_id: str, errors: list[dict[str, Any]]) -> None:
    with session_scope() as session:
        batch = session.get(Batch, batch_id)
        if batch is not None:
            fail_batch(session, batch, errors)


def _input_path(session: Session, batch: Batch) -> Path | None:
    f = session.get(FileObject, batch.input_file_id)
    if f is None or f.deleted_at is not None or not f.storage_path:
        return None
    path = content_path(f)
    return path if path.exists() else None


def ingest_batch(batch_id: str) -> None:
    """validating -> in_progress (lines inserted and enqueued) or -> failed (invalid lines)."""
    settings = get_settings()
    session = get_sessionmaker()()
    try:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.status != VALIDATING:
            return
        path = _input_path(session, batch)
        if path is None:
            msg = f"the input file {batch.input_file_id} was deleted"
            _fail(batch_id, [batch_error("input_file_missing", msg)])
            return
        result = _insert_lines(session, batch, path, settings)
        if result.errors:
            session.rollback()
            _fail(batch_id, result.errors)
            return
        models = list(result.by_model)
        model = models[0] if len(models) == 1 else None
        if not record_ingested(session, batch_id, result.total, model):
            session.rollback()  # cancelled while we read the file: insert nothing
            return
        session.commit()
    except IntegrityError:
        session.rollback()  # another process ingested it meanwhile (same ids): its work stands
        log.info("batch %s was ingested by another process", batch_id)
        return
    except OperationalError as exc:
        session.rollback()  # the store is down: leave it validating, the scheduler resumes it
        log.warning("ingesting batch %s stopped: the store failed (%s)", batch_id, exc)
        return
    except Exception as exc:
        session.rollback()
        log.exception("ingesting batch %s failed", batch_id)
        _fail(batch_id, [batch_error("internal_error", str(exc)[:500])])
        return
    finally:
        session.close()
    poke()  # this process's dispatcher sends the first lines now
    for model, ids in result.by_model.items():
        JOBS_SUBMITTED.labels(model, "batch").inc(len(ids))
    _enqueue(batch_id, result, settings)


def interrupted_ingests(session: Session, t: float, settings: Settings) -> list[str]:
    """Batches `validating` for longer than batch_stale_validation_s without a single line
    stored: the process ingesting them died (the lines are inserted in one transaction)."""
    has_lines = select(Job.id).where(Job.batch_id == Batch.id).exists()
    stmt = select(Batch.id).where(
        Batch.status == VALIDATING,
        Batch.created_at < t - settings.batch_stale_validation_s,
        ~has_lines,
    )
    return list(session.scalars(stmt.order_by(Batch.id)))


def resume_interrupted_ingests(settings: Settings | None = None) -> int:
    """Ingest again every interrupted batch (a housekeeping step of the scheduler). A batch
    whose input file is gone fails with input_file_missing. Returns how many were resumed."""
    settings = settings or get_settings()
    with session_scope() as session:
        ids = interrupted_ingests(session, now(), settings)
    for batch_id in ids:
        log.warning("batch %s: its ingest was interrupted; resuming it", batch_id)
        ingest_batch(batch_id)
    return len(ids)


def _enqueue(batch_id: str, result: Ingested, settings: Settings) -> None:
    if result.followers:
        with session_scope() as session:
            resolve_followers(session, batch_id)  # lines that match a cached job finish now
    # If this process dies here, the batch stays `validating` and advance_batch starts it once
    # it is stale (see state._recover_validating); its lines are held either way.
    with session_scope() as session:
        start_batch(session, batch_id, now())
    log.info("batch %s: %d lines held for the dispatcher", batch_id, result.total)
