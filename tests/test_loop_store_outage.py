"""The loop when the store or one request misbehaves at admission (unit test: a counting
backend, the store's claim replaced). A store that cannot be reached pauses admission and
running rows go on; before, the step "failed as a whole": every running row was failed with
an engine error and the jobs picked for admission were dropped unresolved, their task threads
waiting forever. The real outage (Postgres cut under a running worker) is in
test_outages.py. And a step that fails beyond repair (cancel raising too) fails its rows without
killing the loop thread: a dead loop left a worker that heartbeats, renews its jobs' leases and
takes messages, so nothing it held was ever recovered."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

import worker.loop as loop_mod
import worker.loop_writer as writer_mod
from worker.loop import Waiting, WorkerLoop


class _Slots:
    admit_batch = 1

    def __init__(self, refuse: str = "") -> None:
        self.admitted: list[str] = []
        self.refuse = refuse

    def capacity(self) -> int:
        return 4 - len(self.admitted)

    def idle(self) -> bool:
        return not self.admitted

    def admit(self, key: str, request: Any) -> None:
        if key == self.refuse:
            raise ValueError("a request this backend chokes on")
        self.admitted.append(key)


class _Store:
    """claim_jobs that fails while `down`, as psycopg does when Postgres is unreachable."""

    def __init__(self) -> None:
        self.down = False
        self.stored: list[Any] = []  # what the writer stored

    def claim(self, _session: Any, ids: list[str], *_: Any) -> list[SimpleNamespace]:
        if self.down:
            raise OperationalError("UPDATE jobs ...", {}, Exception("connection refused"))
        return [SimpleNamespace(id=i) for i in ids]


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> _Store:
    @contextlib.contextmanager
    def no_store() -> Iterator[None]:
        yield None

    st = _Store()
    monkeypatch.setattr(loop_mod, "session_scope", no_store)
    monkeypatch.setattr(loop_mod, "claim_jobs", st.claim)
    monkeypatch.setattr(writer_mod, "session_scope", no_store)
    monkeypatch.setattr(
        writer_mod, "store_outcomes", lambda _s, outcomes, _w: st.stored.extend(outcomes)
    )
    return st


def _loop(backend: _Slots, n: int) -> WorkerLoop:
    wl = WorkerLoop(backend, "m", "w", lease_s=60, hold=8)  # type: ignore[arg-type]
    wl._waiting = [Waiting(f"j{i}", "/v1/completions", object(), seq=i) for i in range(n)]
    return wl


def test_store_down_pauses_admission_and_keeps_the_jobs_waiting(store: _Store) -> None:
    wl = _loop(_Slots(), 3)
    wl._running["r0"] = Waiting("r0", "/v1/completions", object())  # a row computing
    store.down = True
    wl._expire_and_admit()
    assert [w.job_id for w in wl._waiting] == ["j0", "j1", "j2"]  # nothing lost
    assert list(wl._running) == ["r0"] and wl._writer._writes.empty()  # nothing failed
    assert wl._store_backoff > 0
    wl._expire_and_admit()  # within the backoff: not even tried
    store.down = False
    wl._store_retry_at = 0.0  # the backoff has passed
    wl._expire_and_admit()
    assert wl.backend.admitted == ["j0", "j1", "j2"]  # type: ignore[attr-defined]
    assert wl._store_backoff == 0.0


def test_a_request_the_backend_refuses_fails_alone(store: _Store) -> None:
    wl = _loop(_Slots(refuse="j1"), 3)
    wl._admit()
    assert wl.backend.admitted == ["j0", "j2"]  # type: ignore[attr-defined]
    outcomes, items = wl._writer._writes.get_nowait()  # type: ignore[misc]
    assert [o.job_id for o in outcomes] == ["j1"] and [w.job_id for w in items] == ["j1"]
    assert outcomes[0].error is not None
    assert "could not start" in str(outcomes[0].error)


class _Broken(_Slots):
    """A backend whose step and cancel both raise (a device gone bad)."""

    def step(self) -> None:
        raise RuntimeError("the step blew up")

    def cancel(self, keys: Any) -> None:
        raise RuntimeError("and so did cancel")


def test_a_step_failing_beyond_repair_fails_its_rows_and_the_loop_lives_on(store: _Store) -> None:
    wl = _loop(_Broken(), 1)
    w = wl._waiting[0]
    wl.start()
    try:
        w.done.result(timeout=10)  # failed and stored
        assert [o.job_id for o in store.stored] == ["j0"]
        assert "the step blew up" in str(store.stored[0].error)
        assert wl._threads[0].is_alive()
    finally:
        wl.stop(timeout_s=5)


def test_the_writer_rides_out_about_90_s_then_gives_up_without_a_last_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unreachable(*_: Any) -> None:
        raise OperationalError("INSERT ...", {}, Exception("connection refused"))

    @contextlib.contextmanager
    def no_store() -> Iterator[None]:
        yield None

    waits: list[float] = []
    monkeypatch.setattr(writer_mod, "session_scope", no_store)
    monkeypatch.setattr(writer_mod, "store_outcomes", unreachable)
    monkeypatch.setattr(writer_mod, "time", SimpleNamespace(sleep=waits.append))
    stored: list[int] = []
    writer = writer_mod.ResultWriter("w", lambda *_: None, stored.append)
    item = Waiting("j1", "/v1/completions", object())
    writer._store([], [item])
    assert len(waits) == writer_mod.STORE_ATTEMPTS - 1  # between attempts, none after the last
    assert sum(waits) == pytest.approx(91.5)
    assert item.done.done() and stored == [1]  # its task thread is released all the same
