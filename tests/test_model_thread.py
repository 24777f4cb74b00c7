"""One thread runs the model: the worker loads it in a thread that ends
(worker.runtime.in_passing_thread) and every later use goes through the loop's thread
(WorkerLoop.call), so libgomp keeps one thread pool (see in_passing_thread's docstring)."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
import torch

from cli.procs import wait_until
from worker.loop import WorkerLoop
from worker.runtime import in_passing_thread


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_returns_the_value_and_raises_the_error() -> None:
    def bad_load() -> None:
        raise ValueError("bad model")

    assert in_passing_thread(lambda: 42) == 42
    with pytest.raises(ValueError, match="bad model"):
        in_passing_thread(bad_load)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_torch_thread_pool_of_the_loading_thread_goes_with_it() -> None:
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no pool to leave behind")
    before = _threads()

    def parallel_work() -> float:
        # Well above aten's grain size, so it runs as a parallel region on the thread pool.
        return float(torch.ones(4_000_000).add_(1).sum())

    assert in_passing_thread(parallel_work) == 8_000_000
    # The pool's threads leave after their master thread: back to the threads there were.
    wait_until(lambda: _threads() <= before, 10, "the loading thread's pool to end")


class _NoWork:
    """A backend with nothing to run: the loop only serves calls (unit test, no model)."""

    admit_batch = 1

    def capacity(self) -> int:
        return 1

    def idle(self) -> bool:
        return True

    def cancel(self, keys: Any) -> None:
        pass


def test_calls_run_on_the_loop_thread_and_end_with_it() -> None:
    loop = WorkerLoop(_NoWork(), "m", "w", lease_s=60, hold=1)  # type: ignore[arg-type]
    loop.start()
    assert loop.call(lambda: threading.current_thread().name) == "slot-loop"
    with pytest.raises(ZeroDivisionError):
        loop.call(lambda: 1 / 0)
    loop.stop(timeout_s=5)
    with pytest.raises(RuntimeError, match="shutting down"):
        loop.call(lambda: 1)
