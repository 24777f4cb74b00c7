"""The reconcile loop: every tick, notice dead workers, run the reaper, measure each model's
backlog, decide its worker count, apply it through the backend, record the decision, and purge
what retention says is due (scheduler.housekeeping)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import redis

from lmqueue.db import session_scope
from lmqueue.fleet import WORKER_LOST, mark_workers, record_scaling_event
from lmqueue.jobs import finished_since
from lmqueue.logs import status
from lmqueue.settings import Settings
from scheduler import metrics
from scheduler.backends.base import Backend
from scheduler.backlog import Backlog, measure
from scheduler.housekeeping import Housekeeper
from scheduler.policy import Hysteresis, Limits, desired_workers
from scheduler.recovery import Reaper

log = logging.getLogger(__name__)


def limits_from(settings: Settings) -> Limits:
    return Limits(
        min_workers=settings.scheduler_min_workers,
        max_workers=max(settings.scheduler_min_workers, settings.scheduler_max_workers),
        target_per_worker=settings.scheduler_target_per_worker or settings.effective_concurrency(),
        upscale_delay_s=settings.scheduler_upscale_delay_s,
        downscale_delay_s=settings.scheduler_downscale_delay_s,
    )


SLOW_TICK_S = 2.0  # a pass this long delays dead-worker recovery by as much: say so in the log


class TickTimer:
    """Times the parts of one reconcile pass (a histogram per part, and a log line when the
    pass was slow enough to delay recovery)."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - started
            self.parts[part] = took
            metrics.TICK_SECONDS.labels(part).observe(took)

    def warn_if_slow(self, limit_s: float) -> None:
        total = sum(self.parts.values())
        if total > limit_s:
            spent = ", ".join(f"{p} {s:.2f}s" for p, s in self.parts.items())
            log.warning("slow scheduler pass: %.2fs (%s)", total, spent)


@dataclass(frozen=True)
class Decision:
    model: str
    queue: str
    backlog: Backlog
    current: int
    desired: int
    target: int
    why: str

    @property
    def reason(self) -> str:
        return f"{self.why}; target {self.target} [{self.backlog.describe()}]"

    def key(self) -> tuple[int, int, int, str]:
        """What the decision is, without the backlog figures that change every tick."""
        return (self.current, self.desired, self.target, self.why)


class ModelScaler:
    def __init__(self, model: str, queue: str, backend: Backend, limits: Limits) -> None:
        self.model, self.queue, self.backend, self.limits = model, queue, backend, limits
        self.hysteresis = Hysteresis(limits.upscale_delay_s, limits.downscale_delay_s)
        self._last: tuple[int, int, int, str] | None = None
        self._asked: tuple[int, int] | None = None  # the last (current, target) acted on

    def step(self, backlog: Backlog, t: float) -> Decision:
        current = self.backend.current()
        desired = desired_workers(backlog.total, self.limits)
        target, why = self.hysteresis.decide(t, current, desired)
        floor = self.backend.floor()
        if target < floor:  # workers someone else started: not ours to retire
            target = floor
            why = f"{why}; floor: {floor} worker(s) not started by the scheduler"
        if target == current:
            self._asked = None
        elif self.backend.acts:
            self.backend.scale_to(target)
            if (current, target) == self._asked:
                # The same ask again: the backend could not act (a pool with no free GPU).
                return Decision(self.model, self.queue, backlog, current, desired, target, why)
            self._asked = (current, target)
            direction = "up" if target > current else "down"
            metrics.SCALE_ACTIONS.labels(self.model, direction).inc()
            log.info(
                "%s: %d -> %d workers (%s; %s)",
                self.model,
                current,
                target,
                why,
                backlog.describe(),
            )
        return Decision(self.model, self.queue, backlog, current, desired, target, why)

    def worth_recording(self, d: Decision) -> bool:
        """Only a decision that differs from the previous one (no row per tick)."""
        changed = d.key() != self._last
        self._last = d.key()
        return changed


