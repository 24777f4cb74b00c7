"""The queue contract between producers (API, scheduler) and workers.

Tasks are sent by name: producers never import task code. A message only carries job ids; the
job itself lives in the result store, so a lost message can always be re-sent from the database.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from lmqueue.settings import Settings, get_settings

TASK_PROCESS_JOBS = "lmqueue.process_jobs"
# Sent to the queue of a model's semantic-cache embedder, with a ProcessJobs payload (so the
# reaper reads its job ids like any message): embed the prompt, answer from a near neighbour
# or send the jobs on to their own model's queue.
TASK_SEMANTIC_LOOKUP = "lmqueue.semantic_lookup"

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


# Per-job delta streams (Redis streams): the worker appends one entry per step for each job that
# asked to stream, the API reads them for /v1/jobs/{id}/events and the synchronous endpoints.
DELTA_TEXT = "t"  # the text a step added
DELTA_TOKENS = "n"  # completion tokens so far
DELTA_START = "s"  # present on a worker's first entry for a job: a (re)started attempt


def delta_stream_key(job_id: str, settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    return f"{settings.queue_prefix}:deltas:{job_id}"


# --- what Flower shows ------------------------------------------------------------------------

LINE_DIGITS = 8  # a batch line's job id ends in its line number, 8 hex digits


def batch_task_id(batch_id: str, model_index: int, message_index: int) -> str:
    """The task id of a batch's message: known before it is sent, so every line's row carries
    it from its insert (no UPDATE of 50k rows after sending)."""
    return f"{batch_id}-m{model_index}-{message_index}"


def describe_job_ids(job_ids: list[str]) -> str:
    """A short, complete rendering of a message's job ids for Flower (which cuts task
    arguments at about 1,024 characters): ids sharing a prefix and ending in a hex line number
    (batch lines) become line ranges, e.g. "job_18c...a1b2c3[1-29,31-33] (32 jobs)"."""
    if len(job_ids) == 1:
        return job_ids[0]
    groups: dict[str, list[int]] = {}
    singles: list[str] = []
    for job_id in job_ids:
        head, tail = job_id[:-LINE_DIGITS], job_id[-LINE_DIGITS:]
        try:
            line = int(tail, 16)
        except ValueError:
            singles.append(job_id)
            continue
        groups.setdefault(head, []).append(line)
    parts = singles + [
        f"{head}{lines[0]:08x}" if len(lines) == 1 else f"{head}[{_ranges(sorted(lines))}]"
        for head, lines in groups.items()
    ]
    return f"{' '.join(parts)} ({len(job_ids)} jobs)"


def _ranges(numbers: list[int]) -> str:
    out: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(out)
