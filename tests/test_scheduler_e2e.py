"""The scheduler for real: its own process, spawning real Celery workers that serve the tiny real
model, against real Redis and SQLite. SQLite only: the store queries it runs are the same
conditional UPDATEs the Postgres variants of test_scheduler_recovery.py already cover, and each
of these tests costs worker start-ups on a small machine.

Figures (scale-up latency, recovery times) are printed; bench/RESULTS.md records them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cli.procs import free_port, wait_until
from cli.stack import Stack
from lmqueue.contract import redis_queue_keys
from lmqueue.kombu_redis import queued_job_ids
from lmqueue.settings import Settings
from lmqueue.tables import Job, JobStatus, ScalingEvent, WorkerRecord
from scheduler.backends.local import LocalBackend
from scheduler.recovery import Reaper
from tests.scheduler_load import all_done, settings_for, status_counts, submit_many

FAST = {
    "LMQUEUE_SCHEDULER_INTERVAL_S": "0.5",
    "LMQUEUE_SCHEDULER_UPSCALE_DELAY_S": "1",
    "LMQUEUE_RECOVERY_GRACE_S": "2",
    "LMQUEUE_RECOVERY_SCAN_INTERVAL_S": "0.5",
    # Workers the scheduler sees die are marked lost at once; heartbeat silence is only the
    # fallback, kept well above a beat delayed by this busy 2-core machine.
    "LMQUEUE_WORKER_DEAD_AFTER_S": "10",
}


def _stack(tmp: Path, redis_url: str, model_dir: Path) -> Stack:
    st = Stack(f"sqlite:///{tmp / 'lmqueue.db'}", redis_url, {"tiny": model_dir}, tmp)
    st.migrate()
    return st


def _events(st: Stack) -> list[ScalingEvent]:
    with Session(st.engine) as s:
        return list(s.scalars(select(ScalingEvent).order_by(ScalingEvent.id)))


def _jobs(st: Stack, ids: list[str]) -> list[Job]:
    return st.jobs(ids)


def _live_workers(st: Stack) -> list[WorkerRecord]:
    with Session(st.engine) as s:
        stmt = select(WorkerRecord).where(WorkerRecord.status == "up")
        return [w for w in s.scalars(stmt) if w.heartbeat_at > time.time() - 3]


def _assert_each_job_once(jobs: list[Job], n: int) -> None:
    assert len(jobs) == n and len({j.id for j in jobs}) == n
    bad = [(j.id, j.status, j.error) for j in jobs if j.status != JobStatus.SUCCEEDED]
    assert not bad, bad[:5]
    assert all(j.result is not None and j.result["id"].endswith(j.id) for j in jobs)
    assert all(j.attempts >= 1 for j in jobs)


def _metric(port: int, line_start: str) -> float | None:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.timeout(150)
def test_backlog_scales_zero_to_max_then_back_to_min(
    redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    st = _stack(tmp_path, redis_url, tiny_model_dir)
    port = free_port()
    desired = 'lmqueue_scheduler_workers{model="tiny",state="desired"}'
    try:
        st.start_api()
        st.start_scheduler(
            {
                **FAST,
                "LMQUEUE_SCHEDULER_MIN_WORKERS": "0",
                "LMQUEUE_SCHEDULER_MAX_WORKERS": "2",
                "LMQUEUE_SCHEDULER_DOWNSCALE_DELAY_S": "3",
                "LMQUEUE_SCHEDULER_METRICS_PORT": str(port),
            }
        )
        t0 = time.time()
        ids = submit_many(st, "tiny", 300)
        wait_until(lambda: _metric(port, desired) == 2, 30, "desired 2 in /metrics")
        assert (_metric(port, 'lmqueue_scheduler_backlog{model="tiny"}') or 0) > 0
        wait_until(lambda: all_done(st, ids), 120, "300 jobs to finish", every_s=0.5)
        t_done = time.time()
        _wait_scaled_to_zero(st)
        t_zero = time.time()
        jobs = _jobs(st, ids)
        with st.client() as client:
            seen = client.get("/v1/scheduler", params={"limit": 500}).json()
        with Session(st.engine) as s:
            ready = sorted(w.started_at for w in s.scalars(select(WorkerRecord)))
    finally:
        st.stop()
    _assert_each_job_once(jobs, 300)
    assert all(j.attempts == 1 for j in jobs), "no worker died: every job ran once"
    events = seen["events"][::-1]  # the API lists newest first
    assert max(e["current"] for e in events) == 2, [(e["current"], e["reason"]) for e in events]
    first_up = next(e for e in events if e["reason"].startswith("scale up from zero"))
    down = [e for e in events if e["reason"].startswith("scale down")]
    assert down and down[-1]["desired"] == 0 and events[-1]["current"] == 0
    assert len(seen["workers"]) == 2 and all(w["status"] == "down" for w in seen["workers"])
    assert len({j.worker for j in jobs}) == 2, "both workers served jobs"
    first_claim = min(j.started_at or 0 for j in jobs)
    print(
        f"\nscale-up: decision {first_up['at'] - t0:.2f}s after submit; worker ready (model "
        f"loaded) {ready[0] - t0:.2f}s; first job claimed {first_claim - t0:.2f}s after submit; "
        f"scale-down: no live worker {t_zero - t_done:.2f}s after the last job"
    )


def _wait_scaled_to_zero(st: Stack) -> None:
    try:
        wait_until(
            lambda: _events(st)[-1].current == 0 and not _live_workers(st),
            60,
            "scale back to zero",
            every_s=0.5,
        )
    except TimeoutError as e:
        # A timeout in CI must tell its story: the decisions, the workers, the processes' logs.
        events = [(round(ev.at, 1), ev.current, ev.desired, ev.reason) for ev in _events(st)]
        with Session(st.engine) as s:
            rows = s.scalars(select(WorkerRecord))
            workers = [(w.hostname, w.status, round(w.heartbeat_at, 1)) for w in rows]
        raise TimeoutError(
            f"{e}\nnow {time.time():.1f}\nevents: {events[-8:]}\nworkers: {workers}\n"
            f"{st.all_logs()}"
        ) from None


# --- two fixed workers: crashes and lost messages ---------------------------------------------


@pytest.fixture(scope="module")
def two_workers(
    redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    st = _stack(tmp_path_factory.mktemp("sched2"), redis_url, tiny_model_dir)
    try:
        st.start_scheduler(
            {**FAST, "LMQUEUE_SCHEDULER_MIN_WORKERS": "2", "LMQUEUE_SCHEDULER_MAX_WORKERS": "2"}
        )
        wait_until(lambda: len(_live_workers(st)) == 2, 120, "two workers up", every_s=0.5)
        yield st
    finally:
        st.stop()


def _kill_busy_worker(
    st: Stack, killed: frozenset[str] = frozenset()
) -> tuple[float, set[str], str]:
    """SIGSTOP a worker holding running jobs, read exactly which jobs it holds (frozen, it can
    claim no more), then SIGKILL it. Returns (kill time, its jobs, its hostname). A worker
    killed before (`killed`) is skipped: on a loaded machine its last heartbeat can still look
    live, and its jobs still `running` until the reaper has been round."""
    while True:
        with Session(st.engine) as s:
            held = Counter(
                s.scalars(select(Job.worker).where(Job.status == JobStatus.RUNNING)).all()
            )
        live = {w.hostname: w.pid for w in _live_workers(st) if w.hostname not in killed}
        busy = [h for h, _ in held.most_common() if h in live]
        if not busy:
            time.sleep(0.05)
            continue
        host, pid = busy[0], live[busy[0]]
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        with Session(st.engine) as s:
            stmt = select(Job.id).where(Job.status == JobStatus.RUNNING, Job.worker == host)
            jobs = set(s.scalars(stmt))
        if not jobs:
            os.kill(pid, signal.SIGCONT)
            continue
        os.kill(pid, signal.SIGKILL)
        return time.time(), jobs, host


def _seconds_to_requeue(st: Stack, killed_at: float, held: set[str], host: str) -> float:
    """Recovery time, watched as it happens: kill -> none of the dead worker's jobs still
    running on it (the reaper put them back). Read from the final rows instead, a later re-send
    of the same job (a worker killed after it took the message again) would be counted."""

    def requeued() -> bool:
        with Session(st.engine) as s:
            stmt = select(func.count()).where(
                Job.id.in_(held), Job.status == JobStatus.RUNNING, Job.worker == host
            )
            return s.scalar(stmt) == 0

    wait_until(requeued, 60, f"the jobs of {host} back in the queue", every_s=0.05)
    return time.time() - killed_at


@pytest.mark.timeout(300)  # ~55 s on an idle 2-core box; 130-155 s when it is shared
def test_kill_9_workers_holding_batches_loses_and_duplicates_nothing(two_workers: Stack) -> None:
    st = two_workers
    n = 2000
    ids = submit_many(st, "tiny", n)
    kills: list[tuple[float, set[str], str]] = []
    back: list[float] = []
    for k in range(3):
        # Spread the kills over the run: wait for about a quarter more of the jobs each time.
        target_done = n * (k + 1) // 4
        wait_until(
            lambda t=target_done: status_counts(st, ids).get("succeeded", 0) >= t,
            120,
            f"{target_done} jobs done",
            every_s=0.2,
        )
        kills.append(_kill_busy_worker(st, frozenset(h for _t, _held, h in kills)))
        back.append(_seconds_to_requeue(st, *kills[-1]))
    wait_until(lambda: all_done(st, ids), 240, f"{n} jobs to finish", every_s=0.5)
    jobs = {j.id: j for j in _jobs(st, ids)}
    _assert_each_job_once(list(jobs.values()), n)

    # Every claim that produced nothing was one by a killed worker; every other job ran once.
    # attempts == 1 + (number of kills that took the job) therefore proves no job was computed
    # twice except the batches a kill destroyed, and none after its result was stored.
    taken = Counter(i for _t, held, _h in kills for i in held)
    wrong = [(i, j.attempts, taken[i]) for i, j in jobs.items() if j.attempts != 1 + taken[i]]
    assert not wrong, wrong[:10]
    stored_by_the_dead = [i for _t, held, h in kills for i in held if jobs[i].worker == h]
    assert not stored_by_the_dead, "a killed worker's batch was stored by it"
    sizes = [len(held) for _t, held, _h in kills]
    print(f"\nkills took batches of {sizes} jobs; back in the queue after {back} s")
    assert all(0 < b < 10 for b in back), back
    replaced = [e.reason for e in _events(st) if e.reason.startswith("replaced dead worker")]
    assert sorted(replaced) == sorted(f"replaced dead worker {h}" for _t, _held, h in kills)
    wait_until(lambda: len(_live_workers(st)) == 2, 120, "two workers again", every_s=0.5)


@pytest.mark.timeout(150)
def test_deleted_queue_keys_are_recovered_from_the_store(two_workers: Stack) -> None:
    st = two_workers
    n = 600  # two workers hold at most 2 x 64 messages: most of these wait in the lists
    ids = submit_many(st, "tiny", n)
    # Underway, with most messages still in the lists (a starved test process polls late).
    wait_until(lambda: status_counts(st, ids).get("succeeded", 0) >= 10, 60, "10 done", every_s=0.1)
    r = redis.Redis.from_url(st.redis_url)
    # The messages deleted are those in the lists (a worker may pop one meanwhile: it runs).
    lost = queued_job_ids(r, st.queue("tiny"), prefix=st.key_prefix)
    deleted_at = time.time()
    r.delete(*redis_queue_keys(st.queue("tiny"), st.key_prefix))
    r.close()
    assert lost, "the queue emptied before the keys were deleted"
    wait_until(lambda: all_done(st, ids), 120, f"{n} jobs to finish", every_s=0.5)
    jobs = {j.id: j for j in _jobs(st, ids)}
    _assert_each_job_once(list(jobs.values()), n)
    resent = [jobs[i].enqueued_at or 0 for i in lost if (jobs[i].enqueued_at or 0) > deleted_at]
    assert resent, "nothing was re-sent"
    print(
        f"\n{len(lost)} messages deleted; re-sent after {min(resent) - deleted_at:.2f}s "
        f"(grace {FAST['LMQUEUE_RECOVERY_GRACE_S']}s); all done "
        f"{max(j.finished_at or 0 for j in jobs.values()) - deleted_at:.2f}s after the delete"
    )


# --- draining: the local backend driven directly ----------------------------------------------


@pytest.mark.timeout(180)
def test_scale_down_drains_a_busy_worker_before_it_exits(
    redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    st = _stack(tmp_path, redis_url, tiny_model_dir)
    log = (tmp_path / "workers.log").open("ab")

    def spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    with settings_for(st) as settings:
        backend = LocalBackend("tiny", settings, st.queue("tiny"), spawn=spawn, env=st.env)
        try:
            backend.scale_to(2)
            wait_until(lambda: len(_live_workers(st)) == 2, 120, "two workers up", every_s=0.5)
            ids = submit_many(st, "tiny", 64, max_tokens=24)
            wait_until(lambda: len(_busy(st)) == 2, 60, "both workers busy", every_s=0.05)
            backend.scale_to(1)
            (victim,) = [c for c in backend.children if c.retiring]
            held = _busy(st).get(victim.record_hostname, set())
            assert held, "the worker chosen to retire was idle: nothing to prove"
            assert backend.current() == 1
            wait_until(
                lambda: not backend.poll() and victim.proc.poll() is not None,
                120,
                "the retired worker to exit",
                every_s=0.2,
            )
            exited_at = time.time()
            wait_until(lambda: all_done(st, ids), 120, "all jobs done", every_s=0.5)
            jobs = {j.id: j for j in _jobs(st, ids)}
            with Session(st.engine) as s:
                record = s.get(WorkerRecord, victim.record_hostname)
            silent_back_s = _heartbeat_path_recovery(st, settings)
        finally:
            backend.close()
            log.close()
            st.stop()
    assert victim.proc.returncode == 0, "warm shutdown, not a kill"
    assert record is not None and record.status == "down"
    for i in held:  # the batch it held when told to retire: finished and stored by itself
        j = jobs[i]
        assert j.status == JobStatus.SUCCEEDED and j.worker == victim.record_hostname
        assert j.attempts == 1 and (j.finished_at or 0) <= exited_at
    _assert_each_job_once(list(jobs.values()), len(ids))
    assert all(j.attempts == 1 for j in jobs.values())
    print(f"\nretired a worker holding {len(held)} running jobs; all stored by it before exit")
    print(f"a worker nobody saw die: its jobs back in the queue {silent_back_s:.2f}s after kill")
    assert silent_back_s < 10


def _heartbeat_path_recovery(st: Stack, settings: Settings) -> float:
    """The fallback for workers no backend watches (compose, kubernetes, none): kill the
    survivor while it holds jobs, nobody polls the backend, and an in-process reaper finds its
    jobs by its heartbeat silence (3 x LMQUEUE_HEARTBEAT_S=1 here). Returns kill -> re-sent."""
    ids = submit_many(st, "tiny", 32, max_tokens=24)
    killed_at, held, _host = _kill_busy_worker(st)
    client = redis.Redis.from_url(st.redis_url)
    reaper = Reaper(settings, client, {"tiny": st.queue("tiny")})
    wait_until(
        lambda: reaper.run_once(time.time())["worker_lost"] > 0, 30, "the reaper", every_s=0.2
    )
    client.close()
    jobs = {j.id: j for j in _jobs(st, ids)}
    assert all(jobs[i].status == JobStatus.QUEUED for i in held)
    return max(jobs[i].enqueued_at or 0 for i in held) - killed_at


def _busy(st: Stack) -> dict[str, set[str]]:
    with Session(st.engine) as s:
        rows = s.execute(select(Job.worker, Job.id).where(Job.status == JobStatus.RUNNING)).all()
    out: dict[str, set[str]] = {}
    for worker, job_id in rows:
        out.setdefault(str(worker), set()).add(str(job_id))
    return out
