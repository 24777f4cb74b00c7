"""Process command lines of the queue's consumers (a Celery worker, Flower).

They belong with the queue contract: whoever starts a worker (the CLI, the scheduler's local
backend, the test stack) starts the same process with the same options.
"""

from __future__ import annotations

import logging
import os
import sys

from lmqueue.contract import queue_name
from lmqueue.logs import level_name

CELERY_APP = "worker.celery_app"
MONITOR_APP = "lmqueue.monitor_app"  # Flower's: no task modules, so no torch


def worker_argv(
    model: str, concurrency: int, queue: str | None = None, module: str = "celery"
) -> list[str]:
    """`python -m celery ... worker` for one model's queue. `module` is the program run with
    `python -m`: tests and benches pass a wrapper that installs a stand-in engine first. Below
    INFO (the default) the start banner is left out too: the worker prints one status line."""
    level = level_name("worker")
    quiet = [] if logging.getLevelName(level) <= logging.INFO else ["--quiet"]
    return [
        sys.executable,
        "-m",
        module,
        "-A",
        CELERY_APP,
        *quiet,
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        str(concurrency),
        "--prefetch-multiplier",
        "1",
        "--queues",
        queue or queue_name(model),
        "--hostname",
        f"{model.replace('/', '_')}-%h-{os.getpid()}@%h",
        "--loglevel",
        level,
        "--without-mingle",
        "--without-gossip",
    ]


def flower_argv(port: int, address: str = "127.0.0.1", task_events: bool = True) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        MONITOR_APP,
        "flower",
        f"--port={port}",
        f"--address={address}",
        f"--logging={level_name('flower').lower()}",  # tornado's option: no INFO by default
        # Flower turns the workers' task events on every few seconds unless told not to:
        # LMQUEUE_TASK_EVENTS=false must hold with Flower running too.
        *([] if task_events else ["--enable_events=False"]),
    ]
