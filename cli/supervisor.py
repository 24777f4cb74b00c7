"""Runs a set of child processes for `lmqueue up` and stops them all, cleanly, on Ctrl-C,
SIGTERM or SIGHUP; if it is killed outright, the children get SIGTERM from the kernel
(lmqueue.lifeline)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lmqueue.lifeline import die_with_parent

log = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    argv: Sequence[str]
    proc: subprocess.Popen[bytes] | None = None


class Supervisor:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.children: list[Child] = []
        self.stopping = threading.Event()
        self.signal_name = ""

    def handle_signals(self) -> None:
        """SIGTERM (systemd, docker, `timeout`) and SIGHUP (the terminal closed) stop the stack
        like Ctrl-C does. Main thread only (Python's rule for signal handlers)."""

        def _stop(signum: int, _frame: object) -> None:
            self.signal_name = signal.Signals(signum).name
            self.stopping.set()

        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _stop)

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, argv)
        # A new session: Ctrl-C reaches only us, and we stop children in order. And a death
        # signal: if we are killed (even -9) before we can stop them, they stop themselves.
        child.proc = subprocess.Popen(  # noqa: PLW1509 (spawned from the main thread)
            list(argv), env=env or self.env, start_new_session=True, preexec_fn=die_with_parent()
        )
        self.children.append(child)
        log.info("started %s (pid %d)", name, child.proc.pid)
        return child

    def wait(self) -> str | None:
        """Block until a child exits (returns its name) or we are interrupted: Ctrl-C, SIGTERM
        or SIGHUP (returns None)."""
        try:
            while not self.stopping.is_set():
                exited = self.exited()
                if exited:
                    return exited
                self.stopping.wait(0.5)
        except KeyboardInterrupt:
            self.signal_name = "SIGINT"
        return None

    def exited(self) -> str | None:
        """The name of a child that has exited, if any."""
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                return child.name
        return None

    def stop(self, timeout_s: float = 45.0) -> None:
        # A second Ctrl-C or SIGTERM while stopping must not abandon the children half-way.
        with contextlib.suppress(ValueError):  # not the main thread: handlers stay as they are
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
        for child in reversed(self.children):
            if child.proc is not None and child.proc.poll() is None:
                os.killpg(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in reversed(self.children):
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", child.name)
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait()
