"""The scheduler's housekeeping: the retention purge (lmqueue.retention), every
`purge_interval_s`, or at the next tick while a bounded pass left rows behind."""

from __future__ import annotations

import logging

from lmqueue.db import session_scope
from lmqueue.retention import PurgeReport, purge, stored_bytes
from lmqueue.settings import Settings
from scheduler import metrics

log = logging.getLogger(__name__)


class Housekeeper:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._next = 0.0

    def run_once(self, t: float) -> PurgeReport | None:
        """Purge if due; returns the report of the pass, or None when not due."""
        if t < self._next:
            return None
        report = purge(t, self.settings)
        for table, n in report.rows.items():
            metrics.PURGED_ROWS.labels(table).inc(n)
        metrics.PURGED_BYTES.inc(report.bytes_freed)
        with session_scope() as session:
            metrics.FILE_BYTES.set(stored_bytes(session))
        self._next = t if report.more else t + self.settings.purge_interval_s
        return report
