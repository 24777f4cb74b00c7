"""Helpers for the scheduler tests: submit many jobs straight to a stack's store and queue (an
HTTP round trip per job would dominate a few-thousand-job test), and point this process's
lmqueue settings at a stack for in-process calls."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cli.stack import Stack
from lmqueue.broker import celery_config, reset_producer
from lmqueue.contract import TASK_PROCESS_JOBS, celery_priority
from lmqueue.db import dispose_engines
from lmqueue.settings import Settings, reset_settings
from lmqueue.tables import Job, JobStatus, new_id
from lmqueue.transitions import mark_enqueued


def producer_for(stack: Stack) -> Celery:
    app = Celery("test-producer")
    app.conf.update(celery_config(stack.settings()))
    return app


def submit_many(
    stack: Stack, model: str, n: int, max_tokens: int = 2, app: Celery | None = None
) -> list[str]:
    """n queued jobs in the store, one message each, as the API sends them: committed, sent,
    then stamped `enqueued_at`, in chunks so no job waits long between commit and message."""
    app = app or producer_for(stack)
    ids: list[str] = []
    with Session(stack.engine) as session, app.producer_or_acquire() as producer:
        for start in range(0, n, 100):
            jobs = [
                Job(
                    id=new_id("job"),
                    model=model,
                    endpoint="/v1/completions",
                    body={
                        "model": model,
                        "prompt": f"job {i}: def f(x):",
                        "max_tokens": max_tokens,
                        "temperature": 0,
                    },
                    priority=5,
                )
                for i in range(start, min(n, start + 100))
            ]
            session.add_all(jobs)
            session.commit()
            chunk = [j.id for j in jobs]
            for job_id in chunk:
                app.send_task(
                    TASK_PROCESS_JOBS,
                    kwargs={"job_ids": [job_id]},
                    queue=stack.queue(model),
                    priority=celery_priority(5),
                    producer=producer,
                )
            mark_enqueued(session, chunk)
            session.commit()
            ids += chunk
    return ids


def status_counts(stack: Stack, ids: list[str]) -> dict[str, int]:
    with Session(stack.engine) as session:
        rows = session.execute(
            select(Job.status, func.count()).where(Job.id.in_(ids)).group_by(Job.status)
        ).all()
    return {str(s): int(n) for s, n in rows}


def all_done(stack: Stack, ids: list[str]) -> bool:
    counts = status_counts(stack, ids)
    return sum(counts.get(s, 0) for s in JobStatus.TERMINAL) == len(ids)


@contextmanager
def settings_for(stack: Stack, **env: str) -> Iterator[Settings]:
    """Make this process's get_settings() (db, Redis, queue prefix, models) match the stack."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update({**stack.env, **env})
    reset_settings()
    reset_producer()
    dispose_engines()
    try:
        from lmqueue.settings import get_settings

        yield get_settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
        reset_settings()
        reset_producer()
        dispose_engines()
