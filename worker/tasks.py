"""The one task: process the jobs named in a message (sent by name, TASK_PROCESS_JOBS)."""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy.exc import OperationalError

from lmqueue.contract import TASK_PROCESS_JOBS, ProcessJobs
from lmqueue.db import session_scope
from lmqueue.settings import get_settings
from lmqueue.transitions import claim_jobs
from worker.batcher import WorkItem
from worker.celery_app import app
from worker.runtime import get_runtime

log = logging.getLogger(__name__)


@app.task(
    name=TASK_PROCESS_JOBS,
    bind=True,
    acks_late=True,
    # A database hiccup is transient: retry the message with exponential backoff.
    autoretry_for=(OperationalError, RedisError),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=8,
)
def process_jobs(self: Any, job_ids: list[str]) -> dict[str, int]:
    payload = ProcessJobs(job_ids=job_ids)
    runtime = get_runtime()
    settings = get_settings()
    with session_scope() as session:
        jobs = claim_jobs(session, payload.job_ids, runtime.hostname, settings.lease_s)
        items = [
            WorkItem(j.id, j.endpoint, dict(j.body), j.deadline_at, j.created_at, j.started_at)
            for j in jobs
        ]
    ids = [i.job_id for i in items]
    runtime.track(ids)
    try:
        futures = [runtime.batcher.submit(item) for item in items]
        for future in futures:
            future.result()
    finally:
        runtime.untrack(ids)
    return {"processed": len(items), "skipped": len(payload.job_ids) - len(items)}
