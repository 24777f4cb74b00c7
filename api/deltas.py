"""Reading a job's delta stream (Redis streams, written by the worker's publisher) and waiting
for a job to change, without blocking the event loop."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from fastapi.concurrency import run_in_threadpool

from lmqueue import jobs as q
from lmqueue.contract import DELTA_START, DELTA_TEXT, DELTA_TOKENS, delta_stream_key
from lmqueue.db import session_scope
from lmqueue.settings import get_settings
from lmqueue.tables import Job

_clients: dict[int, aioredis.Redis] = {}


def redis_client() -> aioredis.Redis:
    """One client (and pool) per event loop: an asyncio connection belongs to its loop."""
    loop = id(asyncio.get_running_loop())
    if loop not in _clients:
        _clients[loop] = aioredis.Redis.from_url(get_settings().redis_url)
    return _clients[loop]


@dataclass(frozen=True)
class Delta:
    id: str  # the Redis stream entry id: the SSE event id, in order
    text: str
    completion_tokens: int
    restart: bool  # a worker's first entry for the job (a retry starts the text over)


async def read_deltas(job_id: str, after: str, block_s: float | None) -> list[Delta]:
    """Entries after `after` ("0-0": from the start); waits up to block_s for the first one
    (None: no wait)."""
    key = delta_stream_key(job_id)
    block = None if block_s is None else max(1, int(block_s * 1000))
    reply: Any = await redis_client().xread({key: after}, count=1000, block=block)
    out = []
    for _key, entries in reply or []:
        for entry_id, fields in entries:
            out.append(
                Delta(
                    id=entry_id.decode(),
                    text=fields.get(DELTA_TEXT.encode(), b"").decode("utf-8", "replace"),
                    completion_tokens=int(fields.get(DELTA_TOKENS.encode(), 0)),
                    restart=DELTA_START.encode() in fields,
                )
            )
    return out


def _load(owner: str, job_id: str) -> Job | None:
    with session_scope() as session:
        return q.get_job(session, owner, job_id)


async def load_job(owner: str, job_id: str) -> Job | None:
    return await run_in_threadpool(_load, owner, job_id)


class Poller:
    """Re-read the store at most every `events_poll_s` (deltas wake readers sooner)."""

    def __init__(self, owner: str, job_id: str):
        self.owner, self.job_id = owner, job_id
        self.every = get_settings().events_poll_s
        self._last = 0.0

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every

    async def load(self) -> Job | None:
        self._last = time.monotonic()
        return await load_job(self.owner, self.job_id)
