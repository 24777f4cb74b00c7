"""The worker's continuous loop: one thread per worker process owns the backend and, every step,
drops cancelled and expired rows, admits waiting jobs into free slots, and runs one step.

Celery task threads only *offer* jobs: they land on a bounded waiting list, still `queued` in
the store. A job is claimed (the conditional UPDATE with a lease, `lmqueue.jobs.claim_jobs`) only
when it enters a slot, so a job cancelled or expired while it waits never runs, the store never
shows more jobs `running` than there are slots, and `attempts` counts real starts.

Results are stored as rows finish, by a writer thread that groups them (worker.loop_writer: one
transaction per few milliseconds), then each waiting task thread is released: its message is
acked when all its jobs are stored, failed or skipped. A watcher thread polls the store for
running jobs that were cancelled (by the API, or their batch was cancelled or expired) and hands
them to the loop, which drops them within a step or two.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from lmqueue.db import session_scope
from lmqueue.transitions import Outcome, claim_jobs, time_out
from worker.backends.base import Backend, StepOutput
from worker.gen_types import RequestError, TokenEvent
from worker.loop_parts import StepStats, TokenHook, engine_error, finished_outcome
from worker.loop_writer import ResultWriter, Waiting, resolve

log = logging.getLogger(__name__)
R = TypeVar("R")
# How long admission waits for the writer when rows it is storing are all that keep a group of
# waiting jobs out (they count as running until stored). A write takes milliseconds; not
# waiting leaves those slots empty for a whole step.
STORE_WAIT_S = 0.05
# The longest pause between two admission attempts while the store is unreachable.
STORE_BACKOFF_MAX_S = 5.0


class WorkerLoop:
    def __init__(
        self,
        backend: Backend,
        model: str,
        worker: str,
        lease_s: float,
        hold: int,
        on_token: TokenHook | None = None,
        on_outcomes: Callable[[list[Outcome], list[Waiting]], None] | None = None,
        on_step: Callable[[StepOutput, float], None] | None = None,
    ):
        self.backend, self.model, self.worker, self.lease_s = backend, model, worker, lease_s
        self.hold = max(1, hold)  # jobs held in the waiting list at most
        self.on_token = on_token or (lambda events: None)
        self.on_outcomes = on_outcomes or (lambda outcomes, items: None)
        self.on_step = on_step or (lambda out, seconds: None)
        self.stats = StepStats()
        self._cond = threading.Condition()
        self._waiting: list[Waiting] = []
        self._offering: list[list[Waiting]] = []  # offers blocked until the list has room
        self._running: dict[str, Waiting] = {}
        self._storing = 0  # finished jobs not yet written: still `running` in the store
        self._store_backoff = 0.0  # seconds; grows while the store is unreachable
        self._store_retry_at = 0.0  # monotonic time of the next admission attempt
        self._cancel: set[str] = set()
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._stopping = False
        self._seq = 0
        self._writer = ResultWriter(worker, self.on_outcomes, self._stored)
        self._threads = [
            threading.Thread(target=self._run, name="slot-loop", daemon=True),
            self._writer.thread,
        ]

    # ---- task threads ---------------------------------------------------------------------

    def offer(self, items: list[Waiting]) -> tuple[list[Waiting], list[Waiting]]:
        """Put jobs on the waiting list: blocks until there is room for at least one, then
        returns (taken, overflow). The caller re-sends the overflow to the queue, so one worker
        never holds more than its share.

        A job this loop already holds (waiting or running) is taken and resolved at once: a
        re-sent message (the reaper errs on the side of sending again) must not put a second
        copy on the list, where one claim would start both and leave one never resolved, its
        task never acked and its worker never able to drain."""
        with self._cond:
            self._offering.append(items)  # held, though not listed yet: stamped all the same
            try:
                while len(self._waiting) >= self.hold and not self._stopping:
                    self._cond.wait(0.5)
            finally:
                self._offering = [o for o in self._offering if o is not items]
            if self._stopping:
                raise RuntimeError("the worker is shutting down")
            items = self._without_held(items)
            room = self.hold - len(self._waiting)
            taken, overflow = items[:room], items[room:]
            for item in taken:
                self._seq += 1
                item.seq = self._seq
            self._waiting += taken
            self._cond.notify_all()
        return taken, overflow

    def _without_held(self, items: list[Waiting]) -> list[Waiting]:
        """`items` less the jobs already held here (resolved now: skipped). Under _cond."""
        held = {w.job_id for w in self._waiting} | set(self._running)
        fresh: list[Waiting] = []
        for item in items:
            if item.job_id in held:
                resolve(item)
                continue
            held.add(item.job_id)
            fresh.append(item)
        return fresh

    def running_ids(self) -> list[str]:
        with self._cond:
            return list(self._running)

    def waiting_ids(self) -> list[str]:
        """Jobs this worker holds unclaimed: listed, or in a task thread's offer that waits for
        room (the watcher stamps them all, so the reaper never takes their messages for lost)."""
        with self._cond:
            offered = [w.job_id for items in self._offering for w in items]
            return [w.job_id for w in self._waiting] + offered

    def call(self, fn: Callable[[], R]) -> R:
        """Run `fn` on the loop's thread between two steps and return its result: the model's
        other users (the semantic cache's lookups) compute there too, so one thread alone runs
        torch (see worker.runtime.in_passing_thread for why that matters on CPU)."""
        done: Future[R] = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the worker is shutting down")
            self._calls.append((fn, done))
            self._cond.notify_all()
        return done.result()

    def cancel(self, job_ids: set[str]) -> None:
        """Jobs the store says this worker must drop (cancelled, expired, taken elsewhere)."""
        with self._cond:
            self._cancel |= job_ids
            self._cond.notify_all()

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Finish what is running and waiting, then end the threads."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (self._waiting or self._running) and time.monotonic() < deadline:
                self._cond.wait(0.2)
            self._stopping = True
            self._cond.notify_all()
        self._threads[0].join(max(0.1, deadline - time.monotonic()))
        self._writer.close(max(0.1, deadline - time.monotonic()))

    # ---- the loop thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (
                    self._waiting or self._running or self._cancel or self._calls or self._stopping
                ):
                    self._cond.wait()
                calls, self._calls = self._calls, []
                if self._stopping and not self._running:
                    for _, done in calls:
                        done.set_exception(RuntimeError("the worker is shutting down"))
                    return
                cancels, self._cancel = self._cancel, set()
            _run_calls(calls)
            try:
                if not self._one_step(cancels):
                    with self._cond:  # nothing to compute: wait for work, a cancel or a stop
                        self._cond.wait(0.05)
            except Exception as exc:  # a step that fails as a whole fails its rows only
                log.exception("step failed")
                self._fail_running(f"the inference step failed on this worker: {exc}")

    def _one_step(self, cancels: set[str]) -> bool:
        """Drop, expire, admit, step. False when there was nothing to compute."""
        self._drop(cancels)
        self._expire_and_admit()
        if self.backend.idle():
            return False
        t0 = time.perf_counter()
        out = self.backend.step()
        seconds = time.perf_counter() - t0
        self.stats.record(out, seconds)
        self.on_step(out, seconds)
        if out.events:
            self._publish(out.events)
        if out.finished:
            self._finish([(key, self._outcome(key, res)) for key, res in out.finished])
        for key in out.dropped:
            self._release(key)
        return True

    def _outcome(self, key: str, res: Any) -> Outcome:
        w = self._running.get(key)
        outcome = finished_outcome(key, w.endpoint if w else "", self.model, res)
        if outcome.microbatch_id:  # step numbers are this worker's own
            outcome.microbatch_id = f"{self.worker}:{outcome.microbatch_id}"
        return outcome

    def _drop(self, cancels: set[str]) -> None:
        """Cancelled in the store: leave waiting or running (the store already says why)."""
        if not cancels:
            return
        with self._cond:
            gone = [w for w in self._waiting if w.job_id in cancels]
            self._waiting = [w for w in self._waiting if w.job_id not in cancels]
            self._cond.notify_all()
        for w in gone:
            resolve(w)
        self.backend.cancel(cancels & set(self._running))

    def _expire_and_admit(self) -> None:
        """Both need the store. While it is unreachable they pause, retried with backoff, and
        the running rows keep decoding (the writer holds their results until it is back): an
        outage of the store is no reason to fail work that is computing fine."""
        if time.monotonic() < self._store_retry_at:
            return
        try:
            self._expire()
            self._admit()
        except SQLAlchemyError as exc:
            self._store_backoff = min(STORE_BACKOFF_MAX_S, max(0.25, 2 * self._store_backoff))
            self._store_retry_at = time.monotonic() + self._store_backoff
            log.warning(
                "the store is unreachable; admission paused for %.2f s: %s",
                self._store_backoff,
                str(exc).splitlines()[0],
            )
            return
        self._store_backoff = 0.0

    def _expire(self) -> None:
        """Running jobs past their deadline fail (the timeout transition) and leave their slot
        at the next step."""
        now = time.time()
        with self._cond:
            late = [k for k, w in self._running.items() if w.deadline_at and now > w.deadline_at]
        if late:
            with session_scope() as session:
                time_out(session, now, late)
            self.backend.cancel(late)

    def _admit(self) -> None:
        """Claim as many waiting jobs as the backend has room for, best priority first. Jobs
        finished but not yet written still count: the store never shows more running jobs
        than the worker has slots (when only they keep a group out, wait for the writer)."""
        with self._cond:
            if not self._waiting:
                return
            # Claim in groups while rows decode (SlotEngine.admit_batch): the group is
            # prefilled in one forward.
            group = min(self.backend.admit_batch, len(self._waiting))
            room = self._room()
            if room < group <= room + self._storing:
                self._cond.wait_for(lambda: self._room() >= group, STORE_WAIT_S)
                room = self._room()
            if room <= 0 or not self._waiting or (room < group and not self.backend.idle()):
                return
            self._waiting.sort(key=_admission_order)
            picked, self._waiting = self._waiting[:room], self._waiting[room:]
            self._cond.notify_all()
        now = time.time()
        late = [w.job_id for w in picked if w.deadline_at is not None and now > w.deadline_at]
        try:
            with session_scope() as session:
                if late:  # expired while waiting: fail them instead of starting them
                    time_out(session, now, late)
                ids = [w.job_id for w in picked if w.job_id not in late]
                claimed = {j.id for j in claim_jobs(session, ids, self.worker, self.lease_s)}
        except Exception:  # nothing was claimed: they wait again (their tasks still wait)
            with self._cond:
                self._waiting = picked + self._waiting
            raise
        failed: list[tuple[str, Outcome]] = []
        for w in picked:
            if w.job_id not in claimed:  # finished, cancelled or running elsewhere: skip it
                resolve(w)
                continue
            w.started_at = now
            with self._cond:
                self._running[w.job_id] = w
            err = self._admit_one(w)
            if err is not None:
                failed.append((w.job_id, Outcome(w.job_id, error=err)))
        if failed:
            self._finish(failed)

    def _room(self) -> int:
        return self.backend.capacity() - self._storing

    def _admit_one(self, w: Waiting) -> dict[str, Any] | None:
        if isinstance(w.request, RequestError):
            return self._outcome(w.job_id, w.request).error
        try:
            err = self.backend.admit(w.job_id, w.request)
        except Exception as exc:  # this request's failure, not its batch-mates'
            log.exception("admitting job %s failed", w.job_id)
            return engine_error(f"the request could not start on this worker: {exc}")
        return None if err is None else self._outcome(w.job_id, err).error

    def _finish(self, done: list[tuple[str, Outcome]]) -> None:
        """Hand finished jobs to the writer (a job already finished, e.g. timed out then
        reported by the backend, is written once)."""
        outcomes, items = [], []
        with self._cond:
            for key, outcome in done:
                w = self._running.pop(key, None)
                if w is not None:
                    outcomes.append(outcome)
                    items.append(w)
            self._storing += len(items)
        if items:
            self._writer.put(outcomes, items)

    def _stored(self, n: int) -> None:
        """The writer stored `n` finished jobs: they no longer count as running."""
        with self._cond:
            self._storing -= n
            self._cond.notify_all()

    def _release(self, key: str) -> None:
        with self._cond:
            w = self._running.pop(key, None)
            self._cond.notify_all()
        if w is not None:
            resolve(w)

    def _fail_running(self, message: str) -> None:
        with self._cond:
            keys = list(self._running)
        try:
            self.backend.cancel(keys)
        except Exception:  # the rows fail all the same; the loop thread must not die of it
            log.exception("cancelling %d failed rows failed", len(keys))
        self._finish([(k, Outcome(k, error=engine_error(message))) for k in keys])

    def _publish(self, events: list[TokenEvent]) -> None:
        try:
            self.on_token(events)
        except Exception:  # streaming is best effort: the stored result is the truth
            log.exception("token hook failed")


def _admission_order(w: Waiting) -> tuple[int, float, int]:
    """Best priority first, then first enqueued first: the order the jobs entered the queue
    (the API's submissions, the batch dispatcher's fair share), not the order this worker's
    task threads happened to offer them in (they prepare messages in parallel), so that a job
    sent back to the queue for lack of room keeps its place when it returns."""
    return (-w.priority, w.enqueued_at if w.enqueued_at is not None else float("inf"), w.seq)


def _run_calls(calls: list[tuple[Callable[[], Any], Future[Any]]]) -> None:
    for fn, done in calls:
        try:
            done.set_result(fn())
        except Exception as exc:  # the caller's error, raised in the caller's thread
            done.set_exception(exc)
