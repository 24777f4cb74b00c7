"""Per-process worker state: the loaded backend, the continuous loop, and the threads that keep
the store informed (heartbeat with lease renewal, the cancellation watcher).

Loaded once per worker process at start (before it consumes), so an unknown or unloadable
model fails the worker at start with a clear message, not every job.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy.dialects import postgresql, sqlite

from lmqueue.db import get_engine, session_scope
from lmqueue.jobs import jobs_to_drop
from lmqueue.logs import component_level
from lmqueue.registry import ModelSpec, get_model, get_registry
from lmqueue.settings import Settings, get_settings
from lmqueue.tables import Job, WorkerRecord, now
from lmqueue.transitions import mark_held, renew_leases
from worker.backends.base import Backend
from worker.backends.embed import EmbedBackend
from worker.embedding import EmbedEngine
from worker.engine import Engine, PrefixPolicy
from worker.gen_types import RequestError
from worker.loading import load_engine
from worker.loop import Waiting, WorkerLoop
from worker.loop_metrics import StepMetrics, record_outcomes
from worker.metrics import MODEL_LOAD_TIME, start_worker_metrics
from worker.publisher import StreamPublisher

log = logging.getLogger(__name__)
T = TypeVar("T")


def served_model_name(settings: Settings) -> str:
    if settings.worker_model:
        return settings.worker_model
    names = sorted(get_registry())
    if len(names) != 1:
        raise RuntimeError(
            f"set LMQUEUE_WORKER_MODEL to one of: {', '.join(names) or '(no models configured)'}"
        )
    return names[0]


BackendFactory = Callable[[ModelSpec], Backend]
_backend_factory: BackendFactory | None = None


def set_backend_factory(factory: BackendFactory | None) -> None:
    """Serve every model with `factory(spec)` instead of loading weights. Only benchmarks and
    tests call this, in a worker process they start through their own entry module; nothing in
    settings or the registry can select it."""
    global _backend_factory
    _backend_factory = factory


def make_backend(spec: ModelSpec, settings: Settings) -> Backend:
    if _backend_factory is not None:
        return _backend_factory(spec)
    slots = spec.batch_size(settings)
    engine = load_engine(spec)
    if isinstance(engine, EmbedEngine):
        return EmbedBackend(engine, slots, spec.batch_tokens(settings))
    assert isinstance(engine, Engine)
    engine.prefix_policy = PrefixPolicy(
        min_tokens=settings.prefix_min_tokens or 10**9, min_rows=settings.prefix_min_rows
    )
    engine.prefill_max_waste = settings.prefill_max_waste
    engine.packed_steps = engine.packed_steps and settings.packed_steps
    if spec.engine == "hf-paged":
        from worker.backends.hf_paged import HFPagedBackend

        return HFPagedBackend(engine, slots, spec.prefill_tokens(settings))
    return engine.slots(slots, spec.prefill_tokens(settings), settings.admit_batch)


@dataclass
class WorkerRuntime:
    spec: ModelSpec
    hostname: str
    backend: Backend
    loop: WorkerLoop
    _stop: threading.Event = field(default_factory=threading.Event)

    def waiting_item(self, job: Job) -> Waiting:
        """A job read from the store, its body prepared once (in the task thread)."""
        try:
            request: object = self.backend.prepare(job.endpoint, dict(job.body))
        except RequestError as exc:
            request = exc
        except Exception as exc:  # never let one bad body fail its batch-mates
            log.exception("preparing job %s failed", job.id)
            request = RequestError("prepare_failed", f"the request could not be prepared: {exc}")
        return Waiting(
            job.id,
            job.endpoint,
            request,
            priority=job.priority,
            created_at=job.created_at,
            enqueued_at=job.enqueued_at,
            deadline_at=job.deadline_at,
        )

    def start_threads(self, settings: Settings) -> None:
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._watch_loop, "watcher")):
            threading.Thread(target=target, args=(settings,), name=name, daemon=True).start()

    def _heartbeat_loop(self, settings: Settings) -> None:
        while not self._stop.wait(settings.heartbeat_s):
            try:
                with session_scope() as session:
                    renew_leases(session, self.loop.running_ids(), self.hostname, settings.lease_s)
                    _upsert_worker(session, self, status="up")
            except Exception:  # a missed beat is retried next time; leases outlive several
                log.exception("heartbeat failed")

    def _watch_loop(self, settings: Settings) -> None:
        """Tell the loop which of its jobs the store took back (cancel, batch end, timeout),
        and stamp the jobs it holds unclaimed (mark_held) well within the reaper's grace, so
        their messages are never taken for lost, however short the grace is set."""
        stamp_every = max(settings.cancel_poll_s, settings.recovery_grace_s / 4)
        stamped = 0.0
        while not self._stop.wait(settings.cancel_poll_s):
            running, waiting = self.loop.running_ids(), self.loop.waiting_ids()
            if not (running or waiting):
                continue
            try:
                with session_scope() as session:
                    drop = jobs_to_drop(session, running, waiting, self.hostname)
                    t = time.time()
                    if waiting and t - stamped >= stamp_every:
                        mark_held(session, waiting, t)
                        stamped = t
            except Exception:
                log.exception("cancellation check failed")
                continue
            if drop:
                self.loop.cancel(drop)

    def stop(self) -> None:
        self.loop.stop()
        self._stop.set()
        close = getattr(self.backend, "close", None)
        if close is not None:  # hf-paged: end the manager's (non-daemon) thread, or exit hangs
            close()
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


def in_passing_thread(fn: Callable[[], T]) -> T:
    """Run `fn` in a thread that ends with it; return what it returned, raise what it raised.

    Why: libgomp (torch's CPU thread pool) keeps a pool of threads for every thread that ever
    ran a parallel region, and once it manages more threads than there are CPUs it cuts its
    spin-waiting short, so every barrier of the slot loop's many small ops sleeps and wakes
    (measured: the loop 25-35% slower in its thread once the main thread had run the model).
    Loading in a thread that ends leaves the loop's thread the only pool."""
    # One worker thread, joined on leaving the block (its exception re-raised by result()).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load") as pool:
        return pool.submit(fn).result()


_runtime: WorkerRuntime | None = None


def start_runtime(celery_hostname: str) -> WorkerRuntime:
    global _runtime
    settings = get_settings()
    spec = get_model(served_model_name(settings))
    if settings.worker_metrics_port:
        start_worker_metrics(settings.worker_metrics_host, settings.worker_metrics_port)
    if component_level("worker") > logging.INFO:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars in every worker's output
    t0 = time.perf_counter()
    backend = in_passing_thread(lambda: make_backend(spec, settings))
    MODEL_LOAD_TIME.labels(spec.name).set(time.perf_counter() - t0)
    hostname = f"{celery_hostname}/{os.getpid()}"
    loop = WorkerLoop(
        backend,
        spec.name,
        hostname,
        settings.lease_s,
        hold=settings.hold_jobs(spec.batch_size(settings)),
        on_token=StreamPublisher.from_settings(settings),
        on_outcomes=lambda outcomes, items: record_outcomes(spec.name, outcomes, items),
        on_step=StepMetrics(spec.name, getattr(backend, "stats", None)),
    )
    _runtime = WorkerRuntime(spec=spec, hostname=hostname, backend=backend, loop=loop)
    loop.start()
    with session_scope() as session:
        _upsert_worker(session, _runtime, status="up")
    _runtime.start_threads(settings)
    log.info("worker %s serves %s", hostname, spec.name)
    return _runtime


def get_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("worker runtime not started")
    return _runtime


def stop_runtime() -> None:
    if _runtime is not None:
        _runtime.stop()
