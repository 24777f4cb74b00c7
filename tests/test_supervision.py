"""Supervision: `lmqueue up` stopped by SIGTERM or killed with -9 leaves no process behind; a port
already in use is named before anything starts; a new scheduler retires the workers a dead one
left."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.procs import Proc, free_port, python_argv, wait_until
from cli.stack import Stack
from lmqueue.lifeline import SCHEDULER_PID_ENV, parent_of, pid_alive

pytestmark = pytest.mark.slow


def descendants(root: int) -> set[int]:
    """Every live process below `root` (children started in new sessions included)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            ppid = parent_of(int(entry.name))
            if ppid is not None:
                parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found and pid_alive(child):
                found.add(child)
                todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def up_env(tmp_path: Path, redis_url: str, model_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMQUEUE_")}
    env.update(
        {
            "REDIS_URL": redis_url,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'lmqueue.db'}",
            "LMQUEUE_DATA_DIR": str(tmp_path / "data"),
            "LMQUEUE_MODELS": f"tiny={model_dir}",
            "LMQUEUE_QUEUE_PREFIX": f"lmqsup{os.getpid()}x{os.urandom(3).hex()}",
            "LMQUEUE_EMBEDDED_REDIS": "never",
            "LMQUEUE_FLOWER_PORT": str(free_port()),
            "LMQUEUE_SCHEDULER_METRICS_PORT": str(free_port()),
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        }
    )
    return env


@pytest.fixture
def up(tmp_path: Path, redis_url: str, tiny_model_dir: Path) -> Iterator[tuple[Proc, set[int]]]:
    """`lmqueue up` with API, Flower, scheduler and one worker, once all are running."""
    env = up_env(tmp_path, redis_url, tiny_model_dir)
    proc = Proc("up", python_argv("-m", "cli", "up", "--port", str(free_port())), env, tmp_path)

    def stack_running() -> set[int] | None:
        if not proc.alive():
            raise RuntimeError(f"lmqueue up exited:\n{proc.tail()}")
        tree = descendants(proc.pid)
        workers = [p for p in tree if " worker " in cmdline(p)]
        log = proc.log_path.read_text(errors="replace")
        return tree if workers and "lmqueue is up" in log else None

    tree = wait_until(stack_running, 180, "lmqueue up to start its stack and a worker")
    try:
        yield proc, tree
    finally:
        for pid in descendants(proc.pid) | tree:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.kill_group()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_stopping_lmqueue_up_leaves_no_process(up: tuple[Proc, set[int]], sig: int) -> None:
    proc, tree = up
    assert len(tree) >= 4, [cmdline(p) for p in tree]  # api, flower, scheduler, worker
    os.kill(proc.pid, sig)
    proc.popen.wait(60)

    def all_gone() -> bool:
        return not any(pid_alive(p) for p in tree)

    wait_until(all_gone, 90, "every process of the stack to exit")


def test_a_port_in_use_is_named_before_anything_starts(
    tmp_path: Path, redis_url: str, tiny_model_dir: Path
) -> None:
    env = up_env(tmp_path, redis_url, tiny_model_dir)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["LMQUEUE_FLOWER_PORT"])))
        taken.listen(1)
        argv = [sys.executable, "-m", "cli", "up", "--port", str(free_port())]
        run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "lmqueue is up" not in run.stdout
    assert env["LMQUEUE_FLOWER_PORT"] in run.stderr and "LMQUEUE_FLOWER_PORT" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_new_scheduler_retires_workers_a_dead_one_left(
    redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A worker whose scheduler is gone (its SCHEDULER_PID names a process that is not its
    parent) is warm-shut down by the next scheduler, which starts its own in its place."""
    st = Stack(
        f"sqlite:///{tmp_path / 'lmqueue.db'}",
        redis_url,
        {"tiny": tiny_model_dir},
        tmp_path,
        extra_env={
            "LMQUEUE_SCHEDULER_BACKEND": "local",
            "LMQUEUE_SCHEDULER_MIN_WORKERS": "1",
            "LMQUEUE_SCHEDULER_MAX_WORKERS": "1",
        },
    )
    st.migrate()
    try:
        dead_scheduler = subprocess.Popen([sys.executable, "-c", "pass"])
        dead_scheduler.wait()
        orphan = st.start_worker("tiny", env={SCHEDULER_PID_ENV: str(dead_scheduler.pid)})
        sched = st.start_scheduler()
        wait_until(lambda: not orphan.alive(), 120, "the orphaned worker to be retired")
        assert orphan.popen.returncode == 0  # a warm shutdown, not a kill
        wait_until(
            lambda: any(" worker " in cmdline(p) for p in descendants(sched.pid)),
            60,
            "the scheduler to start its own worker",
        )
        assert "retiring worker" in sched.log_path.read_text()
    finally:
        st.stop()
