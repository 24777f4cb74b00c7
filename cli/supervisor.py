"""Runs a set of child processes for `lmqueue up` and stops them all, cleanly, on Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

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

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, argv)
        # A new session: Ctrl-C reaches only us, and we stop children in order.
        child.proc = subprocess.Popen(list(argv), env=env or self.env, start_new_session=True)
        self.children.append(child)
        log.info("started %s (pid %d)", name, child.proc.pid)
        return child

    def wait(self) -> str | None:
        """Block until a child exits (returns its name) or we are interrupted (returns None)."""
        try:
            while True:
                for child in self.children:
                    if child.proc is not None and child.proc.poll() is not None:
                        return child.name
                time.sleep(0.5)
        except KeyboardInterrupt:
            return None

    def stop(self, timeout_s: float = 45.0) -> None:
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
