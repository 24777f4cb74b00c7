"""Ingest a batch: validate its input file in one streaming pass and insert one job per line in
bulk, held: the dispatcher (lmqueue.batches.dispatch) meters them into Redis, fairly between
API keys.

Runs after POST /v1/batches has answered (a FastAPI background task), or directly (tests).
All job rows are inserted in ONE transaction, chunk by chunk as the file is read: a file with
an invalid line rolls back, so nothing is enqueued, and memory stays flat whatever the size.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Table, insert
from sqlalchemy.orm import Session

from lmqueue.batches.state import VALIDATING, fail_batch, record_ingested, start_batch
from lmqueue.db import get_sessionmaker, session_scope
from lmqueue.errors import batch_error
from lmqueue.files import content_path
from lmqueue.jsonl import LineError, validate_file
from lmqueue.quotas import line_cost
from lmqueue.settings import Settings, get_settings
from lmqueue.tables import Batch, FileObject, Job, JobStatus, now

log = logging.getLogger(__name__)

INSERT_CHUNK = 1000
# Core insert (executemany): no ORM unit-of-work per row.
JOBS: Table = Job.__table__  # type: ignore[assignment]


def job_id_prefix() -> str:
    """Shared by all lines of one batch: the creation time in ms and 3 random bytes."""
    return f"job_{int(now() * 1000):012x}{os.urandom(3).hex()}"


def line_job_id(prefix: str, line_no: int) -> str:
    """Job ids sort in input line order, so outputs and result pages come in file order."""
    return f"{prefix}{line_no:08x}"


@dataclass
class Ingested:
    total: int = 0
    by_model: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    errors: list[dict[str, Any]] = field(default_factory=list)


def _insert_lines(session: Session, batch: Batch, path: Path, settings: Settings) -> Ingested:
    """Validate every line; insert the valid ones in chunks until the first invalid one, then
    only collect errors (up to batch_max_errors). The caller commits or rolls back."""
    out = Ingested()
    prefix, t = job_id_prefix(), now()
    rows: list[dict[str, Any]] = []
    lines = validate_file(
        path,
        batch.endpoint,
        max_lines=settings.batch_max_lines,
        max_line_bytes=settings.max_request_bytes,
    )
    for item in lines:
        if isinstance(item, LineError):
            out.errors.append(item.as_dict())
            rows = []
            if len(out.errors) >= settings.batch_max_errors:
                break
            continue
        if out.errors:
            continue  # keep reading only to report the other invalid lines
        job_id = line_job_id(prefix, item.line_no)
        rows.append(
            _row(
                batch,
                job_id,
                item.line_no,
                item.custom_id,
                item.model,
                item.body,
                t,
                settings.batch_priority,
            )
        )
        out.by_model[item.model].append(job_id)
        out.total += 1
        if len(rows) >= INSERT_CHUNK:
            session.execute(insert(JOBS), rows)
            rows = []
    if rows and not out.errors:
        session.execute(insert(JOBS), rows)
    return out


def _row(
    batch: Batch,
    job_id: str,
    line_no: int,
    custom_id: str,
    model: str,
    body: dict[str, Any],
    t: float,
    priority: int,
) -> dict[str, Any]:
    return {
        "id": job_id,
        "owner": batch.owner,
        "model": model,
        "endpoint": batch.endpoint,
        "body": body,
        "status": JobStatus.QUEUED,
        "priority": priority,
        "batch_id": batch.id,
        "custom_id": custom_id,
        "line_no": line_no,
        "created_at": t,
        # Held: no message yet. The dispatcher stamps enqueued_at when it sends the line.
        "enqueued_at": None,
        "attempts": 0,
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
    except Exception as exc:
        session.rollback()
        log.exception("ingesting batch %s failed", batch_id)
        _fail(batch_id, [batch_error("internal_error", str(exc)[:500])])
        return
    finally:
        session.close()
    # If this process dies here, the batch stays `validating` and advance_batch starts it once
    # it is stale (see state._recover_validating); its lines are held either way.
    with session_scope() as session:
        start_batch(session, batch_id, now())
    log.info("batch %s: %d lines held for the dispatcher", batch_id, result.total)
