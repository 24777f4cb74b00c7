"""Prometheus metrics of the scheduler process (served on `scheduler_metrics_port`)."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

BACKLOG = Gauge(
    "lmqueue_scheduler_backlog",
    "Work per model: waiting + held messages + max(reserved messages, running jobs)",
    ["model"],
)
WORKERS = Gauge(
    "lmqueue_scheduler_workers", "Workers per model: current and desired", ["model", "state"]
)
RECOVERED = Counter(
    "lmqueue_recovered_jobs",
    "Jobs the reaper acted on: worker_lost, lost_message (re-sent); timeout, worker_crashed "
    "(failed)",
    ["reason"],
)
SCALE_ACTIONS = Counter(
    "lmqueue_scheduler_scale_actions", "Scaling actions taken", ["model", "direction"]
)
TICK_SECONDS = Histogram(
    "lmqueue_scheduler_tick_seconds",
    "Duration of one reconcile pass, by part (dead-worker poll, reaper, scaling, housekeeping)",
    ["part"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
TICK_ERRORS = Counter("lmqueue_scheduler_tick_errors", "Reconcile passes that raised")
PURGED_ROWS = Counter(
    "lmqueue_purged_rows", "Rows deleted by retention (files, jobs, batches)", ["table"]
)
PURGED_BYTES = Counter("lmqueue_purged_bytes", "File bytes freed on disk by retention")
FILE_BYTES = Gauge("lmqueue_file_bytes_on_disk", "Bytes of uploaded file content on disk")


def serve(port: int) -> None:
    """Expose /metrics; a taken port is logged, not fatal (scaling matters more)."""
    if not port:
        return
    try:
        start_http_server(port)
        log.info("metrics on :%d/metrics", port)
    except OSError as exc:
        log.error("cannot serve metrics on port %d: %s", port, exc)
