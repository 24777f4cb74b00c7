"""`lmqueue scheduler` (or `python -m scheduler.main`): the autoscaler and reaper process.

Light at import time: the CLI imports this module to register its subcommand.
"""

from __future__ import annotations

import argparse
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
    from lmqueue.settings import get_settings
    from scheduler import metrics

    settings = get_settings()
    scheduler = build_scheduler(pool)
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping the scheduler", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        metrics.serve(settings.scheduler_metrics_port)
        log.info(
            "%s started: backend %s, models %s, workers %d..%d, every %ss",
            "pool" if pool else "scheduler",
            "local (host pool)" if pool else settings.scheduler_backend,
            ", ".join(scheduler.queues) or "(none)",
            settings.scheduler_min_workers,
            settings.scheduler_max_workers,
            settings.scheduler_interval_s,
        )
        scheduler.run(stop)
        return 0
    finally:
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    argparse.ArgumentParser(prog="lmqueue scheduler", description=__doc__).parse_args(argv)
    return run()


if __name__ == "__main__":
    sys.exit(main())
