"""Worker subprocesses on this machine.

Scale up spawns `celery worker` children for the model's queue. Scale down DRAINS a worker:
it is told to stop consuming (Celery remote control `cancel_consumer`), keeps running until it
holds no task and no running job, and only then gets SIGTERM (Celery's warm shutdown) on its
main pid. A busy worker is never killed to scale down. A child that dies on its own is noticed
on the next poll, reported (so its jobs are recovered at once) and replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import func, select

from lmqueue.commands import worker_argv
from lmqueue.db import session_scope
from lmqueue.fleet import live_workers
from lmqueue.lifeline import SCHEDULER_PID_ENV, die_with_parent, orphaned_scheduler_child
from lmqueue.settings import Settings
from lmqueue.tables import Job, JobStatus, WorkerRecord
from scheduler.backends.base import Backend
from scheduler.pool import Placement, Places

log = logging.getLogger(__name__)


@dataclass
class Child:
    nodename: str  # the Celery node name (--hostname), target of remote control
    proc: WorkerProc
    started_at: float
    draining_since: float | None = None  # cancel_consumer asked
    consumer_cancelled: bool = False  # ... and the worker confirmed
    terminated_at: float | None = None  # SIGTERM sent
    placement: Placement | None = None  # the pool's GPU (or CPU place) it holds

    @property
    def record_hostname(self) -> str:
        """The hostname the worker writes in the `workers` table and in jobs.worker."""
        return f"{self.nodename}/{self.proc.pid}"

    @property
    def retiring(self) -> bool:
        return self.draining_since is not None


class WorkerProc(Protocol):
    """What the backend needs of a worker process: subprocess.Popen, or a forked one
    (scheduler/forking.py)."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


Spawner = Callable[[list[str], dict[str, str]], WorkerProc]


