"""The batch dispatcher: batch lines are metered into Redis instead of enqueued all at once.

Ingest inserts a batch's lines `held` (queued, `enqueued_at` NULL: no message yet). Every
`batch_dispatch_interval_s` while lines are open (less often when none are), per model, the
dispatcher tops the lines in flight (sent and not finished) up to the model's window, shared
between API keys by weight (lmqueue.batches.share); within a key, the batch with the earliest
deadline (`expires_at`) goes first, then input order.
Single jobs are sent at once at a higher priority, so they still jump ahead of batch lines.

The store stays the truth: a line is stamped `enqueued_at` by a conditional UPDATE before its
message is sent, so two dispatchers (the API's and the scheduler's) never send one line twice,
and a line stamped but never sent is a lost message the reaper re-sends. Held lines are no lost
messages: the reaper ignores them (scheduler.recovery.stale_queued).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis
from sqlalchemy import ColumnElement, and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from lmqueue.admission import drain_rate
from lmqueue.batches.share import Tenant, allocate
from lmqueue.broker import enqueue_messages
from lmqueue.db import session_scope
from lmqueue.fleet import live_workers
from lmqueue.settings import Settings, get_settings
from lmqueue.tables import ApiKey, Batch, Job, JobStatus, now
from lmqueue.transitions import in_chunks

log = logging.getLogger(__name__)

Send = Callable[[dict[str, list[str]]], Any]  # {model: [job ids]} -> sends the messages
# The window holds this much of the drain measured over the last DRAIN_WINDOW_S (short, so a
# burst is seen within seconds), so the workers never starve between two passes.
DRAIN_AHEAD_S = 2.0
DRAIN_WINDOW_S = 5.0
FAILED_PASS_WAIT_S = 5.0
# With no batch line open, a pump's passes space out (doubling up to this): an idle API costs
# no CPU to speak of. A batch ingested in this process wakes its pump at once (`poke`); one
# ingested elsewhere starts within this long.
IDLE_WAIT_MAX_S = 2.0
_wake = threading.Event()


def poke() -> None:
    """Lines were just inserted held: this process's pump passes now instead of when due."""
    _wake.set()


def held() -> ColumnElement[bool]:
    """A batch line waiting for the dispatcher (no message sent yet)."""
    return and_(
        Job.batch_id.is_not(None),
        Job.status == JobStatus.QUEUED,
        Job.enqueued_at.is_(None),
        Job.cache_of.is_(None),  # a line waiting for an identical one is never sent
    )


def held_messages(session: Session, settings: Settings) -> dict[str, int]:
    """Per model, the held lines in messages' worth (batch_lines_per_message each): work the
    autoscaler must see although it is not in Redis yet."""
    rows = session.execute(select(Job.model, func.count()).where(held()).group_by(Job.model))
    per = settings.batch_lines_per_message
    return {str(m): math.ceil(int(n) / per) for m, n in rows}


def window(session: Session, settings: Settings, model: str) -> int:
    """Lines of `model` that may be in flight: the setting, or every live worker's slots and
    hold (at least one worker's worth), plus two seconds of the measured drain."""
    if settings.batch_dispatch_window:
        return settings.batch_dispatch_window
    slots = settings.max_batch_size
    per_worker = slots + settings.hold_jobs(slots)
    workers = max(1, len(live_workers(session, settings, model)))
    rate = drain_rate(session, model, DRAIN_WINDOW_S)
    return workers * per_worker + math.ceil(rate * DRAIN_AHEAD_S)


def tenants(session: Session, settings: Settings) -> dict[str, dict[str, Tenant]]:
    """{model: {owner: Tenant}} for every model with open batch lines (one GROUP BY)."""
    is_held = case((Job.enqueued_at.is_(None) & (Job.status == JobStatus.QUEUED), 1), else_=0)
    rows = session.execute(
        select(Job.model, Job.owner, is_held, func.count())
        .join(Batch, Batch.id == Job.batch_id)
        .where(ours(settings))
        .where(Job.batch_id.is_not(None), Job.status.in_(JobStatus.OPEN), Job.cache_of.is_(None))
        .group_by(Job.model, Job.owner, is_held)
    ).all()
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for model, owner, h, n in rows:
        counts[(model, owner)][1 if h else 0] += int(n)
    weights = key_weights(session, {o for _m, o in counts}, settings)
    out: dict[str, dict[str, Tenant]] = defaultdict(dict)
    for (model, owner), (in_flight, waiting) in counts.items():
        out[model][owner] = Tenant(weights[owner], in_flight, waiting)
    return out


def key_weights(session: Session, owners: set[str], settings: Settings) -> dict[str, float]:
    found = dict(
        session.execute(
            select(ApiKey.id, ApiKey.weight).where(ApiKey.id.in_(owners), ApiKey.weight > 0)
        ).all()
    )
    return {o: float(found.get(o) or settings.key_default_weight) for o in owners}


def ours(settings: Settings) -> ColumnElement[bool]:
    """Batches accepted in this queue namespace (older rows without one count as ours)."""
    return or_(Batch.queue_prefix == settings.queue_prefix, Batch.queue_prefix.is_(None))


