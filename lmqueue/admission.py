"""Admission control: refuse work beyond a maximum of open (queued + running) jobs per key and
per model.

Counts come from the store (queued + running jobs, on indexes (owner, status) and
(status, model)) and are cached for `admission_cache_s`; each admitted job bumps the cached count,
so one API process never overshoots by more than what other replicas admit within that window.
A refusal says when to retry, from the model's measured drain rate (jobs finished in the last
minute).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lmqueue.settings import Settings
from lmqueue.tables import Job, JobStatus

DRAIN_WINDOW_S = 60.0
NO_DRAIN_RETRY_S = 60  # nothing finished lately (no worker yet?): ask again in a minute
MAX_RETRY_S = 3600


def open_jobs_of_owner(session: Session, owner: str) -> int:
    """A key's open single jobs: its batch lines have their own quotas (lmqueue.quotas)."""
    stmt = select(func.count()).where(
        Job.owner == owner, Job.status.in_(JobStatus.OPEN), Job.batch_id.is_(None)
    )
    return int(session.scalar(stmt) or 0)


def open_jobs_of_model(session: Session, model: str) -> int:
    stmt = select(func.count()).where(Job.status.in_(JobStatus.OPEN), Job.model == model)
    return int(session.scalar(stmt) or 0)


def drain_rate(session: Session, model: str, window_s: float = DRAIN_WINDOW_S) -> float:
    """Jobs of `model` finished per second over the last `window_s` (index (model, finished_at))."""
    since = time.time() - window_s
    stmt = select(func.count()).where(Job.model == model, Job.finished_at >= since)
    return int(session.scalar(stmt) or 0) / window_s


def retry_after_s(excess: int, rate_per_s: float) -> int:
    """Seconds until `excess` jobs have drained at `rate_per_s`, within [1, MAX_RETRY_S]."""
    if rate_per_s <= 0:
        return NO_DRAIN_RETRY_S
    return max(1, min(MAX_RETRY_S, math.ceil(excess / rate_per_s)))


@dataclass(frozen=True)
class Rejection:
    limit: str  # "key" or "model": which limit is reached
    message: str
    retry_after_s: int


class Admission:
    """Per-process admission state: briefly cached open-job counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], tuple[int, float]] = {}

    def _count(self, session: Session, kind: str, name: str, ttl_s: float) -> int:
        key = (kind, name)
        with self._lock:
            cached = self._counts.get(key)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        n = (
            open_jobs_of_owner(session, name)
            if kind == "key"
            else open_jobs_of_model(session, name)
        )
        with self._lock:
            self._counts[key] = (n, time.monotonic() + ttl_s)
        return n

    def check(
        self, session: Session, settings: Settings, owner: str, model: str, n: int = 1
    ) -> Rejection | None:
        """None if `n` more jobs of `owner` for `model` fit; else why not and when to retry."""
        ttl = settings.admission_cache_s
        limits = (
            ("key", owner, settings.max_open_jobs_per_key, "this API key"),
            ("model", model, settings.max_open_jobs_per_model, f"model {model!r}"),
        )
        for kind, name, limit, what in limits:
            if not limit:
                continue
            open_jobs = self._count(session, kind, name, ttl)
            if open_jobs + n > limit:
                wait = retry_after_s(open_jobs + n - limit, drain_rate(session, model))
                message = (
                    f"{what} has {open_jobs} jobs queued or running; the limit is {limit}. "
                    f"Retry in about {wait} s"
                )
                return Rejection(kind, message, wait)
        return None

    def admitted(self, owner: str, model: str, n: int = 1) -> None:
        """Count jobs just created, so the cached counts stay right until they expire."""
        with self._lock:
            for key in (("key", owner), ("model", model)):
                if key in self._counts:
                    count, expires = self._counts[key]
                    self._counts[key] = (count + n, expires)

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()
