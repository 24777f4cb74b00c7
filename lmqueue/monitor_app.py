"""The Celery app Flower loads (`celery -A lmqueue.monitor_app flower`).

Flower imports its app's task modules at start. The worker's app lists `worker.tasks`, which
imports torch: Flower runs in the light image (no torch), so it gets the producer app, which
has the same broker settings and no task modules (tasks are sent by name).
"""

from __future__ import annotations

from lmqueue.broker import producer_app

app = producer_app()
