"""Scale-up time: a backlog is waiting, new workers start; seconds until each new worker has
started its first job. Cold (`python -m celery worker`, as `lmqueue scheduler` starts one) against
forked from the pool's pre-imported template (worker/template.py), one worker alone and two
starting together, in the same process, the tiny demo model (its load is ~0 s, so the figure
is the start itself).

    PYTHONPATH=$PWD python -m bench.worker_start [--rounds 1]

Prints figures, asserts nothing. The template's own start (imports once) is printed apart.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cli.procs import wait_until
from cli.stack import Stack
from lmqueue.broker import celery_config
from lmqueue.commands import worker_argv
from lmqueue.contract import TASK_PROCESS_JOBS
from lmqueue.tables import Job, JobStatus, new_id
from lmqueue.transitions import mark_enqueued
from scheduler.forking import TemplateSpawner
from worker.demo_model import build_demo_model

Spawn = Callable[[list[str], dict[str, str]], Any]


def submit_many(st: Stack, n: int) -> list[str]:
    """n queued jobs in the store, one message each, as the API sends them."""
    from celery import Celery

    app = Celery("bench-producer")
    app.conf.update(celery_config(st.settings()))
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 8, "temperature": 0}
    jobs = [
        Job(id=new_id("job"), model="tiny", endpoint="/v1/completions", body=body) for _ in range(n)
    ]
    ids = [j.id for j in jobs]
    with Session(st.engine) as session:
        session.add_all(jobs)
        session.commit()
        for job_id in ids:
            app.send_task(TASK_PROCESS_JOBS, kwargs={"job_ids": [job_id]}, queue=st.queue("tiny"))
        mark_enqueued(session, ids)
        session.commit()
    return ids


def all_done(st: Stack, ids: list[str]) -> bool:
    jobs = st.jobs(ids)
    return len(jobs) == len(ids) and all(j.status in JobStatus.TERMINAL for j in jobs)


def _first_start(st: Stack, ids: list[str], node: str) -> float | None:
    with Session(st.engine) as s:
        rows = s.scalars(select(Job).where(Job.id.in_(ids), Job.started_at.is_not(None))).all()
    starts = [j.started_at for j in rows if j.started_at and (j.worker or "").startswith(node)]
    return min(starts) if starts else None


def one_round(st: Stack, spawn: Spawn, n: int) -> list[float]:
    """n workers start at once against a waiting backlog; seconds to each one's first job."""
    # One message at a time per worker (concurrency 1), enough jobs that a worker coming up
    # late still finds some: the first one up cannot take them all at once.
    ids = submit_many(st, 24 * n)
    procs, nodes = [], []
    t0 = time.time()
    for _ in range(n):
        node = f"bench-{uuid.uuid4().hex[:6]}@{os.uname().nodename}"
        argv = worker_argv("tiny", 1, queue=st.queue("tiny"))
        argv[argv.index("--hostname") + 1] = node
        procs.append(spawn(argv, {**st.env, "LMQUEUE_WORKER_MODEL": "tiny"}))
        nodes.append(node)
    firsts: dict[str, float] = {}

    def each_started() -> bool:
        for node in nodes:
            if node not in firsts and (t := _first_start(st, ids, node)) is not None:
                firsts[node] = t - t0
        return len(firsts) == n

    wait_until(each_started, 300, f"{n} new workers to start a job", every_s=0.05)
    wait_until(lambda: all_done(st, ids), 300, "the backlog done", every_s=0.2)
    for p in procs:
        p.send_signal(15)
    for p in procs:
        p.wait(120)
    return sorted(firsts.values())


def main(rounds: int = 2) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lmq-start-"))
    model = build_demo_model(Path.home() / ".cache" / "lmqueue-bench" / "tiny", size="tiny")
    st = Stack(f"sqlite:///{tmp / 'lmqueue.db'}", "redis://127.0.0.1:6379/0", {"tiny": model}, tmp)
    st.migrate()
    log = (tmp / "workers.log").open("ab")

    def cold(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    forker = TemplateSpawner(env=st.env)
    t = time.monotonic()
    forker.start()
    print(f"template ready (imports, once per pool): {time.monotonic() - t:.2f}s", flush=True)
    results: dict[tuple[str, int], list[list[float]]] = {}
    try:
        for _ in range(rounds):
            for name, spawn in (("cold", cold), ("forked", forker)):
                for n in (1, 2):
                    firsts = one_round(st, spawn, n)
                    results.setdefault((name, n), []).append(firsts)
                    print(f"{name} {n} starting: {[round(x, 2) for x in firsts]} s", flush=True)
    finally:
        forker.close()
        st.stop()
        log.close()
    for (name, n), runs in results.items():
        flat = [round(x, 2) for run in runs for x in run]
        print(
            f"{name:6s} {n} starting: first job after {flat} s (mean {sum(flat) / len(flat):.2f})"
        )
    for n in (1, 2):
        c = [x for run in results[("cold", n)] for x in run]
        f = [x for run in results[("forked", n)] for x in run]
        print(f"{n} starting: cold/forked {sum(c) / len(c) / (sum(f) / len(f)):.1f}x")
    print("load average:", os.getloadavg())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=1)
    main(parser.parse_args().rounds)
