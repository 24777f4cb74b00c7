"""A job offered twice to one worker (the reaper re-sent its message while the worker held it):
the second copy is resolved at once, so its message is acked and the worker can drain. Before,
both copies could enter the same admission, one claim started both, and the copy overwritten
in the running table was never resolved: its task hung and the worker never retired."""

from __future__ import annotations

import threading
from typing import Any

from cli.procs import wait_until
from worker.loop import Waiting, WorkerLoop


class _NoSlots:
    admit_batch = 1

    def capacity(self) -> int:
        return 0


def _loop() -> WorkerLoop:
    return WorkerLoop(_NoSlots(), "m", "w", lease_s=60, hold=8)  # type: ignore[arg-type]


def _item(job_id: str) -> Waiting:
    return Waiting(job_id, "/v1/completions", object())


def test_a_job_already_waiting_is_resolved_not_listed_twice() -> None:
    wl = _loop()
    first, again = _item("j1"), _item("j1")
    wl.offer([first])
    taken, overflow = wl.offer([again, _item("j2")])
    assert again.done.done() and not first.done.done()
    assert [w.job_id for w in taken] == ["j2"] and overflow == []
    assert wl.waiting_ids() == ["j1", "j2"]


def test_a_job_already_running_is_resolved() -> None:
    wl = _loop()
    running = _item("j1")
    wl._running["j1"] = running
    again = _item("j1")
    taken, _ = wl.offer([again])
    assert taken == [] and again.done.done() and wl.waiting_ids() == []


def test_one_message_naming_a_job_twice_lists_it_once() -> None:
    wl = _loop()
    a, b = _item("j1"), _item("j1")
    taken: Any
    taken, _ = wl.offer([a, b])
    assert taken == [a] and b.done.done() and wl.waiting_ids() == ["j1"]


def test_an_offer_waiting_for_room_counts_as_held() -> None:
    """The watcher stamps what waiting_ids() names: jobs of a message whose offer waits for
    room must be among them, or the reaper takes that message for lost and sends it again."""
    wl = WorkerLoop(_NoSlots(), "m", "w", lease_s=60, hold=1)  # type: ignore[arg-type]
    wl.offer([_item("j1")])
    blocked = threading.Thread(target=wl.offer, args=([_item("j2"), _item("j3")],), daemon=True)
    blocked.start()
    wait_until(lambda: wl.waiting_ids() == ["j1", "j2", "j3"], 10, "the blocked offer listed")
    with wl._cond:  # room for one: the offer goes through, its second job overflows
        wl._waiting.clear()
        wl._cond.notify_all()
    blocked.join(10)
    assert not blocked.is_alive() and wl.waiting_ids() == ["j2"]
