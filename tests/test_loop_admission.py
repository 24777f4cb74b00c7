"""Admission against rows still being written (unit test: a counting backend, the store's claim
replaced). Finished rows count as running until the writer has stored them, so the store never
shows more running jobs than slots; when they are all that keep a group of waiting jobs out,
the loop waits the few milliseconds of the write instead of leaving the slots empty a step."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

import worker.loop as loop_mod
from worker.loop import STORE_WAIT_S, Waiting, WorkerLoop


class _Slots:
    """Four free slots (the finished rows already left them); rows decode (not idle)."""

    admit_batch = 4

    def __init__(self) -> None:
        self.admitted: list[str] = []

    def capacity(self) -> int:
        return 4 - len(self.admitted)

    def idle(self) -> bool:
        return False

    def admit(self, key: str, request: Any) -> None:
        self.admitted.append(key)


@pytest.fixture
def loop(monkeypatch: pytest.MonkeyPatch) -> WorkerLoop:
    @contextlib.contextmanager
    def no_store() -> Iterator[None]:
        yield None

    def claim_all(_session: Any, ids: list[str], *_: Any) -> list[SimpleNamespace]:
        return [SimpleNamespace(id=i) for i in ids]

    monkeypatch.setattr(loop_mod, "session_scope", no_store)
    monkeypatch.setattr(loop_mod, "claim_jobs", claim_all)
    wl = WorkerLoop(_Slots(), "m", "w", lease_s=60, hold=8)  # type: ignore[arg-type]
    wl._waiting = [Waiting(f"j{i}", "/v1/completions", object(), seq=i) for i in range(4)]
    wl._storing = 2  # two finished rows the writer is storing
    return wl


def _stored_after(wl: WorkerLoop, seconds: float) -> None:
    def write() -> None:
        time.sleep(seconds)
        with wl._cond:
            wl._storing = 0
            wl._cond.notify_all()

    threading.Thread(target=write, daemon=True).start()


def test_admission_waits_for_a_write_in_progress(
    loop: WorkerLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop_mod, "STORE_WAIT_S", 10.0)  # a loaded CI machine may be slow
    _stored_after(loop, 0.005)
    loop._admit()
    assert loop.backend.admitted == ["j0", "j1", "j2", "j3"]  # type: ignore[attr-defined]


def test_admission_does_not_wait_on_a_stuck_writer(loop: WorkerLoop) -> None:
    t0 = time.monotonic()
    loop._admit()
    assert loop.backend.admitted == []  # type: ignore[attr-defined]
    assert time.monotonic() - t0 < STORE_WAIT_S + 1.0
    assert [w.job_id for w in loop._waiting] == ["j0", "j1", "j2", "j3"]


def test_admission_follows_the_queue_order_not_the_offer_order(loop: WorkerLoop) -> None:
    """Task threads prepare messages in parallel and offer them in any order; jobs start in
    the order they entered the queue (priority first), and one without a stamp comes last."""
    stamps = {"j0": None, "j1": 30.0, "j2": 10.0, "j3": 20.0}
    for w in loop._waiting:
        w.enqueued_at = stamps[w.job_id]
    loop._waiting.append(Waiting("urgent", "/v1/completions", object(), priority=9, seq=4))
    loop._storing = 0
    loop._admit()  # four slots for five jobs
    assert loop.backend.admitted == ["urgent", "j2", "j3", "j1"]  # type: ignore[attr-defined]
    assert [w.job_id for w in loop._waiting] == ["j0"]
