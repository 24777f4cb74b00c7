"""`lmqueue up`: the whole stack on one machine with embedded defaults.

SQLite in the data dir, an embedded Redis when none answers, a demo model built locally when no
model is configured; then the API, one worker per model, Flower and the scheduler as children.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from cli.embedded import EmbeddedRedis, ensure_redis
from cli.supervisor import Supervisor
from lmqueue.commands import flower_argv
from lmqueue.migrate import upgrade_head
from lmqueue.registry import get_registry
from lmqueue.settings import get_settings, reset_settings

log = logging.getLogger(__name__)


def ensure_demo_model(data_dir: Path) -> str:
    """Build (once) the small random-weight demo model; returns its LMQUEUE_MODELS entry."""
    path = (data_dir / "models" / "demo").resolve()
    if not (path / "lmqueue_demo.json").exists():
        log.info("no model configured: building a small demo model at %s", path)
        subprocess.check_call([sys.executable, "-m", "worker.demo_model", str(path)])
    return f"demo={path}"


def _child_env(redis_url: str, database_url: str, models: str | None) -> dict[str, str]:
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url}
    if models:
        env["LMQUEUE_MODELS"] = models
    # One user on this machine, everything bound to loopback: no API keys unless asked for.
    env.setdefault("LMQUEUE_AUTH_ENABLED", "false")
    return env


def run_local_stack(port: int | None, flower: bool, workers: int) -> int:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    redis_url, embedded = ensure_redis(settings.redis_url, settings.embedded_redis)
    models = None if get_registry() else ensure_demo_model(settings.data_dir)
    database_url = settings.resolved_database_url()
    env = _child_env(redis_url, database_url, models)
    os.environ.update(env)
    reset_settings()
    upgrade_head(database_url)
    return _supervise(env, port or settings.api_port, flower, workers, embedded)


def _supervise(
    env: dict[str, str], port: int, flower: bool, workers: int, embedded: EmbeddedRedis | None
) -> int:
    settings = get_settings()
    sup = Supervisor(env)
    try:
        sup.spawn("api", [sys.executable, "-m", "cli", "api", "--port", str(port)])
        if flower:
            sup.spawn("flower", flower_argv(settings.flower_port))
        # The scheduler owns the workers: it starts `workers` per model at once and scales up
        # with the backlog. A second, unmanaged worker here would be counted as capacity it
        # cannot see while it loads, and the scheduler would start another on top of it.
        sup.spawn(
            "scheduler",
            [sys.executable, "-m", "cli", "scheduler"],
            env={
                **env,
                "LMQUEUE_SCHEDULER_BACKEND": "local",
                "LMQUEUE_SCHEDULER_MIN_WORKERS": str(workers),
                "LMQUEUE_SCHEDULER_MAX_WORKERS": str(max(workers, settings.scheduler_max_workers)),
            },
        )
        print(
            f"lmqueue is up: API http://127.0.0.1:{port}  "
            + (f"Flower http://127.0.0.1:{settings.flower_port}  " if flower else "")
            + "(Ctrl-C stops everything)",
            flush=True,
        )
        exited = sup.wait()
        if exited:
            log.error("%s exited; stopping the stack", exited)
        return 0 if exited is None else 1
    finally:
        sup.stop()
        if embedded is not None:
            embedded.stop()
