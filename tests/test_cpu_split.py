"""bench.cpu_split: the CPU a phase used, split into the model's compute and the rest."""

from __future__ import annotations

import os
import threading
import time

from bench import cpu_split


def test_split_puts_the_two_busiest_worker_threads_in_compute() -> None:
    tick = cpu_split.TICK_S
    before = cpu_split.Snapshot(worker={1: 0, 2: 0, 3: 0, 4: 0}, others={"api": 10}, machine=0)
    after = cpu_split.Snapshot(
        worker={1: 500, 2: 480, 3: 7, 4: 3, 5: 2},  # 5: a thread started meanwhile
        others={"api": 25},
        machine=1100,
    )
    got = cpu_split.split(before, after)
    assert got["worker compute"] == (500 + 480) * tick
    assert got["worker other threads"] == (7 + 3 + 2) * tick
    assert got["api"] == 15 * tick
    assert abs(got["rest of machine"] - (1100 - 980 - 12 - 15) * tick) < 1e-9
    assert abs(cpu_split.service_share(got) - (12 + 15) * tick) < 1e-9
    assert "worker compute" not in cpu_split.describe(got, skip=cpu_split.NOT_SERVICE)


def test_a_busy_thread_of_a_real_process_shows_up() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    before = cpu_split.snapshot(os.getpid(), {})
    t = threading.Thread(target=spin)
    t.start()
    deadline = time.monotonic() + 10
    try:
        while cpu_split.split(before, cpu_split.snapshot(os.getpid(), {}))["worker compute"] < 0.2:
            assert time.monotonic() < deadline, "a spinning thread used no CPU in 10 s"
            time.sleep(0.05)
    finally:
        stop.set()
        t.join()
    assert cpu_split.snapshot(-1, {"gone": -1}).worker == {}  # no such process: nothing, no error
