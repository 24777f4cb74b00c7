"""The semantic cache's lookup, run by the worker of the embedding model a generation model
names in `semantic_cache` (task TASK_SEMANTIC_LOOKUP, sent by the API on an exact-cache miss).

For each job: embed its prompt with this worker's model, search the nearest cached prompts of
the same scope (tenant, model revision, parameters) in a usearch index, and answer the job
from the best one above the model's threshold that passes the guards (lmqueue.semantic).
Otherwise record the prompt's vector (it becomes a usable entry once its job succeeds) and send
the job on to its own model's queue. The vectors live in the store (semantic_entries); each
worker keeps one in-memory index per scope and adds the rows it has not seen before a search.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from usearch.index import Index

from lmqueue import cache, semantic
from lmqueue.broker import enqueue_jobs
from lmqueue.contract import TASK_SEMANTIC_LOOKUP, ProcessJobs
from lmqueue.db import session_scope
from lmqueue.registry import get_model
from lmqueue.schemas import EMBEDDINGS
from lmqueue.settings import get_settings
from lmqueue.tables import Job, JobStatus, SemanticEntry, now
from lmqueue.transitions import answer_from_cache, mark_enqueued
from worker.celery_app import app
from worker.runtime import get_runtime

log = logging.getLogger(__name__)
NEIGHBOURS = 8  # candidates checked against the store and the guards, best first


@dataclass
class ScopeIndex:
    index: Index
    last_id: int = 0
    job_of: dict[int, str] = field(default_factory=dict)


class Indexes:
    """One usearch index (cosine) per scope, caught up from the store before each search."""

    def __init__(self) -> None:
        self._by_scope: dict[str, ScopeIndex] = {}
        self._lock = threading.Lock()  # Celery runs tasks in threads

    def search(self, session: Session, scope: str, vector: list[float]) -> list[tuple[str, float]]:
        """[(job id, cosine similarity)] of the nearest recorded prompts, best first."""
        with self._lock:
            ix = self._sync(session, scope, len(vector))
            if len(ix.index) == 0:
                return []
            found = ix.index.search(np.asarray(vector, dtype=np.float32), NEIGHBOURS)
            return [
                (ix.job_of[int(k)], 1.0 - float(d))
                for k, d in zip(found.keys, found.distances, strict=True)
            ]

    def _sync(self, session: Session, scope: str, ndim: int) -> ScopeIndex:
        ix = self._by_scope.get(scope)
        if ix is None:
            ix = self._by_scope[scope] = ScopeIndex(Index(ndim=ndim, metric="cos"))
        rows = session.execute(
            select(SemanticEntry.id, SemanticEntry.job_id, SemanticEntry.vector)
            .where(SemanticEntry.scope == scope, SemanticEntry.id > ix.last_id)
            .order_by(SemanticEntry.id)
        ).all()
        if rows:
            keys = np.asarray([r[0] for r in rows], dtype=np.uint64)
            ix.index.add(keys, np.asarray([r[2] for r in rows], dtype=np.float32))
            ix.job_of.update({int(r[0]): str(r[1]) for r in rows})
            ix.last_id = int(rows[-1][0])
        return ix


INDEXES = Indexes()


def _embed(text: str) -> list[float]:
    runtime = get_runtime()
    backend: Any = runtime.backend
    engine = backend.engine  # an EmbedBackend: this worker serves the embedding model
    request = engine.request(EMBEDDINGS, {"model": engine.name or "embedder", "input": text})
    # On the loop's thread, between its steps: the one thread that runs the model.
    vector: list[float] = runtime.loop.call(lambda: engine.embed([request])[0].embeddings[0])
    return vector


def _best(session: Session, job: Job, text: str, found: list[tuple[str, float]]) -> Any:
    """The best live neighbour above the threshold that passes the guards, or None."""
    spec, settings = get_model(job.model), get_settings()
    ids = [j for j, sim in found if sim >= spec.semantic_threshold]
    if not ids:
        return None
    live = {
        j.id: j
        for j in session.scalars(select(Job).where(Job.id.in_(ids), Job.owner == job.owner))
        if j.status == JobStatus.SUCCEEDED
        and j.cache_key is not None
        and (j.finished_at or 0) >= now() - settings.cache_ttl_s
    }
    for job_id, sim in found:
        cand = live.get(job_id)
        if cand is not None and semantic.guards_pass(
            text, semantic.prompt_text(cand.endpoint, cand.body)
        ):
            return cand, sim
    return None


def lookup_one(job_id: str) -> bool:
    """True when answered from the cache; False when sent on (or no longer queued)."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != JobStatus.QUEUED:
            return False
        spec = get_model(job.model)
        text = semantic.prompt_text(job.endpoint, job.body)
        scope = semantic.scope(
            job.owner, spec, job.endpoint, cache.canonical(job.endpoint, job.body)[1]
        )
    vector = _embed(text)
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != JobStatus.QUEUED:
            return False
        best = _best(session, job, text, INDEXES.search(session, scope, vector))
        if best is not None:
            source, sim = best
            answer_from_cache(
                session, job, source, {"kind": "semantic", "similarity": round(sim, 4)}
            )
            cache.count(job.model, "semantic", True)
            return True
        session.add(SemanticEntry(scope=scope, job_id=job.id, vector=vector, created_at=now()))
        model, priority = job.model, job.priority
    cache.count(model, "semantic", False)
    enqueue_jobs(model, [job_id], priority)
    with session_scope() as session:
        mark_enqueued(session, [job_id])
    return False


@app.task(
    name=TASK_SEMANTIC_LOOKUP,
    acks_late=True,
    autoretry_for=(OperationalError, RedisError),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=8,
)
def semantic_lookup(job_ids: list[str]) -> dict[str, int]:
    payload = ProcessJobs(job_ids=job_ids)
    hits = sum(lookup_one(j) for j in payload.job_ids)
    return {"hits": hits, "sent": len(payload.job_ids) - hits}
