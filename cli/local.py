"""`lmqueue up`: the whole stack on one machine with embedded defaults.

SQLite in the data dir, an embedded Redis when none answers, a demo model built locally when no
model is configured; then the API, one worker per model, Flower and the scheduler as children.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cli.embedded import EmbeddedRedis, ensure_redis
from cli.supervisor import Supervisor
from lmqueue.commands import flower_argv
from lmqueue.migrate import upgrade_head
from lmqueue.registry import get_registry
from lmqueue.settings import get_settings, reset_settings

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0


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
    try:
        check_ports(port or settings.api_port, flower)
    except PortInUse as exc:
        if embedded is not None:
            embedded.stop()
        print(f"lmqueue: {exc}", file=sys.stderr)
        return 2
    upgrade_head(database_url)
    return _supervise(env, port or settings.api_port, flower, workers, embedded)


class PortInUse(Exception):
    pass


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_ports(api_port: int, flower: bool) -> None:
    """Every port the stack will listen on is free, or PortInUse names it and its setting."""
    s = get_settings()
    wanted = [(api_port, "the API", "--port or LMQUEUE_API_PORT")]
    if flower:
        wanted.append((s.flower_port, "Flower", "LMQUEUE_FLOWER_PORT, or --no-flower"))
    if s.scheduler_metrics_port:
        what = "LMQUEUE_SCHEDULER_METRICS_PORT (0 turns it off)"
        wanted.append((s.scheduler_metrics_port, "the scheduler's metrics", what))
    for port, name, setting in wanted:
        if not port_free(port):
            raise PortInUse(
                f"port {port} ({name}) is already in use, perhaps by another lmqueue stack: "
                f"stop it, or choose another port with {setting}"
            )


def _wait_ready(sup: Supervisor, port: int, flower_port: int | None, timeout_s: float) -> bool:
    """Wait until the API answers /healthz and Flower listens, so "lmqueue is up" is true.
    False if a child exited or we were asked to stop first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not sup.stopping.is_set():
        if sup.exited():
            return False
        flower_up = flower_port is None or not port_free(flower_port)
        if flower_up and _healthy(f"http://127.0.0.1:{port}/healthz"):
            return True
        sup.stopping.wait(0.25)
    return False


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _supervise(
    env: dict[str, str], port: int, flower: bool, workers: int, embedded: EmbeddedRedis | None
) -> int:
    settings = get_settings()
    sup = Supervisor(env)
    sup.handle_signals()
    try:
        sup.spawn("api", [sys.executable, "-m", "cli", "api", "--port", str(port)])
        if flower:
            sup.spawn("flower", flower_argv(settings.flower_port, task_events=settings.task_events))
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
        if _wait_ready(sup, port, settings.flower_port if flower else None, READY_TIMEOUT_S):
            print(
                f"lmqueue is up: API http://127.0.0.1:{port}  "
                + (f"Flower http://127.0.0.1:{settings.flower_port}  " if flower else "")
                + "(Ctrl-C stops everything)",
                flush=True,
            )
        exited = sup.wait()
        if exited:
            log.error("%s exited; stopping the stack", exited)
        elif sup.signal_name:
            log.warning("%s: stopping the stack", sup.signal_name)
        return 0 if exited is None else 1
    finally:
        sup.stop()
        if embedded is not None:
            embedded.stop()
