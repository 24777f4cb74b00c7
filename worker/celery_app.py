"""The worker's Celery app. Start it with `lmqueue worker` (threads pool: safe with CUDA)."""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_ready, worker_shutdown

from lmqueue.broker import celery_config
from lmqueue.logs import component_level, quiet_libraries, status
from lmqueue.settings import get_settings

log = logging.getLogger(__name__)

# Before Celery or torch say anything: library chatter (torch, torchao, Celery's root notice)
# only at DEBUG. Celery sets the worker's own level from --loglevel.
quiet_libraries(component_level("worker"))

app = Celery("lmqueue-worker")
app.conf.update(celery_config(get_settings()))
app.conf.imports = ("worker.tasks", "worker.semantic")


@worker_init.connect
def _load_model(sender: Any = None, **_: Any) -> None:
    from worker.runtime import start_runtime

    try:
        start_runtime(getattr(sender, "hostname", None) or "worker")
    except Exception as exc:
        # Celery logs and swallows exceptions from signal handlers, which would leave a worker
        # that consumes jobs it cannot serve. A model that cannot load must stop the worker:
        # say why on stderr and exit non-zero (SystemExit is not swallowed).
        log.exception("worker start failed")
        print(f"lmqueue worker: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from exc


@worker_ready.connect
def _announce(sender: Any = None, **_: Any) -> None:
    # After Celery set up logging (worker_init comes before it): the worker's one start line.
    from worker.runtime import get_runtime

    rt = get_runtime()
    status("worker %s ready: model %s, consuming %s", rt.hostname, rt.spec.name, _queues(sender))


def _queues(consumer: Any) -> str:
    try:
        return ", ".join(q.name for q in consumer.task_consumer.queues)
    except AttributeError:
        return "?"


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    from worker.runtime import stop_runtime

    stop_runtime()
