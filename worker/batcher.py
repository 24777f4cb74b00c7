"""A micro-batcher: requests arriving within `max_wait_ms` of the first are merged, up to
`max_batch_size`, and handed to one handler call on a dedicated thread.

Celery's threads pool gives each message its own thread; each thread submits its jobs here and
waits on their futures, so the message is acked (acks_late) only after its result is stored.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class WorkItem:
    job_id: str
    endpoint: str
    body: dict[str, Any]
    deadline_at: float | None = None
    created_at: float | None = None  # for the latency metrics
    started_at: float | None = None
    future: Future[None] = field(default_factory=Future)


Handler = Callable[[list[WorkItem]], None]


class MicroBatcher:
    def __init__(self, handler: Handler, max_batch_size: int, max_wait_ms: int) -> None:
        self._handler = handler
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.Queue[WorkItem | None] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, item: WorkItem) -> Future[None]:
        if self._stopping.is_set():
            raise RuntimeError("the micro-batcher is shutting down")
        self._queue.put(item)
        return item.future

    def stop(self, timeout_s: float = 60.0) -> None:
        """Finish what was submitted, then end the thread."""
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _collect(self, first: WorkItem) -> tuple[list[WorkItem], bool]:
        batch, stop_seen = [first], False
        deadline = time.monotonic() + self._max_wait_s
        while len(batch) < self._max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is None:
                stop_seen = True
                break
            batch.append(item)
        return batch, stop_seen

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                if self._queue.empty():
                    return
                continue  # drain what is left before stopping
            batch, stop_seen = self._collect(first)
            self._run(batch)
            if stop_seen:
                self._queue.put(None)

    def _run(self, batch: list[WorkItem]) -> None:
        try:
            self._handler(batch)
        except BaseException as exc:  # the handler failed as a whole: fail every waiter
            log.exception("micro-batch of %d failed", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        for item in batch:
            if not item.future.done():
                item.future.set_result(None)
