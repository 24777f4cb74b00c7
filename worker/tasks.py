"""The one task: offer the jobs named in a message to this worker's loop (TASK_PROCESS_JOBS).

The task thread reads the jobs (no claim), tokenizes them, and puts them on the loop's bounded
waiting list; what does not fit is re-sent to the same queue for other workers. The message is
acked (acks_late) once every job it kept is stored, failed or skipped.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy.exc import OperationalError

from lmqueue.contract import TASK_PROCESS_JOBS, ProcessJobs
from lmqueue.db import session_scope
from lmqueue.jobs import offered_jobs, unknown_job_ids
from lmqueue.settings import get_settings
from worker.celery_app import app
from worker.metrics import UNKNOWN_JOBS
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
    # Read only: no held_at stamp here. The message's unacked entry is fresh for the reaper's
    # whole grace (kombu stamps its delivery), and the watcher stamps the jobs a worker holds
    # every grace/4 (worker.runtime): a write per message here cost a job ~0.8 ms of CPU.
    with session_scope() as session:
        items = [runtime.waiting_item(job) for job in offered_jobs(session, payload.job_ids)]
        if len(items) < len(payload.job_ids):
            _note_unknown(unknown_job_ids(session, payload.job_ids))
    taken, overflow = runtime.loop.offer(items)
    if overflow:
        _resend(self, [w.job_id for w in overflow])
    for item in taken:
        item.done.result()
    return {
        "offered": len(taken),
        "resent": len(overflow),
        # Finished, cancelled, or already held by this worker (a re-sent message's copy).
        "skipped": len(payload.job_ids) - len(taken) - len(overflow),
    }


def _note_unknown(ids: list[str]) -> None:
    """Skipping a finished job is normal (a re-sent message); an id the store has never seen
    means this worker reads a queue another deployment also feeds: say so loudly."""
    if not ids:
        return
    model = get_settings().worker_model
    UNKNOWN_JOBS.labels(model).inc(len(ids))
    log.warning(
        "%d job id(s) unknown to this worker's store (e.g. %s): is another deployment using "
        "this Redis with the same LMQUEUE_DEPLOYMENT?",
        len(ids),
        ids[0],
    )


def _resend(task: Any, job_ids: list[str]) -> None:
    """Give jobs this worker has no room for back to the queue they came from."""
    info = task.request.delivery_info or {}
    app.send_task(
        TASK_PROCESS_JOBS,
        kwargs=ProcessJobs(job_ids=job_ids).model_dump(),
        queue=info.get("routing_key") or None,
        priority=info.get("priority"),
    )
    log.info("re-sent %d jobs this worker has no room for", len(job_ids))