def pick(session: Session, model: str, owner: str, n: int, settings: Settings) -> list[str]:
    """The next `n` held lines of a key: earliest batch deadline first, then input order."""
    stmt = (
        select(Job.id)
        .join(Batch, Batch.id == Job.batch_id)
        .where(held(), ours(settings), Job.model == model, Job.owner == owner)
        .order_by(Batch.expires_at, Job.id)
        .limit(n)
    )
    return [str(i) for i in session.scalars(stmt)]


def stamp(session: Session, ids: Sequence[str], t: float) -> list[str]:
    """Claim the right to send: only lines still held are stamped. Returns those."""
    out: list[str] = []
    for chunk in in_chunks(ids):
        result = session.execute(
            update(Job)
            .where(Job.id.in_(chunk), held())
            .values(enqueued_at=t)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
        out += [str(i) for i in result.scalars()]
    return out


def plan(
    session: Session, settings: Settings, open_models: list[str] | None = None
) -> dict[str, list[str]]:
    """Choose and stamp the lines to send now, {model: ids}; the caller commits, then sends.
    `open_models` receives the models that have open batch lines."""
    t = now()
    chosen: dict[str, list[str]] = {}
    for model, by_owner in tenants(session, settings).items():
        if open_models is not None:
            open_models.append(model)
        grants = allocate(window(session, settings, model), by_owner)
        ids = [i for owner, n in grants.items() for i in pick(session, model, owner, n, settings)]
        if ids:
            chosen[model] = stamp(session, ids, t)
    return {m: ids for m, ids in chosen.items() if ids}


def dispatch_once(
    send: Send | None = None,
    settings: Settings | None = None,
    open_models: list[str] | None = None,
) -> int:
    """One dispatch pass; returns the number of lines sent (`open_models`: see plan)."""
    settings = settings or get_settings()
    with session_scope() as session:
        chosen = plan(session, settings, open_models)
    if not chosen:
        return 0
    # Committed before sending: a crash in between leaves stamped lines without a message,
    # which the reaper re-sends after recovery_grace_s (never a line sent twice on purpose).
    (send or _send_lines)(chosen)
    return sum(len(ids) for ids in chosen.values())


def _send_lines(by_model: Mapping[str, Sequence[str]]) -> None:
    s = get_settings()
    with session_scope() as session:
        messages = name_messages(session, by_model, s.batch_lines_per_message)
    enqueue_messages(messages, s.batch_priority)


def name_messages(
    session: Session, by_model: Mapping[str, Sequence[str]], per: int
) -> list[tuple[str, list[str], str]]:
    """Cut each model's lines into messages of at most `per` lines of one batch, and record on
    each line the task id of its message, "<batch id>-l<first line>" (Flower shows it; a line
    leads to its task and back)."""
    messages: list[tuple[str, list[str], str]] = []
    for model, ids in by_model.items():
        rows = session.execute(
            select(Job.id, Job.batch_id, Job.line_no).where(Job.id.in_(list(ids)))
        ).all()
        by_batch: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for job_id, batch_id, line_no in rows:
            by_batch[str(batch_id)].append((int(line_no or 0), str(job_id)))
        for batch_id, lines in by_batch.items():
            lines.sort()
            for i in range(0, len(lines), per):
                chunk = lines[i : i + per]
                messages.append((model, [j for _n, j in chunk], f"{batch_id}-l{chunk[0][0]}"))
    for _model, chunk_ids, task_id in messages:
        session.execute(update(Job).where(Job.id.in_(chunk_ids)).values(task_id=task_id))
    return messages


class Pump:
    """Runs dispatch_once every interval in a daemon thread. A Redis lock lets one process at a
    time dispatch (the others skip the pass), so API replicas and the scheduler do not all
    fill the same free room at once."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = redis.Redis.from_url(self.settings.redis_url)
        self._lock_name = f"{self.settings.queue_prefix}:dispatch-lock"

    def start(self) -> Pump:
        self._thread = threading.Thread(target=self._run, name="lmqueue-dispatch", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        _wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._client.close()

    def pass_once(self, open_models: list[str] | None = None) -> int:
        """One pass if no other process is in one; `open_models` as in plan."""
        lock = self._client.lock(self._lock_name, timeout=30, blocking=False)
        if not lock.acquire(blocking=False):
            if open_models is not None:
                open_models.append("")  # unknown: another process is passing, keep pace
            return 0
        try:
            return dispatch_once(settings=self.settings, open_models=open_models)
        finally:
            # A very slow pass may have outlived the lock: nothing to release then.
            with contextlib.suppress(redis.exceptions.LockError):
                lock.release()

    def _run(self) -> None:
        interval = self.settings.batch_dispatch_interval_s
        wait = interval
        while not self.stop.is_set():
            open_models: list[str] = []
            try:
                self.pass_once(open_models)
                idle = max(interval, min(IDLE_WAIT_MAX_S, 2 * wait))
                wait = interval if open_models else idle
            except Exception:  # the store or Redis is down: try again, without flooding the log
                log.exception("batch dispatch pass failed; retrying in %.0f s", FAILED_PASS_WAIT_S)
                wait = max(interval, FAILED_PASS_WAIT_S)
            _wake.wait(wait)
            _wake.clear()
