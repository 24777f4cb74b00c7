"""The pool's side of the worker template (worker/template.py): start it once, ask it to fork
workers, and see each forked worker through a Popen-like handle the local backend can drive.

The template is a separate program on purpose: the scheduler never imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from contextlib import suppress
from typing import Any

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0  # importing torch on a loaded host


class ForkedWorker:
    """The subset of subprocess.Popen the local backend uses, for a template's child."""

    def __init__(self, template: Template, pid: int) -> None:
        self.template, self.pid = template, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.template.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
            self.template.wait_event(0.1)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with suppress(ProcessLookupError):  # exited just now: the template reports it
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(9)


class Template:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.template"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        self._codes: dict[int, int] = {}
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._changed = threading.Condition()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, name="template-reader", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            if "exited" in message:
                with self._changed:
                    self._codes[int(message["exited"])] = int(message["code"])
                    self._changed.notify_all()
            else:
                self._replies.put(message)
        with self._changed:  # the template is gone: nothing more will be reported
            self._changed.notify_all()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        message = self._reply(timeout_s)
        if not message.get("ready"):
            raise RuntimeError(f"worker template: unexpected first message {message}")

    def _reply(self, timeout_s: float) -> dict[str, Any]:
        try:
            return self._replies.get(timeout=timeout_s)
        except queue.Empty:
            code = self.proc.poll()
            raise RuntimeError(f"worker template did not answer (exit code {code})") from None

    def spawn(self, argv: list[str], env: dict[str, str]) -> ForkedWorker:
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"argv": argv, "env": env}) + "\n")
            self.proc.stdin.flush()
            pid = int(self._reply(30.0)["spawned"])
        return ForkedWorker(self, pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exit_code(self, pid: int) -> int | None:
        with self._changed:
            if pid in self._codes:
                return self._codes.pop(pid)
        if self.alive():
            return None
        # The template died: its children were re-parented; gone ones count as failed.
        try:
            os.kill(pid, 0)
            return None
        except ProcessLookupError:
            return -1

    def wait_event(self, timeout_s: float) -> None:
        with self._changed:
            self._changed.wait(timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()  # the template waits for its children, then exits
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class TemplateSpawner:
    """A local-backend spawner that forks workers from one template, restarted if it dies."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self._env = env
        self.template: Template | None = None

    def start(self) -> Template:
        if self.template is None or not self.template.alive():
            started = time.monotonic()
            self.template = Template(self._env)
            self.template.wait_ready()
            log.info("worker template ready in %.1fs", time.monotonic() - started)
        return self.template

    def __call__(self, argv: list[str], env: dict[str, str]) -> ForkedWorker:
        return self.start().spawn(argv, env)

    def close(self) -> None:
        if self.template is not None:
            self.template.close()