def _popen(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Same process group as the scheduler: a supervisor stopping our group stops them too; and
    # they get SIGTERM (warm shutdown) when the scheduler dies, even by kill -9.
    return subprocess.Popen(argv, env=env, preexec_fn=die_with_parent())  # noqa: PLW1509


class LocalBackend(Backend):
    def __init__(
        self,
        model: str,
        settings: Settings,
        queue: str,
        control: Any = None,
        spawn: Spawner = _popen,
        env: dict[str, str] | None = None,
        places: Places | None = None,
        per_place: int = 1,
    ) -> None:
        super().__init__(model)
        self.settings, self.queue = settings, queue
        self._control = control
        self._spawn_proc = spawn
        self._env = env
        self._places, self._per_place = places, per_place  # None: no device bound (lmqueue up)
        self.children: list[Child] = []
        self._backoff_s = 0.0  # grows while children die young (a model that cannot load)
        self._no_spawn_until = 0.0
        self._orphans: set[str] | None = None  # workers a previous scheduler left: retiring

    # --- the interface ----------------------------------------------------------------------

    def current(self) -> int:
        return len(self._serving()) + self.floor()

    def floor(self) -> int:
        """Live workers of this model that we did not start (e.g. `lmqueue up`'s own), less
        those a previous scheduler left, which we retire."""
        mine = {c.record_hostname for c in self.children} | self._retire_orphans()
        with session_scope() as session:
            hosts = live_workers(session, self.settings, self.model)
        return sum(1 for h in hosts if h not in mine)

    def _retire_orphans(self) -> set[str]:
        """Once, at start: workers on this machine started by a scheduler that is gone (it was
        killed before it could stop them). Nobody would ever scale them down, and counted as
        capacity they would keep our own from starting: warm-shut them down (SIGTERM)."""
        if self._orphans is not None:
            return self._orphans
        self._orphans = set()
        here = f"@{socket.gethostname()}/"
        with session_scope() as session:
            hosts = live_workers(session, self.settings, self.model)
        for host in hosts:
            pid = host.rsplit("/", 1)[-1]
            if here not in host or not pid.isdigit() or not orphaned_scheduler_child(int(pid)):
                continue
            log.warning("retiring worker %s: the scheduler that started it is gone", host)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
            self._orphans.add(host)
        return self._orphans

    def scale_to(self, n: int) -> None:
        serving = self._serving()
        want = max(0, n - self.floor())
        # Backlog came back while workers drain: a draining worker is warm, resume it first.
        for child in [c for c in self.children if c.retiring][: max(0, want - len(serving))]:
            if self._resume(child):
                serving.append(child)
        for _ in range(want - len(serving)):
            if self._spawn() is None:
                break  # backing off, or the host has no free GPU: try again next tick
        for child in self._retire_order(serving)[: max(0, len(serving) - want)]:
            self._start_drain(child)

    def poll(self) -> list[str]:
        lost: list[str] = []
        for child in list(self.children):
            code = child.proc.poll()
            if code is None:
                if child.retiring:
                    self._advance_drain(child)
                continue
            self._forget(child)
            if child.retiring and code == 0:
                log.info("worker %s retired", child.nodename)
                continue
            lost.append(child.record_hostname)  # its jobs are recovered at once
            if child.retiring:
                log.warning("worker %s died while retiring (exit %s)", child.nodename, code)
                continue
            log.warning("worker %s died (exit %s); replacing it", child.nodename, code)
            self._note_crash(child)
            self._spawn()
        return lost

    def _note_crash(self, child: Child) -> None:
        """A child that died before it ever came up (no worker record: say, a model that cannot
        load) backs off replacement, 2 s doubling to 60 s, instead of a tight restart loop."""
        with session_scope() as session:
            came_up = session.get(WorkerRecord, child.record_hostname) is not None
        self._backoff_s = 0.0 if came_up else min(60.0, max(2.0, 2 * self._backoff_s))
        self._no_spawn_until = time.time() + self._backoff_s

    def close(self, timeout_s: float = 30.0) -> None:
        """Warm shutdown for every child: in-flight work finishes, unstarted messages go back."""
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %s ignored SIGTERM; killing it", child.nodename)
                child.proc.kill()
                child.proc.wait()
        for child in list(self.children):
            self._forget(child)

    # --- spawning ---------------------------------------------------------------------------

    def _serving(self) -> list[Child]:
        return [c for c in self.children if not c.retiring]

    def _spawn(self) -> Child | None:
        if time.time() < self._no_spawn_until:
            return None  # backing off after crashes; scale_to tries again next tick
        placement = None
        if self._places is not None:
            placement = self._places.take(self.model, self._per_place)
            if placement is None:
                return None  # every GPU of this host is taken

        argv = worker_argv(self.model, self.settings.effective_concurrency(), queue=self.queue)
        # worker_argv names every worker of this scheduler alike; remote control needs one name.
        safe = self.model.replace("/", "_")
        nodename = f"{safe}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        argv[argv.index("--hostname") + 1] = nodename
        env = {
            **(self._env or os.environ),
            "LMQUEUE_WORKER_MODEL": self.model,
            SCHEDULER_PID_ENV: str(os.getpid()),  # a later scheduler can tell our orphans
        }
        if placement is not None:
            env.update(placement.env(self.settings.worker_metrics_port))
        try:
            proc = self._spawn_proc(argv, env)
        except Exception:
            if placement is not None:
                self._places.give_back(placement)  # type: ignore[union-attr]
            raise
        child = Child(nodename, proc, time.time(), placement=placement)
        self.children.append(child)
        log.info("started worker %s (pid %d) for %s", nodename, child.proc.pid, self.queue)
        return child

    def _forget(self, child: Child) -> None:
        self.children.remove(child)
        if child.placement is not None and self._places is not None:
            self._places.give_back(child.placement)  # its GPU is free (the process is gone)

    # --- retiring ---------------------------------------------------------------------------

    def _running_jobs(self) -> dict[str, int]:
        with session_scope() as session:
            rows = session.execute(
                select(Job.worker, func.count())
                .where(Job.status == JobStatus.RUNNING, Job.model == self.model)
                .group_by(Job.worker)
            ).all()
        return {str(w): int(n) for w, n in rows}

    def _retire_order(self, serving: list[Child]) -> list[Child]:
        """Least busy first; among equals the youngest (it may still be loading its model)."""
        running = self._running_jobs()
        return sorted(serving, key=lambda c: (running.get(c.record_hostname, 0), -c.started_at))

    @property
    def control(self) -> Any:
        if self._control is None:
            from lmqueue.broker import producer_app

            self._control = producer_app().control
        return self._control

    def _start_drain(self, child: Child) -> None:
        child.draining_since = time.time()
        log.info("draining worker %s", child.nodename)
        self._advance_drain(child)

    def _resume(self, child: Child) -> bool:
        """Put a draining worker back in service (before its SIGTERM only)."""
        if child.terminated_at is not None:
            return False
        # Even unconfirmed, the cancel may have reached it: always ask it to consume again.
        replies = self.control.add_consumer(
            self.queue, destination=[child.nodename], reply=True, timeout=1.0
        )
        if not replies:
            return False  # no answer (still loading?): spawn instead, the drain goes on
        child.draining_since, child.consumer_cancelled = None, False
        log.info("worker %s back in service (the backlog returned)", child.nodename)
        return True

    def _advance_drain(self, child: Child) -> None:
        """One step of the drain, never blocking the loop for more than a short reply wait."""
        if child.terminated_at is not None:
            return  # warm shutdown in progress: wait for the exit (poll reaps it)
        if not child.consumer_cancelled:
            # No reply while the worker is still loading its model: ask again next tick.
            replies = self.control.cancel_consumer(
                self.queue, destination=[child.nodename], reply=True, timeout=1.0
            )
            child.consumer_cancelled = bool(replies)
            if not child.consumer_cancelled:
                return
        if self._holds_work(child):
            return
        log.info("worker %s is idle; warm shutdown", child.nodename)
        child.proc.send_signal(signal.SIGTERM)  # the main pid only
        child.terminated_at = time.time()

    def _holds_work(self, child: Child) -> bool:
        """Does the worker still run a task, or hold a running job in the store?"""
        replies = self.control.inspect(destination=[child.nodename], timeout=1.0).active()
        if not replies or child.nodename not in replies:
            return True  # no answer: assume busy, ask again next tick
        if replies[child.nodename]:
            return True
        return self._running_jobs().get(child.record_hostname, 0) > 0
