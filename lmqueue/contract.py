"""The queue contract between producers (API, scheduler) and workers.

Tasks are sent by name: producers never import task code. A message only carries job ids; the
job itself lives in the result store, so a lost message can always be re-sent from the database.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from lmqueue.settings import Settings, get_settings

TASK_PROCESS_JOBS = "lmqueue.process_jobs"

# Redis priority sub-queues: kombu stores priority p of queue Q under "Q" (p=0) or "Q:p".
PRIORITY_STEPS = list(range(10))
PRIORITY_SEP = ":"


class ProcessJobs(BaseModel):
    """Payload of TASK_PROCESS_JOBS: one message may carry several jobs (bulk lines)."""

    job_ids: list[str] = Field(min_length=1, max_length=1024)


def queue_name(model: str, settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    return f"{settings.queue_prefix}.{model}"


def celery_priority(api_priority: int) -> int:
    """API priority is 0-9 with 9 the most urgent; kombu's Redis transport pops 0 first."""
    return 9 - max(0, min(9, api_priority))


def redis_key_prefix(settings: Settings | None = None) -> str:
    """kombu's global key prefix: every Redis key of this deployment starts with it."""
    return f"{(settings or get_settings()).deployment_name()}:"


def redis_queue_keys(queue: str, prefix: str | None = None) -> list[str]:
    """Every Redis list that holds messages of `queue`, one per priority step. `prefix`: the
    deployment's key prefix (None: this process's settings)."""
    pre = redis_key_prefix() if prefix is None else prefix
    return [pre + (queue if p == 0 else f"{queue}{PRIORITY_SEP}{p}") for p in PRIORITY_STEPS]
