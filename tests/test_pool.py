"""The per-host worker pool: places (one worker per GPU unless a model asks for more), workers
forked from a pre-imported template, and a draining worker taken back into service."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from cli.procs import wait_until
from cli.stack import Stack
from lmqueue.tables import Job, WorkerRecord
from scheduler.backends.local import LocalBackend
from scheduler.forking import TemplateSpawner
from scheduler.pool import Places, host_gpus
from tests.scheduler_load import all_done, settings_for, submit_many


def test_one_worker_per_gpu_unless_the_model_asks_for_more() -> None:
    places = Places(["0", "1"])
    a1, a2 = places.take("a"), places.take("a")
    assert a1 and a2 and {a1.place.device, a2.place.device} == {"0", "1"}
    assert places.take("a") is None and places.take("b", per_place=4) is None
    assert a1.env(9100) == {
        "CUDA_VISIBLE_DEVICES": a1.place.device,
        "LMQUEUE_WORKER_METRICS_PORT": str(9100 + a1.place.index),
    }
    places.give_back(a2)
    b1, b2 = places.take("b", per_place=2), places.take("b", per_place=2)
    assert b1 and b2 and b1.place is b2.place, "a small model shares its GPU with itself"
    assert places.take("a") is None and places.take("b", per_place=2) is None
    cpu = Places([None])
    only = cpu.take("a")
    assert only and only.env(0) == {"CUDA_VISIBLE_DEVICES": ""} and not cpu.has_gpus


def test_host_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    assert host_gpus("none") == [] and host_gpus("2, 3") == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert host_gpus("auto") == ["1", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert host_gpus("auto") == []


def _first_job_started(st: Stack, ids: list[str], worker_prefix: str) -> float | None:
    with Session(st.engine) as s:
        rows = s.scalars(select(Job).where(Job.id.in_(ids), Job.started_at.is_not(None))).all()
    starts = [j.started_at for j in rows if (j.worker or "").startswith(worker_prefix)]
    return min(starts) if starts else None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_forked_workers_serve_drain_and_return_to_service(
    redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    st = Stack(
        f"sqlite:///{tmp_path / 'lmqueue.db'}", redis_url, {"tiny": tiny_model_dir}, tmp_path
    )
    st.migrate()
    forker = TemplateSpawner(env=st.env)
    with settings_for(st) as settings:
        # Two "GPUs": on this CPU-only machine CUDA_VISIBLE_DEVICES=0/1 changes nothing, but
        # the pinning and the cap are the pool's.
        places = Places(["0", "1"])
        backend = LocalBackend(
            "tiny", settings, st.queue("tiny"), spawn=forker, env=st.env, places=places
        )
        try:
            forker.start()
            ids = submit_many(st, "tiny", 40, max_tokens=4)
            t0 = time.time()
            backend.scale_to(3)  # capped by the places: two workers, one per GPU
            assert backend.current() == 2 and places.take("tiny") is None
            wait_until(lambda: all_done(st, ids), 180, "40 jobs done", every_s=0.2)
            first = min(_first_job_started(st, ids, c.nodename) or 1e18 for c in backend.children)
            pids = {c.proc.pid for c in backend.children}
            with Session(st.engine) as s:
                hosts = {w.hostname for w in s.scalars(select(WorkerRecord))}
            assert {h.rsplit("/", 1)[1] for h in hosts} >= {str(p) for p in pids}

            more = submit_many(st, "tiny", 64, max_tokens=24)
            wait_until(
                lambda: len(backend._running_jobs()) == 2, 60, "both workers busy", every_s=0.05
            )
            backend.scale_to(1)  # a busy worker drains: it stops consuming, finishes its jobs
            (retiring,) = [c for c in backend.children if c.retiring]
            assert retiring.terminated_at is None
            backend.scale_to(2)  # the backlog is back before it stopped: it serves again
            assert not any(c.retiring for c in backend.children)
            assert {c.proc.pid for c in backend.children} == pids, "resumed, none spawned"
            wait_until(lambda: all_done(st, more), 120, "64 more jobs done", every_s=0.2)
            late = submit_many(st, "tiny", 8, max_tokens=2)
            wait_until(lambda: all_done(st, late), 60, "8 late jobs done", every_s=0.2)
            with Session(st.engine) as s:
                rows = s.scalars(select(Job).where(Job.id.in_(late))).all()
            assert {j.worker for j in rows} <= {c.record_hostname for c in backend.children}

            backend.scale_to(0)
            wait_until(
                lambda: not backend.poll() and not backend.children,
                120,
                "both workers retired",
                every_s=0.2,
            )
            assert all(not p.models for p in places.places), "every GPU given back"
        finally:
            backend.close()
            forker.close()
            st.stop()
    print(f"\nforked worker: scale_to -> first job started {first - t0:.2f}s; {retiring.nodename}")
