"""Celery configuration shared by producers and workers, and the producer-side app.

The producer app has no tasks registered: it only sends messages by task name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError

from lmqueue.contract import (
    PRIORITY_SEP,
    PRIORITY_STEPS,
    TASK_PROCESS_JOBS,
    TASK_SEMANTIC_LOOKUP,
    ProcessJobs,
    batch_task_id,
    celery_priority,
    describe_job_ids,
    queue_name,
    redis_key_prefix,
)
from lmqueue.settings import Settings, get_settings

log = logging.getLogger(__name__)

PUBLISH_PIPELINE = 500  # Redis commands buffered per pipelined round trip
# What a send raises when Redis is down or unreachable.
BROKER_ERRORS: tuple[type[BaseException], ...] = (KombuOperationalError, redis.RedisError, OSError)
# A send while Redis is down gives up after a second or two: the caller has stored the job and
# the scheduler's recovery sweep sends it once Redis is back, so there is no point waiting long
# (but a busy Redis still gets a few tries).
PUBLISH_RETRY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.3, "interval_max": 1.0}


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # Above the longest allowed job so a running job is never redelivered meanwhile.
            "visibility_timeout": settings.visibility_timeout_s,
            "queue_order_strategy": "priority",
            "priority_steps": PRIORITY_STEPS,
            "sep": PRIORITY_SEP,
            # One namespace per deployment: stacks sharing a Redis never share a queue.
            "global_keyprefix": redis_key_prefix(settings),
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,  # the result store is the database, not a Celery backend
        "task_acks_late": True,
        "task_acks_on_failure_or_timeout": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,  # never hoard: the backlog must stay visible in Redis
        "task_default_queue": f"{settings.queue_prefix}.default",
        "task_create_missing_queues": True,
        # Flower shows each request's task and state (LMQUEUE_TASK_EVENTS; off, Flower still
        # lists the workers: Celery sends their heartbeats either way).
        "worker_send_task_events": settings.task_events,
        # Off by default: Flower shows a request from the moment a worker receives it, the
        # queues' depth from Redis; a sent event per message costs the API ~20% per submit.
        "task_send_sent_event": settings.flower_sent_events,
        "task_track_started": True,
        "task_publish_retry_policy": PUBLISH_RETRY,
    }


_producer: Celery | None = None


def producer_app() -> Celery:
    global _producer
    if _producer is None:
        _producer = Celery("lmqueue-producer")
        _producer.conf.update(celery_config(get_settings()))
    return _producer


def reset_producer() -> None:
    global _producer
    _producer = None


def enqueue_jobs(
    model: str,
    job_ids: Sequence[str],
    priority: int,
    app: Celery | None = None,
    producer: Any = None,
    task_id: str | None = None,
) -> str:
    """Send one message for `job_ids` (all of `model`) to the model's queue; returns the task id.

    `producer`: a kombu Producer to reuse (bulk batches pass one inside `producer.batch()`, so
    thousands of messages go to Redis in a few pipelined round trips).
    """
    payload = ProcessJobs(job_ids=list(job_ids))
    result = (app or producer_app()).send_task(
        TASK_PROCESS_JOBS,
        kwargs=payload.model_dump(),
        queue=queue_name(model),
        priority=celery_priority(priority),
        producer=producer,
        task_id=task_id,
        # Flower cuts arguments at ~1 KB: show every job of the message in a compact form.
        argsrepr="()",
        kwargsrepr=f"{{'job_ids': '{describe_job_ids(payload.job_ids)}'}}",
    )
    return str(result.id)


def send_semantic_lookup(
    embedder: str, job_ids: Sequence[str], priority: int, task_id: str | None = None
) -> str:
    """Send jobs to the embedding model `embedder` for a semantic-cache lookup (it sends them
    on to their own queue on a miss)."""
    result = producer_app().send_task(
        TASK_SEMANTIC_LOOKUP,
        kwargs=ProcessJobs(job_ids=list(job_ids)).model_dump(),
        queue=queue_name(embedder),
        priority=celery_priority(priority),
        task_id=task_id,
    )
    return str(result.id)


def try_enqueue(model: str, job_ids: Sequence[str], priority: int) -> str | None:
    """enqueue_jobs, or None when Redis cannot take the message now. Only for jobs already
    committed to the store: their message is sent by recovery (scheduler.recovery) later."""
    try:
        return enqueue_jobs(model, job_ids, priority)
    except BROKER_ERRORS as exc:
        log.warning("the queue is unreachable (%s); recovery will send %s", exc, job_ids[0])
        return None


def redis_reachable(url: str, timeout_s: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def enqueue_in_messages(
    by_model: Mapping[str, Sequence[str]], per: int, priority: int, batch_id: str | None = None
) -> int:
    """Send the jobs of each model in messages of `per` ids, in order. With `batch_id`, message
    k of the m-th model has task id batch_task_id(batch_id, m, k). Returns the number of
    messages."""
    messages = [
        (model, ids[i : i + per], batch_task_id(batch_id, m, k) if batch_id else None)
        for m, (model, ids) in enumerate(by_model.items())
        for k, i in enumerate(range(0, len(ids), per))
    ]
    return enqueue_messages(messages, priority)


def enqueue_messages(
    messages: Sequence[tuple[str, Sequence[str], str | None]], priority: int
) -> int:
    """Send (model, job ids, task id or None) messages through one producer whose publishes
    are pipelined to Redis (kombu's Producer.batch): one round trip per message would cost more
    than validating and inserting a batch's lines. Returns the number of messages."""
    app = producer_app()
    with app.producer_or_acquire() as producer, _pipelined(producer):
        for model, ids, task_id in messages:
            enqueue_jobs(model, ids, priority, app, producer, task_id)
    return len(messages)


def _pipelined(producer: Any) -> AbstractContextManager[Any]:
    batch = getattr(producer, "batch", None)  # kombu >= 5.7; older ones publish one by one
    return batch(PUBLISH_PIPELINE) if batch is not None else nullcontext()
