"""The reaper: the store is the truth, Redis is a hint. Every pass makes sure each unfinished job
is either held by a live worker or has a message waiting for one.

The rules run through lmqueue.transitions (the one place that changes a job's state):

- A job past its `deadline_at` fails with `timeout`, queued or running (the worker's
  store_outcomes only writes its own running jobs, so this outcome wins).
- A running job whose worker is dead (the scheduler saw it exit, it shut down, or its heartbeat
  went silent) or whose lease expired goes back to `queued` with a new message; one that has
  already been claimed `max_attempts` times fails with `worker_crashed` instead of looping.
- Housekeeping, with the lost-message scan: a batch whose ingest was interrupted (its API
  process died) is ingested again; upload parts left by a killed upload are deleted.
- A queued job whose message is in no queue list and in no live unacked entry for longer than
  `recovery_grace_s` gets a new message. Batch lines held by the dispatcher (never sent,
  lmqueue.batches.dispatch) are not lost messages and are left alone. Unacked entries older
  than the grace whose jobs nobody runs are dropped: their holder is gone and kombu would only
  restore them after the visibility timeout (an hour).

Duplicate messages are harmless (claim_jobs skips finished jobs and jobs under a live lease), so
every rule errs on the side of sending again.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from lmqueue.batches.ingest import resume_interrupted_ingests
from lmqueue.batches.state import advance_batches
from lmqueue.broker import enqueue_jobs
from lmqueue.contract import redis_key_prefix
from lmqueue.db import session_scope
from lmqueue.files import sweep_stale_parts
from lmqueue.kombu_redis import forget_reserved, queued_job_ids, reserved_messages
from lmqueue.settings import Settings
from lmqueue.tables import Job, JobStatus
from lmqueue.transitions import (
    in_chunks,
    last_seen,
    mark_resent,
    record_task,
    recover_abandoned,
    time_out,
)

log = logging.getLogger(__name__)

Send = Callable[[str, Sequence[str], int], Any]  # (model, job_ids, api priority)

# --- store-side reads (every write is in lmqueue.transitions) ------------------------------


def stale_queued(session: Session, model: str, cutoff: float) -> set[str]:
    """Queued jobs of `model` last sent before `cutoff` (a single job never sent: created
    before it). Batch lines the dispatcher still holds back (no enqueued_at) have no message on
    purpose: they are not lost, and re-sending them would defeat the fair share."""
    stmt = select(Job.id).where(
        Job.model == model,
        Job.status == JobStatus.QUEUED,
        last_seen() < cutoff,
        Job.cache_of.is_(None),  # a batch line waiting for an identical one has no message
        # Batch lines held by the dispatcher have no message yet (lmqueue.batches.dispatch).
        or_(Job.batch_id.is_(None), Job.enqueued_at.is_not(None)),
    )
    return {str(i) for i in session.scalars(stmt)}


def in_hand(session: Session, ids: Sequence[str], cutoff: float) -> set[str]:
    """Jobs a worker is visibly working on: running, held on its waiting list (queued, stamped
    by mark_held after `cutoff`), or finished after `cutoff` (its message is acked right after
    the result is stored, so such an entry is about to go away)."""
    found: set[str] = set()
    for chunk in in_chunks(ids):
        stmt = select(Job.id).where(
            Job.id.in_(chunk),
            or_(
                Job.status == JobStatus.RUNNING,
                and_(Job.status == JobStatus.QUEUED, Job.held_at >= cutoff),
                Job.finished_at >= cutoff,
            ),
        )
        found.update(str(i) for i in session.scalars(stmt))
    return found


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
        self.prefix = redis_key_prefix(settings)  # the deployment's Redis namespace

    def run_once(self, t: float) -> Counter[str]:
        """One pass; returns how many jobs each rule touched (timeout, worker_crashed,
        worker_lost, lost_message)."""
        counts: Counter[str] = Counter()
        with session_scope() as session:
            counts["timeout"] = len(time_out(session, t))
            requeued, crashed = recover_abandoned(session, t, self.settings)
        counts["worker_crashed"] = len(crashed)
        counts["worker_lost"] = len(requeued)
        for job_id, model, priority in requeued:
            self._resend(model, job_id, priority)
        if crashed or requeued:
            log.warning("recovered %d abandoned jobs; %d failed", len(requeued), len(crashed))
        if t >= self._next_scan:
            self._next_scan = t + self.settings.recovery_scan_interval_s
            for model, queue in self.queues.items():
                counts["lost_message"] += self.recover_lost_messages(model, queue, t)
            counts["ingest_resumed"] = resume_interrupted_ingests(self.settings)
            counts["upload_part_swept"] = sweep_stale_parts(self.settings, t)
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
        present = queued_job_ids(self.client, queue, prefix=self.prefix) if candidates else set()
        held, stale_tags = self._unacked(queue, cutoff)
        if forget_reserved(self.client, stale_tags, self.prefix):
            log.info("dropped %d unacked messages of %s nobody holds", len(stale_tags), queue)
        lost = sorted(candidates - present - held)
        if not lost:
            return 0
        with session_scope() as session:
            resend = mark_resent(session, lost, cutoff, t)
        for job_id, priority in resend:
            self._resend(model, job_id, priority)
        if resend:
            log.warning("re-sent %d jobs of %s whose messages were lost", len(resend), model)
        return len(resend)

    def _resend(self, model: str, job_id: str, priority: int) -> None:
        """Send a job again and remember its new task id (GET /v1/jobs/{id} shows it)."""
        task_id = self._send(model, [job_id], priority)
        if isinstance(task_id, str):
            with session_scope() as session:
                record_task(session, [job_id], task_id)

    def _unacked(self, queue: str, cutoff: float) -> tuple[set[str], list[str]]:
        """Job ids in live unacked entries, and the tags of entries nobody holds any more.

        An entry is live if it was taken within the grace, or a worker is visibly on one of
        its jobs (see in_hand)."""
        entries = reserved_messages(self.client, queue, self.prefix)
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
        with session_scope() as session:
            advance_batches(session)
