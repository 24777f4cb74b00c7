"""LMQUEUE_TASK_EVENTS=false: a worker sends no per-task events (received, started, succeeded:
three publishes a job that a CPU-bound worker pays for, bench/RESULTS.md), still sends its
heartbeats (Flower lists it), and the Flower that `lmqueue flower` starts does not turn task
events back on (it would, every 5 s, by default). Proved with a real worker, a real Flower and
a Celery event receiver on the stack's Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from cli.procs import wait_until
from cli.stack import Stack, running
from lmqueue.broker import celery_config
from lmqueue.commands import flower_argv
from tests.flower_proc import flower_process

pytestmark = pytest.mark.timeout(180)


class Events:
    """Every Celery event on the stack's broker, captured in a thread."""

    def __init__(self, stack: Stack):
        self.app = Celery("events-probe")
        self.app.conf.update(celery_config(stack.settings()))
        self.seen: list[dict[str, Any]] = []
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._capture, daemon=True)

    def _capture(self) -> None:
        with self.app.connection_for_read() as conn:
            self._receiver = self.app.events.Receiver(conn, handlers={"*": self.seen.append})
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> Events:
        self._thread.start()
        wait_until(lambda: self._receiver is not None, 10, "the event receiver")
        return self

    def __exit__(self, *_: object) -> None:
        self._receiver.should_stop = True
        self._thread.join(5)

    def types(self) -> set[str]:
        return {e["type"] for e in list(self.seen)}

    def heartbeat_after(self, t: float) -> bool:
        return any(e["type"] == "worker-heartbeat" and e["timestamp"] > t for e in list(self.seen))


@pytest.fixture(scope="module")
def quiet_stack(
    redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    st = Stack(
        f"sqlite:///{tmp_path_factory.mktemp('ev') / 'lmqueue.db'}",
        redis_url,
        {"tiny": tiny_model_dir},
        tmp_path_factory.mktemp("l"),
        extra_env={"LMQUEUE_TASK_EVENTS": "false"},
    )
    with running(st, ["tiny"]), flower_process(st, ("ops", "s3cret-flower-pass")):
        yield st


# Flower broadcasts `enable_events` every 5 s from its start unless it runs with
# --enable_events=False: a worker heartbeat sent later than this after Flower answered comes
# after its first broadcast.
FLOWER_TICK_S = 5.5


def test_no_task_events_but_heartbeats(quiet_stack: Stack) -> None:
    flower_up = time.time()  # the fixture yields once Flower answers: its timer is running
    with Events(quiet_stack) as events, quiet_stack.client() as client:
        wait_until(
            lambda: events.heartbeat_after(flower_up + FLOWER_TICK_S),
            30,
            "a heartbeat after Flower's first enable-events broadcast",
            every_s=0.2,
        )
        job_id = quiet_stack.submit(client, "tiny", "no events, please", max_tokens=2)
        assert quiet_stack.wait_job(client, job_id)["status"] == "succeeded"
        done = time.time()
        # A heartbeat sent after the job was stored: anything the job sent came before it.
        wait_until(lambda: events.heartbeat_after(done), 30, "a worker heartbeat", every_s=0.2)
    assert not {t for t in events.types() if t.startswith("task-")}, events.types()


def test_flower_is_told_to_leave_them_off() -> None:
    assert "--enable_events=False" in flower_argv(5555, task_events=False)
    assert not any("enable_events" in a for a in flower_argv(5555))