class Summary:
    """The console's periodic line: jobs finished per second, queue, workers. Printed every
    `interval_s` while there is work or something finished, so an idle stack stays silent."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._since = time.time()
        self._quiet = True  # the last line reported nothing to do

    def tick(self, t: float, decisions: list[Decision]) -> None:
        if not self.interval_s or t - self._since < self.interval_s:
            return
        with session_scope() as session:
            finished = finished_since(session, self._since, [d.model for d in decisions])
        backlog = sum(d.backlog.total for d in decisions)
        workers = sum(d.current for d in decisions)
        rate, self._since = finished / max(1e-9, t - self._since), t
        if finished or backlog or not self._quiet:
            status(
                "%.1f jobs/s (%d finished), %d waiting or running, %d workers",
                rate,
                finished,
                backlog,
                workers,
            )
        self._quiet = not finished and not backlog


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        backends: Mapping[str, Backend],
        queues: Mapping[str, str],
        reaper: Reaper | None,
    ) -> None:
        # reaper None: a worker pool beside a scheduler that recovers (compose's light one).
        self.settings, self.client, self.reaper = settings, client, reaper
        self.on_close: list[Callable[[], None]] = []
        self.backends, self.queues = dict(backends), dict(queues)
        limits = limits_from(settings)
        self.scalers = {m: ModelScaler(m, queues[m], b, limits) for m, b in self.backends.items()}
        self.summary = Summary(settings.summary_interval_s)
        self.housekeeper = Housekeeper(settings)

    def tick(self, t: float | None = None) -> list[Decision]:
        t = time.time() if t is None else t
        timer = TickTimer()
        with timer("poll"):
            lost = self._notice_dead_workers()
        with timer("reaper"):
            recovered = self.reaper.run_once(t) if self.reaper is not None else {}
        for reason, n in recovered.items():
            if n:
                metrics.RECOVERED.labels(reason).inc(n)
        with timer("scale"):
            with session_scope() as session:
                backlogs = measure(self.client, session, self.queues)
            decisions = [self.scalers[m].step(backlogs[m], t) for m in self.scalers]
            self._record(decisions, lost)
            self.summary.tick(t, decisions)
        with timer("housekeeping"):
            self.housekeeper.run_once(t)
        timer.warn_if_slow(max(SLOW_TICK_S, 4 * self.settings.scheduler_interval_s))
        return decisions

    def _notice_dead_workers(self) -> dict[str, list[str]]:
        """Mark workers a backend saw die as lost, so the reaper recovers their jobs now."""
        lost = {m: b.poll() for m, b in self.backends.items()}
        hosts = [h for hs in lost.values() for h in hs]
        if hosts:
            with session_scope() as session:
                mark_workers(session, hosts, WORKER_LOST)
        return {m: hs for m, hs in lost.items() if hs}

    def _record(self, decisions: list[Decision], lost: Mapping[str, list[str]]) -> None:
        for d in decisions:
            metrics.BACKLOG.labels(d.model).set(d.backlog.total)
            metrics.WORKERS.labels(d.model, "current").set(d.current)
            metrics.WORKERS.labels(d.model, "desired").set(d.desired)
        rows = [(d, f"replaced dead worker {h}") for d in decisions for h in lost.get(d.model, [])]
        rows += [(d, d.reason) for d in decisions if self.scalers[d.model].worth_recording(d)]
        if not rows:
            return
        with session_scope() as session:
            for d, reason in rows:
                record_scaling_event(
                    session,
                    queue=d.queue,
                    backlog=d.backlog.total,
                    current=d.current,
                    desired=d.desired,
                    reason=reason,
                )

    def run(self, stop: threading.Event) -> None:
        interval = self.settings.scheduler_interval_s
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except Exception:  # Redis or the store hiccuped: log, keep looping
                metrics.TICK_ERRORS.inc()
                log.exception("scheduler tick failed")
            stop.wait(max(0.0, interval - (time.monotonic() - started)))

    def close(self) -> None:
        for backend in self.backends.values():
            try:
                backend.close()
            except Exception:
                log.exception("closing the %s backend failed", backend.model)
        for close in self.on_close:
            close()
