"""Expiry and retention: nothing is kept forever.

What goes, oldest first, each kind in transactions of `purge_chunk` rows (short: the API never
waits on a purge), at most `max_chunks` per kind and pass (the caller runs another pass soon
when a kind had more):

- files past `expires_at` (uploads: `expires_after` or `retention_files_s`; a batch's output
  and error files: `output_expires_after` or `retention_outputs_s`), and deleted ones: the row
  and the content on disk;
- the job rows of a finished batch once its output files expired (they are its results);
- finished batches `retention_batches_s` after they finished: the batch, its jobs and files;
- finished single jobs `retention_jobs_s` after they finished.

Open work is never touched: only terminal batches and jobs go.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, delete, exists, func, or_, select
from sqlalchemy.orm import Session

from lmqueue.batches.state import TERMINAL
from lmqueue.db import session_scope
from lmqueue.files import content_path
from lmqueue.settings import Settings
from lmqueue.tables import Batch, FileObject, Job, JobStatus

log = logging.getLogger(__name__)
Rows = dict[str, int]  # table -> rows deleted by one chunk


@dataclass
class PurgeReport:
    rows: Counter[str] = field(default_factory=Counter)  # table -> rows deleted
    bytes_freed: int = 0
    more: bool = False  # some kind hit max_chunks: call again soon


def batch_finished_at() -> ColumnElement[Any]:
    return func.coalesce(Batch.completed_at, Batch.failed_at, Batch.expired_at, Batch.cancelled_at)


def _file_gone(t: float, settings: Settings) -> ColumnElement[bool]:
    default = FileObject.created_at + settings.retention_files_s
    return or_(
        FileObject.deleted_at.is_not(None), func.coalesce(FileObject.expires_at, default) <= t
    )


def _purge_files(session: Session, t: float, settings: Settings, report: PurgeReport) -> Rows:
    rows = session.execute(
        select(FileObject.id, FileObject.storage_path, FileObject.bytes, FileObject.deleted_at)
        .where(_file_gone(t, settings))
        .limit(settings.purge_chunk)
    ).all()
    if not rows:
        return {}
    session.execute(delete(FileObject).where(FileObject.id.in_([r[0] for r in rows])))
    session.commit()  # the rows are gone before the content: never a row without its file
    for file_id, path, size, _deleted_at in rows:
        if path:
            on_disk = content_path(FileObject(id=file_id, storage_path=path), settings)
            if on_disk.exists():
                on_disk.unlink(missing_ok=True)
                report.bytes_freed += size or 0
    return {"files": len(rows)}


def _batch_jobs(session: Session, batch_ids: list[str], chunk: int) -> int:
    ids = session.scalars(select(Job.id).where(Job.batch_id.in_(batch_ids)).limit(chunk)).all()
    if ids:
        session.execute(delete(Job).where(Job.id.in_(list(ids))))
    return len(ids)


def _purge_results(session: Session, t: float, settings: Settings, report: PurgeReport) -> Rows:
    """The jobs of finished batches whose output files expired."""
    ttl = func.coalesce(Batch.output_expires_after_s, settings.retention_outputs_s)
    batch_ids = session.scalars(
        select(Batch.id)
        .where(
            Batch.status.in_(TERMINAL),
            batch_finished_at() + ttl <= t,
            exists().where(Job.batch_id == Batch.id),
        )
        .limit(100)
    ).all()
    return {"jobs": _batch_jobs(session, list(batch_ids), settings.purge_chunk) if batch_ids else 0}


def _purge_batches(session: Session, t: float, settings: Settings, report: PurgeReport) -> Rows:
    """Finished batches past retention: their jobs first (chunk by chunk), then the batch and
    its generated files' rows (their content is rendered, never on disk)."""
    batch_ids = list(
        session.scalars(
            select(Batch.id)
            .where(
                Batch.status.in_(TERMINAL),
                batch_finished_at() <= t - settings.retention_batches_s,
            )
            .limit(100)
        )
    )
    if not batch_ids:
        return {}
    n = _batch_jobs(session, batch_ids, settings.purge_chunk)
    if n:
        return {"jobs": n}
    files = session.execute(delete(FileObject).where(FileObject.source_batch_id.in_(batch_ids)))
    session.execute(delete(Batch).where(Batch.id.in_(batch_ids)))
    return {"batches": len(batch_ids), "files": int(files.rowcount)}  # type: ignore[attr-defined]


def _purge_jobs(session: Session, t: float, settings: Settings, report: PurgeReport) -> Rows:
    ids = session.scalars(
        select(Job.id)
        .where(
            Job.finished_at <= t - settings.retention_jobs_s,
            Job.batch_id.is_(None),
            Job.status.in_(JobStatus.TERMINAL),
        )
        .limit(settings.purge_chunk)
    ).all()
    if ids:
        session.execute(delete(Job).where(Job.id.in_(list(ids))))
    return {"jobs": len(ids)}


Step = Callable[[Session, float, Settings, PurgeReport], Rows]
STEPS: tuple[Step, ...] = (_purge_files, _purge_results, _purge_batches, _purge_jobs)


def purge(t: float, settings: Settings, max_chunks: int = 10) -> PurgeReport:
    """One bounded purge pass (see the module docstring); each chunk is its own transaction."""
    report = PurgeReport()
    for step in STEPS:
        for _ in range(max_chunks):
            with session_scope() as session:
                rows = step(session, t, settings, report)
            if not any(rows.values()):
                break
            report.rows.update(rows)
        else:
            report.more = True
    if report.rows:
        log.info("purged %s; %d bytes freed", dict(report.rows), report.bytes_freed)
    return report


def stored_bytes(session: Session) -> int:
    """Bytes of file content on disk (uploads; generated files are rendered)."""
    stmt = select(func.coalesce(func.sum(FileObject.bytes), 0)).where(
        FileObject.storage_path.is_not(None), FileObject.deleted_at.is_(None)
    )
    return int(session.scalar(stmt) or 0)
