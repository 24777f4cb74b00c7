"""The loop's writer thread: stores finished jobs' outcomes, grouped (whatever finished while
the previous transaction ran goes into the next one), then releases the task threads waiting on
them, so each message is acked once all its jobs are stored. `Waiting` (a job a task thread
offered, and the future its thread waits on) lives here because the loop and the writer both
pass it; `worker.loop` re-exports it."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from lmqueue.db import session_scope
from lmqueue.transitions import Outcome, store_outcomes

log = logging.getLogger(__name__)
# Waits between attempts 0.5, 1, 2 ... 30, 30 s: about 90 s of store outage is ridden out
# before the results are given up (their leases lapse; recovery runs the jobs again).
STORE_ATTEMPTS = 9

OutcomeHook = Callable[[list[Outcome], list["Waiting"]], None]


@dataclass
class Waiting:
    """A job offered by a task thread, not yet claimed."""

    job_id: str
    endpoint: str
    request: Any  # the backend's prepared request, or the RequestError preparing it raised
    priority: int = 5
    created_at: float | None = None
    enqueued_at: float | None = None  # when it last entered the queue (the admission order)
    deadline_at: float | None = None
    done: Future[None] = field(default_factory=Future)
    started_at: float | None = None
    seq: int = 0


def resolve(w: Waiting) -> None:
    """Release the task thread waiting on `w` (its message may be acked)."""
    if not w.done.done():
        w.done.set_result(None)


class ResultWriter:
    def __init__(
        self, worker: str, on_outcomes: OutcomeHook, on_stored: Callable[[int], None]
    ) -> None:
        self.worker, self.on_outcomes, self.on_stored = worker, on_outcomes, on_stored
        self._writes: queue.Queue[tuple[list[Outcome], list[Waiting]] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="result-writer", daemon=True)

    def put(self, outcomes: list[Outcome], items: list[Waiting]) -> None:
        self._writes.put((outcomes, items))

    def close(self, timeout_s: float) -> None:
        """Store what is queued, then end the thread."""
        self._writes.put(None)
        self.thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            first = self._writes.get()
            if first is None:
                return
            outcomes, items = list(first[0]), list(first[1])
            while True:  # take whatever else finished meanwhile: one transaction for all
                try:
                    more = self._writes.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._writes.put(None)
                    break
                outcomes += more[0]
                items += more[1]
            self._store(outcomes, items)

    def _store(self, outcomes: list[Outcome], items: list[Waiting]) -> None:
        for attempt in range(STORE_ATTEMPTS):
            try:
                with session_scope() as session:
                    store_outcomes(session, outcomes, self.worker)
                break
            except Exception:  # the store is down: retry, the leases outlive the wait
                log.exception("storing %d results failed (attempt %d)", len(outcomes), attempt)
                if attempt + 1 < STORE_ATTEMPTS:  # no wait after the last one: nothing follows
                    time.sleep(min(30.0, 0.5 * 2**attempt))
        else:
            log.error(
                "gave up storing %d results: their leases lapse and recovery runs them again",
                len(outcomes),
            )
        # The loop first: it may be waiting for these slots to claim the next jobs, and the
        # task threads released next (acks, the next messages) would hold the GIL meanwhile.
        self.on_stored(len(items))
        try:
            self.on_outcomes(outcomes, items)
        except Exception:
            log.exception("outcome hook failed")
        for w in items:
            resolve(w)
