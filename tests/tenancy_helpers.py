"""Helpers for the tenancy tests: batches of a given key put straight into a real store."""

from __future__ import annotations

import json

from sqlalchemy import func, select, update

from lmqueue import files as fs
from lmqueue.batches.create import new_batch
from lmqueue.batches.ingest import ingest_batch
from lmqueue.db import session_scope
from lmqueue.settings import get_settings
from lmqueue.tables import Job, JobStatus, now


def input_bytes(n: int, model: str, prefix: str = "req", max_tokens: int = 2) -> bytes:
    lines = []
    for i in range(n):
        body = {"model": model, "prompt": f"say {i}", "max_tokens": max_tokens}
        line = {"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/completions"}
        lines.append(json.dumps({**line, "body": body}).encode() + b"\n")
    return b"".join(lines)


def upload(owner: str, data: bytes, expires_after: int | None = None) -> str:
    sink = fs.UploadSink(fs.files_dir(), 10**9)
    sink.write(data)
    with session_scope() as session:
        f = fs.store_upload(
            session,
            sink,
            owner=owner,
            filename="in.jsonl",
            purpose="batch",
            expires_after=expires_after,
        )
        return f.id


def make_batch(owner: str, n: int, model: str, window: str = "24h", prefix: str = "req") -> str:
    """An ingested batch of `n` lines of `owner` (its lines held for the dispatcher)."""
    file_id = upload(owner, input_bytes(n, model, prefix))
    with session_scope() as session:
        batch = new_batch(
            owner=owner,
            input_file_id=file_id,
            endpoint="/v1/completions",
            completion_window=window,
            metadata=None,
            settings=get_settings(),
        )
        session.add(batch)
        batch_id = batch.id
    ingest_batch(batch_id)
    return batch_id


def finish(ids: list[str], status: str = JobStatus.SUCCEEDED, at: float | None = None) -> None:
    """What a worker would store (the test plays the worker)."""
    if not ids:
        return
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_(ids))
            .values(status=status, finished_at=at or now(), result={"ok": True})
        )


def open_lines(batch_id: str) -> int:
    with session_scope() as session:
        stmt = select(func.count()).where(Job.batch_id == batch_id, Job.status.in_(JobStatus.OPEN))
        return int(session.scalar(stmt) or 0)


def job_ids(batch_id: str) -> list[str]:
    with session_scope() as session:
        return list(
            session.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.id))
        )
