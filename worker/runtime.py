"""Per-process worker state: the loaded model, the micro-batcher, and the heartbeat thread.

Loaded once per worker process at start (before it consumes), so an unknown or unloadable
model fails the worker at start with a clear message, not every job.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy.dialects import postgresql, sqlite

from lmqueue.db import get_engine, session_scope
from lmqueue.registry import ModelSpec, get_model, get_registry
from lmqueue.settings import Settings, get_settings
from lmqueue.tables import WorkerRecord, now
from lmqueue.transitions import renew_leases
from worker.batcher import MicroBatcher
from worker.engine import Engine, PrefixPolicy
from worker.loading import load_engine
from worker.metrics import MODEL_LOAD_TIME, start_worker_metrics
from worker.runner import BatchRunner

log = logging.getLogger(__name__)


def served_model_name(settings: Settings) -> str:
    if settings.worker_model:
        return settings.worker_model
    names = sorted(get_registry())
    if len(names) != 1:
        raise RuntimeError(
            f"set LMQUEUE_WORKER_MODEL to one of: {', '.join(names) or '(no models configured)'}"
        )
    return names[0]


@dataclass
class WorkerRuntime:
    spec: ModelSpec
    hostname: str
    batcher: MicroBatcher
    in_flight: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def track(self, job_ids: list[str]) -> None:
        with self._lock:
            self.in_flight.update(job_ids)

    def untrack(self, job_ids: list[str]) -> None:
        with self._lock:
            self.in_flight.difference_update(job_ids)

    def start_heartbeat(self, settings: Settings) -> None:
        threading.Thread(
            target=self._heartbeat_loop, args=(settings,), name="heartbeat", daemon=True
        ).start()

    def _heartbeat_loop(self, settings: Settings) -> None:
        while not self._stop.wait(settings.heartbeat_s):
            try:
                with self._lock:
                    ids = list(self.in_flight)
                with session_scope() as session:
                    renew_leases(session, ids, self.hostname, settings.lease_s)
                    _upsert_worker(session, self, status="up")
            except Exception:  # a missed beat is retried next time; leases outlive several
                log.exception("heartbeat failed")

    def stop(self) -> None:
        self.batcher.stop()
        self._stop.set()
        with session_scope() as session:
            _upsert_worker(session, self, status="down")


def _upsert_worker(session: object, rt: WorkerRuntime, status: str) -> None:
    dialect = get_engine().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    t = now()
    stmt = insert(WorkerRecord).values(
        hostname=rt.hostname,
        model=rt.spec.name,
        pid=os.getpid(),
        started_at=t,
        heartbeat_at=t,
        status=status,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["hostname"], set_={"heartbeat_at": t, "status": status}
    )
    session.execute(stmt)  # type: ignore[attr-defined]


_runtime: WorkerRuntime | None = None


def start_runtime(celery_hostname: str) -> WorkerRuntime:
    global _runtime
    settings = get_settings()
    spec = get_model(served_model_name(settings))
    if settings.worker_metrics_port:
        start_worker_metrics(settings.worker_metrics_host, settings.worker_metrics_port)
    t0 = time.perf_counter()
    engine = load_engine(spec)
    MODEL_LOAD_TIME.labels(spec.name).set(time.perf_counter() - t0)
    if isinstance(engine, Engine):
        engine.prefix_policy = PrefixPolicy(
            min_tokens=settings.prefix_min_tokens or 10**9, min_rows=settings.prefix_min_rows
        )
        engine.prefill_max_waste = settings.prefill_max_waste
    hostname = f"{celery_hostname}/{os.getpid()}"
    runner = BatchRunner(
        engine,
        spec.name,
        hostname,
        spec.batch_size(settings),
        spec.batch_tokens(settings),
        settings.bucket_max_waste,
    )
    batcher = MicroBatcher(runner, spec.batch_size(settings), spec.wait_ms(settings))
    _runtime = WorkerRuntime(spec=spec, hostname=hostname, batcher=batcher)
    batcher.start()
    with session_scope() as session:
        _upsert_worker(session, _runtime, status="up")
    _runtime.start_heartbeat(settings)
    log.info("worker %s serves %s", hostname, spec.name)
    return _runtime


def get_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("worker runtime not started")
    return _runtime


def stop_runtime() -> None:
    if _runtime is not None:
        _runtime.stop()
