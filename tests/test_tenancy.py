"""Tenancy and data lifecycle against a real store (SQLite and Postgres), no worker processes:
the test plays the worker (it finishes the lines the dispatcher sent, in the order sent).

Fair share, held lines vs the reaper, quotas, deadline-aware admission, partial results that
do not stall, and the retention purge."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from cli.procs import wait_until
from cli.stack import Stack
from lmqueue import files as fs
from lmqueue.admission import open_jobs_of_owner
from lmqueue.batches.dispatch import Pump, dispatch_once, poke
from lmqueue.batches.output import MAX_SKIPPED, results_page
from lmqueue.batches.share import Tenant, allocate
from lmqueue.batches.state import advance_batch
from lmqueue.db import session_scope
from lmqueue.jobs import create_job
from lmqueue.keys import create_key, set_limits
from lmqueue.quotas import check_batch, check_deadline, check_upload
from lmqueue.retention import purge
from lmqueue.settings import Settings
from lmqueue.tables import Batch, FileObject, Job, JobStatus, now
from scheduler.recovery import stale_queued
from tests.postgres import fresh_postgres_database
from tests.tenancy_helpers import finish, input_bytes, job_ids, make_batch, open_lines, upload

pytestmark = pytest.mark.timeout(300)

MODEL = "m1"
DAY = 86400


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tenancy.db'}"
        return
    with fresh_postgres_database() as url:
        yield url


def _env(fresh_db: str, redis_url: str, tmp_path: Path, **env: str) -> Iterator[Settings]:
    st = Stack(fresh_db, redis_url, {MODEL: tmp_path}, tmp_path)
    st.migrate()
    from tests.scheduler_load import settings_for

    with settings_for(st, **env) as settings:
        yield settings


@pytest.fixture
def env(fresh_db: str, redis_url: str, tmp_path: Path) -> Iterator[Settings]:
    yield from _env(
        fresh_db,
        redis_url,
        tmp_path,
        LMQUEUE_BATCH_DISPATCH_WINDOW="64",
        LMQUEUE_RETENTION_FILES_S=str(DAY),
        LMQUEUE_RETENTION_OUTPUTS_S=str(DAY),
        LMQUEUE_RETENTION_BATCHES_S=str(DAY),
        LMQUEUE_RETENTION_JOBS_S=str(DAY),
    )


# --- fair share ---------------------------------------------------------------------------------


def test_allocate_weighted_and_work_conserving() -> None:
    assert allocate(100, {"a": Tenant(1, 0, 20_000)}) == {"a": 100}  # alone: the whole window
    assert allocate(100, {"a": Tenant(1, 100, 20_000), "b": Tenant(1, 0, 100)}) == {}
    # a drained 30 lines: all the free room goes to b, which is under its half
    assert allocate(100, {"a": Tenant(1, 70, 20_000), "b": Tenant(1, 0, 100)}) == {"b": 30}
    assert allocate(100, {"a": Tenant(3, 0, 20_000), "b": Tenant(1, 0, 100)}) == {"a": 75, "b": 25}
    # b needs only 10: a gets the rest
    assert allocate(100, {"a": Tenant(1, 0, 20_000), "b": Tenant(1, 0, 10)}) == {"a": 90, "b": 10}


class FifoWorker:
    """Plays Redis and one worker: lines are run in the order they were sent."""

    def __init__(self, per_round: int) -> None:
        self.per_round, self.sent = per_round, []  # type: list[str]

    def send(self, by_model: dict[str, list[str]]) -> None:
        self.sent.extend(i for ids in by_model.values() for i in ids)

    def drain(self, batches: list[str], rounds: int = 200) -> dict[str, int]:
        """Rounds until each batch is done: each round the dispatcher runs, then the worker
        finishes the first `per_round` lines sent."""
        done: dict[str, int] = {}
        for r in range(1, rounds):
            dispatch_once(send=self.send)
            take, self.sent[:] = self.sent[: self.per_round], self.sent[self.per_round :]
            finish(take)
            for b in batches:
                if b not in done and not open_lines(b):
                    done[b] = r
            if len(done) == len(batches):
                return done
        raise AssertionError(f"not drained in {rounds} rounds: {done}")


def test_small_batch_is_not_starved_by_a_large_one(env: Settings) -> None:
    """Key B's 100-line batch behind key A's 1000-line one finishes in rounds bounded by its
    own size; A still drains at full speed; without the fair share (an unbounded window, every
    line sent at once) B waits for all of A."""
    worker = FifoWorker(per_round=32)  # the window is 64: two rounds of work
    big = make_batch("key_a", 1000, MODEL, prefix="a")
    dispatch_once(send=worker.send)  # A's lines are in flight first
    small = make_batch("key_b", 100, MODEL, prefix="b")
    done = worker.drain([big, small])
    fair = done[small]
    # B waits for A's window to drain (2 rounds), then gets half of each round's room.
    assert done[small] <= 2 + 100 // 16 + 2, done
    # A: every round a full 32 lines of work (1100 lines in all): the worker never idled.
    assert done[big] <= -(-1100 // 32) + 3, done

    env.batch_dispatch_window = 1_000_000  # no metering: one key's file is one FIFO block
    worker = FifoWorker(per_round=32)
    big = make_batch("key_a", 1000, MODEL, prefix="a2")
    dispatch_once(send=worker.send)
    small = make_batch("key_b", 100, MODEL, prefix="b2")
    unfair = worker.drain([big, small])
    assert unfair[small] >= 1000 // 32, unfair
    assert fair * 2 < unfair[small]


def test_earlier_deadline_first_within_a_key(env: Settings) -> None:
    env.batch_dispatch_window = 10
    late = make_batch("key_a", 20, MODEL, window="24h", prefix="late")
    early = make_batch("key_a", 20, MODEL, window="1h", prefix="early")
    sent: list[str] = []
    dispatch_once(send=lambda m: sent.extend(i for ids in m.values() for i in ids))
    assert sent == job_ids(early)[:10]
    assert set(job_ids(late)).isdisjoint(sent)


def test_held_lines_are_not_lost_messages(env: Settings) -> None:
    """The reaper must not take lines the dispatcher holds back for lost messages."""
    env.batch_dispatch_window = 5
    batch = make_batch("key_a", 20, MODEL)
    future = now() + 3600
    with session_scope() as session:
        assert stale_queued(session, MODEL, future) == set()
    dispatch_once(send=lambda _m: None)  # stamped, but "lost" (never sent): the reaper's job
    with session_scope() as session:
        assert stale_queued(session, MODEL, future) == set(job_ids(batch)[:5])


def test_a_pass_reports_the_models_with_open_lines(env: Settings) -> None:
    found: list[str] = []
    assert dispatch_once(send=lambda _m: None, open_models=found) == 0
    assert found == []  # nothing open: the pump spaces its passes out
    make_batch("key_a", 3, MODEL, prefix="o")
    assert dispatch_once(send=lambda _m: None, open_models=found) == 3
    assert found == [MODEL]


class CountingPump(Pump):
    """A pump whose passes only count (no store, no Redis) and find `open_models`."""

    def __init__(self, settings: Settings, open_models: list[str]) -> None:
        super().__init__(settings)
        self.passes: list[float] = []
        self.found = open_models

    def pass_once(self, open_models: list[str] | None = None) -> int:
        self.passes.append(time.monotonic())
        if open_models is not None:
            open_models += self.found
        return 0


def test_an_idle_pump_backs_off_and_a_new_batch_wakes_it(env: Settings) -> None:
    settings = env.model_copy(update={"batch_dispatch_interval_s": 0.05})
    busy, idle = CountingPump(settings, [MODEL]).start(), CountingPump(settings, []).start()
    try:
        wait_until(lambda: len(busy.passes) >= 20, 30, "20 busy passes")
        # Doubling from 0.05 s: far fewer passes meanwhile (0.1 + 0.2 + 0.4 + 0.8 ... s apart).
        assert len(idle.passes) <= 8, idle.passes
        busy.close()  # one pump per process, as in a service: none other clears the wake-up
        n = len(idle.passes)
        poke()  # what ingesting a batch does: the pump passes now, not in up to 2 s
        wait_until(lambda: len(idle.passes) > n, 1.5, "a pass after poke()")
    finally:
        busy.close()
        idle.close()


# --- quotas -------------------------------------------------------------------------------------


def test_quotas_refuse_naming_the_quota(env: Settings) -> None:
    make_batch("key_a", 100, MODEL)
    with session_scope() as session:
        assert open_jobs_of_owner(session, "key_a") == 0  # batch lines: not single-job backlog
        new = fs.get_file(session, "key_a", upload("key_a", input_bytes(60, MODEL)))
        assert new is not None
        env.quota_queued_lines = 150
        refusal = check_batch(session, "key_a", new, env)
        assert refusal is not None and refusal.quota == "quota_queued_lines"
        assert "has 100 batch lines queued" in refusal.message and "quota is 150" in refusal.message
        assert refusal.retry_after_s >= 1
        key, _ = create_key(session, "big tenant")
        set_limits(session, key.id, {"quota_queued_lines": 1000})
        assert check_batch(session, key.id, new, env) is None  # the key's own quota wins
        env.quota_queued_lines = 0
        env.quota_queued_tokens = 500  # 100 lines x (2 prompt + 2 max_tokens) = ~400
        refusal = check_batch(session, "key_a", new, env)
        assert refusal is not None and refusal.quota == "quota_queued_tokens"
        env.quota_file_bytes = new.bytes * 2
        assert check_upload(session, "key_a", 1, env) is not None  # two files stored already
        assert check_upload(session, "key_b", 100, env) is None


# --- deadline-aware admission ---------------------------------------------------------------------


def test_deadline_admission(env: Settings) -> None:
    t = now()
    with session_scope() as session:
        for i in range(60):  # drained 60 lines in the last minute: 1 line/s
            job, _ = create_job(
                session, owner="x", model=MODEL, endpoint="/v1/completions", body={}, priority=5
            )
            # All within the last 15 s, so a slow machine's delay before the check below
            # does not push any of them out of the one-minute window.
            job.status, job.finished_at = JobStatus.SUCCEEDED, t - i / 4
    make_batch("key_a", 100, MODEL)  # 100 lines queued ahead
    with session_scope() as session:
        refusal = check_deadline(session, MODEL, 1000, 600, env)
        assert refusal is not None and refusal.param == "completion_window"
        # 1100 lines at 1/s, x1.5 slack: the earliest window that fits
        assert "earliest feasible completion_window is '28m'" in refusal.message, refusal
        assert check_deadline(session, MODEL, 1000, 3600, env) is None
        env.batch_deadline_admission = False
        assert check_deadline(session, MODEL, 1000, 600, env) is None


# --- partial results ------------------------------------------------------------------------------


def test_partial_results_skip_a_stuck_line(env: Settings) -> None:
    batch = make_batch("key_a", 10, MODEL)
    ids = job_ids(batch)
    finish(ids[:1] + ids[2:])  # line 2 is stuck
    seen: list[str] = []
    after, pages = "", []
    with session_scope() as session:
        for _ in range(3):
            page = results_page(session, batch, after, 4, ingested=True)
            seen += [json.loads(x)["custom_id"] for x in page.lines]
            after, pages = page.cursor, pages + [page.complete]
        assert seen == [f"req-{i}" for i in (0, 2, 3, 4, 5, 6, 7, 8, 9)]
        assert pages == [False, False, False]  # the stuck line is still owed
        assert results_page(session, batch, after, 4, ingested=True).lines == []
    finish(ids[1:2])
    with session_scope() as session:
        page = results_page(session, batch, after, 4, ingested=True)
    assert [json.loads(x)["custom_id"] for x in page.lines] == ["req-1"] and page.complete
    assert len(page.cursor) < 60 and MAX_SKIPPED >= 100


# --- retention ------------------------------------------------------------------------------------


def _age_batch(batch_id: str, seconds: float, output_ttl: int | None = None) -> None:
    finish(job_ids(batch_id), at=now() - seconds)
    with session_scope() as session:
        batch = advance_batch(session, batch_id)
        assert batch is not None and batch.status == "completed"
    with session_scope() as session:
        session.execute(
            update(Batch)
            .where(Batch.id == batch_id)
            .values(completed_at=now() - seconds, output_expires_after_s=output_ttl)
        )


def test_purge_deletes_what_expired_and_nothing_else(env: Settings) -> None:
    short = upload("key_a", b"x" * 100, expires_after=3600)
    kept = upload("key_a", b"y" * 100)
    old, young = make_batch("key_a", 5, MODEL, prefix="old"), make_batch("key_a", 5, MODEL)
    short_out = make_batch("key_a", 5, MODEL, prefix="out")
    running = make_batch("key_a", 5, MODEL, prefix="run")
    _age_batch(old, 2 * DAY)
    _age_batch(young, 60)
    _age_batch(short_out, 2 * 3600, output_ttl=3600)
    with session_scope() as session:
        single = [
            create_job(session, owner="k", model=MODEL, endpoint="e", body={}, priority=5)[0]
            for _ in range(3)
        ]
        single[0].status, single[0].finished_at = JobStatus.SUCCEEDED, now() - 2 * DAY
        single[1].status, single[1].finished_at = JobStatus.SUCCEEDED, now()
        single[2].created_at = now() - 2 * DAY  # queued for two days: open work stays
        old_files = list(
            session.scalars(select(FileObject.id).where(FileObject.source_batch_id == old))
        )
        short_path = fs.content_path(session.get(FileObject, short))  # type: ignore[arg-type]
    assert short_path.exists() and old_files

    report = purge(now() + 2 * 3600, env)  # two hours on: `short` expired, `kept` did not

    with session_scope() as session:
        files = set(session.scalars(select(FileObject.id)))
        batches = set(session.scalars(select(Batch.id)))
        jobs_left = {
            b: int(session.scalar(select(func.count()).where(Job.batch_id == b)) or 0)
            for b in (old, young, short_out, running)
        }
        singles = set(session.scalars(select(Job.id).where(Job.batch_id.is_(None))))
    assert short not in files and not short_path.exists() and kept in files
    assert old not in batches and files.isdisjoint(old_files) and jobs_left[old] == 0
    assert {young, short_out, running} <= batches
    assert jobs_left[young] == 5 and jobs_left[running] == 5
    assert jobs_left[short_out] == 0  # its output expired: its results went with it
    assert singles == {single[1].id, single[2].id}
    assert report.rows["files"] >= 2 and report.rows["batches"] == 1 and report.bytes_freed >= 100
    assert report.rows["jobs"] == 5 + 5 + 1


def test_the_scheduler_housekeeper_purges_when_due(env: Settings) -> None:
    from scheduler.housekeeping import Housekeeper

    upload("key_a", b"z" * 10, expires_after=3600)
    keeper = Housekeeper(env)
    first = keeper.run_once(now() + 7200)
    assert first is not None and first.rows["files"] == 1 and not first.more
    assert keeper.run_once(now() + 7201) is None  # next one in purge_interval_s


def test_the_autoscaler_sees_held_lines(env: Settings) -> None:
    """Held lines are not in Redis, but the backlog the scheduler scales on counts them."""
    from lmqueue.batches.dispatch import held_messages
    from scheduler.backlog import Backlog

    make_batch("key_a", 100, MODEL)
    with session_scope() as session:
        held = held_messages(session, env)
    assert held == {MODEL: -(-100 // env.batch_lines_per_message)}
    assert Backlog(waiting=2, reserved=1, running=1, held=held[MODEL]).total == 3 + held[MODEL]
