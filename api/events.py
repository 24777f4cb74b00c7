"""Server-sent event streams of one job and of one batch (framed by sse-starlette).

Job: `queued`, `running`, `delta`..., then `done` (the final job object) or `error`. Ids are
"queued", "running", the Redis stream entry id of each delta, and "end": they are ordered, so a
client that reconnects with Last-Event-ID gets exactly the events after it, and one that comes
late gets the whole story so far (the deltas are kept in Redis, bounded and with a TTL).

Batch: `progress` (request_counts) and `line` (custom_id, status) in completion order, then
`done` with the final batch object. Each id carries the last line sent and the counts sent, so
a reconnect resumes after that line and re-sends progress only if it changed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.concurrency import run_in_threadpool

from api.deltas import Delta, Poller, read_deltas
from api.errors import APIError
from lmqueue import jobs as q
from lmqueue.batches.state import TERMINAL as BATCH_TERMINAL
from lmqueue.batches.views import finished_lines, get_batch, view_batches
from lmqueue.db import session_scope
from lmqueue.settings import get_settings
from lmqueue.tables import Job, JobStatus

Event = dict[str, Any]  # what sse-starlette frames: event, id, data

QUEUED, RUNNING, END = "queued", "running", "end"
_SETTLE_S = 1.0  # a line is sent once its store transaction has surely committed (see below)


def event(name: str, event_id: str, data: Any) -> Event:
    return {"event": name, "id": event_id, "data": json.dumps(data, separators=(",", ":"))}


def _bad_last_id(value: str) -> APIError:
    return APIError(
        400, f"Last-Event-ID: not an id of this stream: {value!r}", param="Last-Event-ID"
    )


# --- one job ----------------------------------------------------------------------------------


@dataclass
class JobCursor:
    stage: int = 0  # 0 nothing sent, 1 queued sent, 2 running sent, 3 everything sent
    after: str = "0-0"  # the last delta sent

    @classmethod
    def parse(cls, last_id: str | None) -> JobCursor:
        if not last_id:
            return cls()
        if last_id in (QUEUED, RUNNING, END):
            return cls(stage={QUEUED: 1, RUNNING: 2, END: 3}[last_id])
        ms, _, seq = last_id.partition("-")
        if not (ms.isdigit() and seq.isdigit()):
            raise _bad_last_id(last_id)
        return cls(stage=2, after=last_id)


def _delta_event(d: Delta) -> Event:
    data: dict[str, Any] = {"text": d.text, "completion_tokens": d.completion_tokens}
    if d.restart:
        data["start"] = True  # a (re)started attempt: the text starts here
    return event("delta", d.id, data)


def _final_event(job: Job) -> Event:
    body = q.job_to_dict(job)
    if job.status == JobStatus.SUCCEEDED:
        return event("done", END, body)
    return event("error", END, {"error": job.error, "job": body})


def _started(job: Job) -> bool:
    return job.status == JobStatus.RUNNING or (
        job.status in JobStatus.TERMINAL and job.started_at is not None
    )


async def job_events(owner: str, job: Job, cur: JobCursor) -> AsyncIterator[Event]:
    """Deltas come from Redis (XREAD BLOCK wakes at once); states from the store, re-read at
    most every events_poll_s. The worker publishes a step's deltas before it stores the
    results, so once the store says finished, draining the stream gets every delta."""
    poll = Poller(owner, job.id)
    if cur.stage >= 3:
        return
    if cur.stage < 1:
        yield event(QUEUED, QUEUED, q.job_to_dict(job))
        cur.stage = 1
    while True:
        terminal = job.status in JobStatus.TERMINAL
        if cur.stage < 2 and _started(job):
            yield event(RUNNING, RUNNING, q.job_to_dict(job))
            cur.stage = 2
        deltas = await read_deltas(job.id, cur.after, None if terminal else poll.every)
        if deltas and cur.stage < 2:  # the store was read before the worker claimed it
            job = await poll.load() or job
            yield event(RUNNING, RUNNING, q.job_to_dict(job))
            cur.stage = 2
        for d in deltas:
            yield _delta_event(d)
            cur.after = d.id
        if terminal and not deltas:
            yield _final_event(job)
            return
        if not terminal and poll.due():
            job = await poll.load() or job


# --- one batch --------------------------------------------------------------------------------


@dataclass
class BatchCursor:
    at: float = -1.0  # the last line sent: finished_at and job id
    job_id: str = ""
    counts: str = ""  # the request_counts sent last, "completed.failed.total"

    def encode(self) -> str:
        return f"{self.at!r}~{self.job_id}~{self.counts}"

    @classmethod
    def parse(cls, last_id: str | None) -> BatchCursor:
        if not last_id:
            return cls()
        if last_id == END:
            return cls(at=float("inf"))
        try:
            at, job_id, counts = last_id.split("~")
            return cls(float(at), job_id, counts)
        except ValueError as exc:
            raise _bad_last_id(last_id) from exc


def _counts_key(batch: dict[str, Any]) -> str:
    c = batch["request_counts"]
    return f"{c['completed']}.{c['failed']}.{c['total']}"


def _batch_step(
    owner: str, batch_id: str, cur: BatchCursor
) -> tuple[dict[str, Any], list[tuple[float, str, str | None, str]]] | None:
    """The batch object now and the lines finished since the cursor (one transaction)."""
    with session_scope() as session:
        batch = get_batch(session, owner, batch_id)
        if batch is None:
            return None
        view = view_batches(session, [batch])[0]
        # Until the batch ends, only lines older than the settle time: a store transaction
        # that commits after a later one is still seen before the cursor passes it.
        until = None if view["status"] in BATCH_TERMINAL else time.time() - _SETTLE_S
        after = (cur.at, cur.job_id) if cur.at >= 0 else None
        return view, finished_lines(session, batch_id, after, until)


async def batch_events(owner: str, batch_id: str, cur: BatchCursor) -> AsyncIterator[Event]:
    every = get_settings().events_poll_s
    if cur.at == float("inf"):
        return
    while True:
        step = await run_in_threadpool(_batch_step, owner, batch_id, cur)
        if step is None:
            return
        view, lines = step
        for at, job_id, custom_id, status in lines:
            cur.at, cur.job_id = at, job_id
            data = {"custom_id": custom_id, "status": status, "job_id": job_id}
            yield event("line", cur.encode(), data)
        if len(lines) >= 1000:
            continue  # more are waiting
        if _counts_key(view) != cur.counts:
            cur.counts = _counts_key(view)
            yield event("progress", cur.encode(), {"request_counts": view["request_counts"]})
        if view["status"] in BATCH_TERMINAL:
            yield event("done", END, view)
            return
        await asyncio.sleep(every)
