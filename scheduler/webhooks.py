"""The scheduler's webhook thread: collect events from the store, send what is due (and, once
a minute, prune the result cache).

A thread of the scheduler process (light, always running), never the API's request path. It
keeps its own pace (webhook_poll_s) so a slow receiver never delays autoscaling, and sends up
to a few deliveries at once so one slow receiver does not hold up the others.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from lmqueue import cache
from lmqueue.db import session_scope
from lmqueue.settings import Settings
from lmqueue.tables import now
from lmqueue.webhooks.deliver import attempt, lease_due
from lmqueue.webhooks.events import collect_events

log = logging.getLogger(__name__)
PARALLEL = 8
PRUNE_EVERY_S = 60.0


class Dispatcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # No redirects: a redirect could lead a delivery to an address the target check refused.
        self.client = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False)
        self.pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="webhook")
        self._pruned_at = 0.0

    def pass_once(self) -> int:
        """Collect, then send every due delivery; returns how many were attempted."""
        t = now()
        with session_scope() as session:
            collect_events(session, t)
        with session_scope() as session:
            due = lease_due(session, t, self.settings)
        list(self.pool.map(lambda d: attempt(d, self.client, self.settings), due))
        if t - self._pruned_at >= PRUNE_EVERY_S:
            # The result cache's TTL and size bound: the same light, periodic store upkeep.
            with session_scope() as session:
                cache.prune(session, self.settings, t)
            self._pruned_at = t
        return len(due)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.pass_once()
            except Exception:  # the store hiccuped: log, keep going
                log.exception("webhook pass failed")
            stop.wait(max(0.0, self.settings.webhook_poll_s - (time.monotonic() - started)))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()


def start(settings: Settings, stop: threading.Event) -> tuple[threading.Thread, Dispatcher]:
    dispatcher = Dispatcher(settings)
    thread = threading.Thread(target=dispatcher.run, args=(stop,), name="webhooks", daemon=True)
    thread.start()
    return thread, dispatcher
