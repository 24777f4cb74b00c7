"""Store queries about workers and scaling decisions, shared by the scheduler and the API.

Light on purpose: the API reads these without importing the scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, or_, select, update
from sqlalchemy.orm import Session

from lmqueue.settings import Settings
from lmqueue.tables import ScalingEvent, WorkerRecord, now

# Worker record states: `up` (heartbeating), `down` (clean shutdown), `lost` (the scheduler saw
# the process die). `lost` lets recovery act at once instead of waiting for heartbeat silence.
WORKER_UP, WORKER_DOWN, WORKER_LOST = "up", "down", "lost"


def dead_after_s(settings: Settings) -> float:
    """Heartbeat silence after which a worker counts as dead."""
    return settings.worker_dead_after_s or 3 * settings.heartbeat_s


def dead_workers(t: float, settings: Settings) -> Select[Any]:
    """Hostnames of workers that are down, lost, or silent for `dead_after_s` before `t`."""
    return select(WorkerRecord.hostname).where(
        or_(
            WorkerRecord.status.in_([WORKER_DOWN, WORKER_LOST]),
            WorkerRecord.heartbeat_at < t - dead_after_s(settings),
        )
    )


def record_scaling_event(
    session: Session, *, queue: str, backlog: int, current: int, desired: int, reason: str
) -> None:
    session.add(
        ScalingEvent(
            at=now(),
            queue=queue,
            backlog=backlog,
            current=current,
            desired=desired,
            reason=reason[:200],
        )
    )


def recent_scaling_events(
    session: Session, limit: int, queue: str | None = None
) -> list[ScalingEvent]:
    stmt = select(ScalingEvent)
    if queue:
        stmt = stmt.where(ScalingEvent.queue == queue)
    return list(session.scalars(stmt.order_by(ScalingEvent.id.desc()).limit(limit)))


def mark_workers(session: Session, hostnames: Sequence[str], status: str) -> None:
    if hostnames:
        session.execute(
            update(WorkerRecord)
            .where(WorkerRecord.hostname.in_(list(hostnames)))
            .values(status=status)
            .execution_options(synchronize_session=False)
        )


def live_workers(session: Session, settings: Settings, model: str | None = None) -> list[str]:
    """Hostnames of workers that are up and heartbeating."""
    stmt = select(WorkerRecord.hostname).where(
        WorkerRecord.status == WORKER_UP,
        WorkerRecord.heartbeat_at >= now() - dead_after_s(settings),
    )
    if model is not None:
        stmt = stmt.where(WorkerRecord.model == model)
    return list(session.scalars(stmt))


def recent_workers(session: Session, since: float) -> list[WorkerRecord]:
    stmt = select(WorkerRecord).where(WorkerRecord.heartbeat_at >= since)
    return list(session.scalars(stmt.order_by(WorkerRecord.model, WorkerRecord.started_at)))


def event_to_dict(e: ScalingEvent) -> dict[str, Any]:
    return {
        "at": e.at,
        "queue": e.queue,
        "backlog": e.backlog,
        "current": e.current,
        "desired": e.desired,
        "reason": e.reason,
    }


def worker_to_dict(w: WorkerRecord, settings: Settings) -> dict[str, Any]:
    alive = w.status == WORKER_UP and w.heartbeat_at >= now() - dead_after_s(settings)
    return {
        "hostname": w.hostname,
        "model": w.model,
        "pid": w.pid,
        "status": w.status,
        "alive": alive,
        "started_at": w.started_at,
        "heartbeat_at": w.heartbeat_at,
    }
