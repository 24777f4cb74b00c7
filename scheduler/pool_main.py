"""`lmqueue pool`: the per-host worker pool, assembled (see scheduler/pool.py).

A scheduler whose backends are local, bounded by this host's GPUs, whose workers are forked
from a pre-imported template (LMQUEUE_POOL_FORK), and with no reaper: recovery and batch
advancing run in the light `lmqueue scheduler` (LMQUEUE_SCHEDULER_BACKEND=none) beside it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import redis

from lmqueue.registry import get_registry
from lmqueue.settings import Settings
from scheduler.backends.local import LocalBackend, Spawner, _popen
from scheduler.loop import Scheduler
from scheduler.pool import host_places

log = logging.getLogger(__name__)


def build_pool(settings: Settings, client: redis.Redis, queues: Mapping[str, str]) -> Scheduler:
    registry = get_registry()
    places = host_places(settings)
    per_gpu = {m: registry[m].workers_per_gpu if places.has_gpus else 1 for m in queues}
    # No model asks for more workers than the host has places for.
    most = len(places) * max(per_gpu.values(), default=1)
    settings = settings.model_copy(
        update={"scheduler_max_workers": min(settings.scheduler_max_workers, most)}
    )
    spawn: Spawner = _popen
    closers = []
    if settings.pool_fork:
        from scheduler.forking import TemplateSpawner

        forker = TemplateSpawner()
        forker.start()  # pay the imports now, before the first backlog
        spawn, closers = forker, [forker.close]
    backends = {
        m: LocalBackend(m, settings, q, spawn=spawn, places=places, per_place=per_gpu[m])
        for m, q in queues.items()
    }
    log.info("pool: %s", places.describe())
    scheduler = Scheduler(settings, client, backends, queues, reaper=None)
    scheduler.on_close.extend(closers)
    return scheduler
