"""`lmqueue scheduler` (or `python -m scheduler.main`): the autoscaler and reaper process.

Light at import time: the CLI imports this module to register its subcommand.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
import threading
from typing import Any

log = logging.getLogger("lmqueue.scheduler")


def build_scheduler(pool: bool = False) -> Any:
    import redis

    from lmqueue.contract import queue_name
    from lmqueue.registry import get_registry
    from lmqueue.settings import get_settings
    from scheduler.backends import make_backend
    from scheduler.loop import Scheduler
    from scheduler.recovery import Reaper

    settings = get_settings()
    models = sorted(get_registry())
    queues = {m: queue_name(m, settings) for m in models}
    client = redis.Redis.from_url(settings.redis_url)
    if pool:
        from scheduler.pool_main import build_pool

        return build_pool(settings, client, queues)
    backends = {m: make_backend(m, settings) for m in models}
    return Scheduler(settings, client, backends, queues, Reaper(settings, client, queues))


def run(pool: bool = False) -> int:
    from lmqueue.batches.dispatch import Pump
    from lmqueue.logs import setup_logging, status
    from lmqueue.settings import get_settings
    from scheduler import metrics, webhooks

    setup_logging("scheduler")
    settings = get_settings()
    scheduler = build_scheduler(pool)
    pump = Pump(settings)  # meters batch lines into Redis (lmqueue.batches.dispatch)
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping the scheduler", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # `kill -USR1 <pid>` writes every thread's stack to the log: a stuck pass can be read.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        metrics.serve(settings.scheduler_metrics_port)
        status(
            "%s started: backend %s, models %s, workers %d..%d, every %ss",
            "pool" if pool else "scheduler",
            "local (host pool)" if pool else settings.scheduler_backend,
            ", ".join(scheduler.queues) or "(none)",
            settings.scheduler_min_workers,
            settings.scheduler_max_workers,
            settings.scheduler_interval_s,
        )
        pump.start()
        hooks, dispatcher = webhooks.start(settings, stop)
        scheduler.run(stop)
        hooks.join(timeout=settings.webhook_timeout_s + 5)
        dispatcher.close()
        return 0
    finally:
        pump.close()
        scheduler.close()


def add_scheduler_commands(sub: Any) -> None:
    """Register `lmqueue scheduler` on the CLI's subparsers."""
    p = sub.add_parser("scheduler", help="autoscale workers on queue depth and recover jobs")
    p.set_defaults(fn=lambda _args: run())
    p = sub.add_parser(
        "pool",
        help="a per-host worker pool: workers on this host's GPUs (one each), scaled on backlog",
    )
    p.set_defaults(fn=lambda _args: run(pool=True))


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="lmqueue scheduler", description=__doc__).parse_args(argv)
    return run()


if __name__ == "__main__":
    sys.exit(main())
