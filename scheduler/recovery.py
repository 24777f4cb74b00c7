"""The reaper: the store is the truth, Redis is a hint. Every pass makes sure each unfinished job
is either held by a live worker or has a message waiting for one.

- A job past its `deadline_at` fails with `timeout`, queued or running (the worker's
  store_outcomes only writes its own running jobs, so this outcome wins).
- A running job whose worker is dead (the scheduler saw it exit, it shut down, or its heartbeat
  went silent) or whose lease expired goes back to `queued` with a new message; one that has
  already been claimed `max_attempts` times fails with `worker_crashed` instead of looping.
- A queued job whose message is in no queue list and in no live unacked entry for longer than
  `recovery_grace_s` gets a new message. Unacked entries older than the grace whose jobs nobody
  runs are dropped: their holder is gone and kombu would only restore them after the visibility
  timeout (an hour).

Duplicate messages are harmless (claim_jobs skips finished jobs and jobs under a live lease), so
every rule errs on the side of sending again.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import redis
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from lmqueue.broker import enqueue_jobs
from lmqueue.db import session_scope
from lmqueue.fleet import WORKER_DOWN, WORKER_LOST, dead_after_s
from lmqueue.kombu_redis import forget_reserved, queued_job_ids, reserved_messages
from lmqueue.settings import Settings
from lmqueue.tables import Job, JobStatus, WorkerRecord

# --- batches: lmqueue/batches.py comes from the batches branch; until it is merged, skip. ---
_advance_batches: Callable[[Session], Any] | None
try:
    from lmqueue.batches import advance_batches as _advance_batches  # type: ignore[no-redef]
except ImportError:
    _advance_batches = None

log = logging.getLogger(__name__)

Send = Callable[[str, Sequence[str], int], Any]  # (model, job_ids, api priority)
CHUNK = 500  # ids per IN (...) clause


def timeout_error() -> dict[str, Any]:
    return {
        "code": "timeout",
        "message": "the job did not finish before its timeout",
        "param": "timeout",
        "type": "timeout",
        "status_code": 408,
    }


def crashed_error(attempts: int) -> dict[str, Any]:
    return {
        "code": "worker_crashed",
        "message": f"the worker running this job died {attempts} times; not retrying",
        "param": None,
        "type": "server_error",
        "status_code": 500,
    }


def _chunks(ids: Sequence[str]) -> Iterable[list[str]]:
    for i in range(0, len(ids), CHUNK):
        yield list(ids[i : i + CHUNK])


# --- store-side rules -------------------------------------------------------------------------


def fail_timed_out(session: Session, t: float) -> list[str]:
    result = session.execute(
        update(Job)
        .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]), Job.deadline_at < t)
        .values(
            status=JobStatus.FAILED, error=timeout_error(), finished_at=t, lease_expires_at=None
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    return [str(i) for i in result.scalars()]


def _abandoned(t: float, settings: Settings) -> Any:
    dead = select(WorkerRecord.hostname).where(
        or_(
            WorkerRecord.status.in_([WORKER_DOWN, WORKER_LOST]),
            WorkerRecord.heartbeat_at < t - dead_after_s(settings),
        )
    )
    return and_(
        Job.status == JobStatus.RUNNING,
        or_(Job.lease_expires_at < t, Job.worker.in_(dead)),
    )


def recover_abandoned(
    session: Session, t: float, settings: Settings
) -> tuple[list[tuple[str, str, int]], list[str]]:
    """Running jobs nobody runs any more. Returns ([(id, model, priority)] requeued, [id] failed).

    Attempts are not touched here: claim_jobs counts one per claim.
    """
    abandoned = _abandoned(t, settings)
    failed = session.execute(
        update(Job)
        .where(abandoned, Job.attempts >= settings.max_attempts)
        .values(
            status=JobStatus.FAILED,
            error=crashed_error(settings.max_attempts),
            finished_at=t,
            lease_expires_at=None,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    failed_ids = [str(i) for i in failed.scalars()]
    requeued = session.execute(
        update(Job)
        .where(abandoned)
        .values(status=JobStatus.QUEUED, worker=None, lease_expires_at=None, enqueued_at=t)
        .returning(Job.id, Job.model, Job.priority)
        .execution_options(synchronize_session=False)
    )
    return [(str(i), str(m), int(p)) for i, m, p in requeued.all()], failed_ids


def stale_queued(session: Session, model: str, cutoff: float) -> set[str]:
    """Queued jobs of `model` last sent before `cutoff` (never sent: created before it)."""
    sent_at = func.coalesce(Job.enqueued_at, Job.created_at)
    stmt = select(Job.id).where(
        Job.model == model, Job.status == JobStatus.QUEUED, sent_at < cutoff
    )
    return {str(i) for i in session.scalars(stmt)}


def in_hand(session: Session, ids: Sequence[str], cutoff: float) -> set[str]:
    """Jobs a worker is visibly working on: running, or finished after `cutoff` (its message
    is acked right after the result is stored, so such an entry is about to go away)."""
    found: set[str] = set()
    for chunk in _chunks(ids):
        stmt = select(Job.id).where(
            Job.id.in_(chunk),
            or_(Job.status == JobStatus.RUNNING, Job.finished_at >= cutoff),
        )
        found.update(str(i) for i in session.scalars(stmt))
    return found


def mark_resent(
    session: Session, ids: Sequence[str], cutoff: float, t: float
) -> list[tuple[str, int]]:
    """Claim the right to re-send: only jobs still queued and still stale are stamped `t`."""
    sent_at = func.coalesce(Job.enqueued_at, Job.created_at)
    out: list[tuple[str, int]] = []
    for chunk in _chunks(ids):
        result = session.execute(
            update(Job)
            .where(Job.id.in_(chunk), Job.status == JobStatus.QUEUED, sent_at < cutoff)
            .values(enqueued_at=t)
            .returning(Job.id, Job.priority)
            .execution_options(synchronize_session=False)
        )
        out += [(str(i), int(p)) for i, p in result.all()]
    return out


# --- the reaper -------------------------------------------------------------------------------


class Reaper:
    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        queues: Mapping[str, str],
        send: Send = enqueue_jobs,
    ) -> None:
        self.settings, self.client, self.queues = settings, client, dict(queues)
        self._send = send
        self._next_scan = 0.0

    def run_once(self, t: float) -> Counter[str]:
        """One pass; returns how many jobs each rule touched (timeout, worker_crashed,
        worker_lost, lost_message)."""
        counts: Counter[str] = Counter()
        with session_scope() as session:
            counts["timeout"] = len(fail_timed_out(session, t))
            requeued, crashed = recover_abandoned(session, t, self.settings)
        counts["worker_crashed"] = len(crashed)
        counts["worker_lost"] = len(requeued)
        for job_id, model, priority in requeued:
            self._send(model, [job_id], priority)
        if crashed or requeued:
            log.warning("recovered %d abandoned jobs; %d failed", len(requeued), len(crashed))
        if t >= self._next_scan:
            self._next_scan = t + self.settings.recovery_scan_interval_s
            for model, queue in self.queues.items():
                counts["lost_message"] += self.recover_lost_messages(model, queue, t)
        self._advance_batches()
        return counts

    def recover_lost_messages(self, model: str, queue: str, t: float) -> int:
        cutoff = t - self.settings.recovery_grace_s
        with session_scope() as session:
            candidates = stale_queued(session, model, cutoff)
        # Lists before unacked: a message a worker pops meanwhile is then seen in unacked. The
        # list scan costs O(queue length), so it only runs when some job may have lost its
        # message; the unacked scan (small) always runs, so a dead holder's entries never
        # linger as phantom backlog.
        present = queued_job_ids(self.client, queue) if candidates else set()
        held, stale_tags = self._unacked(queue, cutoff)
        if forget_reserved(self.client, stale_tags):
            log.info("dropped %d unacked messages of %s nobody holds", len(stale_tags), queue)
        lost = sorted(candidates - present - held)
        if not lost:
            return 0
        with session_scope() as session:
            resend = mark_resent(session, lost, cutoff, t)
        for job_id, priority in resend:
            self._send(model, [job_id], priority)
        if resend:
            log.warning("re-sent %d jobs of %s whose messages were lost", len(resend), model)
        return len(resend)

    def _unacked(self, queue: str, cutoff: float) -> tuple[set[str], list[str]]:
        """Job ids in live unacked entries, and the tags of entries nobody holds any more.

        An entry is live if it was taken within the grace, or a worker is visibly on one of
        its jobs (see in_hand)."""
        entries = reserved_messages(self.client, queue)
        old = [e for e in entries if e.delivered_at < cutoff]
        with session_scope() as session:
            busy = in_hand(session, [i for e in old for i in e.job_ids], cutoff)
        held: set[str] = set()
        stale: list[str] = []
        for e in entries:
            ids = e.job_ids
            if e.delivered_at >= cutoff or busy.intersection(ids):
                held.update(ids)
            else:
                stale.append(e.tag)
        return held, stale

    def _advance_batches(self) -> None:
        if _advance_batches is None:
            return
        with session_scope() as session:
            _advance_batches(session)
