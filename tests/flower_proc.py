"""`lmqueue flower` as a process beside a test stack."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from cli.procs import Proc, free_port, python_argv, wait_until
from cli.stack import Stack


@contextmanager
def flower_process(stack: Stack, auth: tuple[str, str]) -> Iterator[str]:
    """Flower on a free port with the stack's settings and basic auth `auth`; yields its URL
    once it answers."""
    port = free_port()
    env = {**stack.env, "LMQUEUE_FLOWER_BASIC_AUTH": ":".join(auth)}
    argv = python_argv("-m", "cli", "flower", "--port", str(port))
    proc = Proc("flower", argv, env, stack.log_dir)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"flower exited:\n{proc.tail()}")
        try:
            return httpx.get(f"{url}/healthcheck", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 60, "Flower to answer")
        yield url
    finally:
        proc.stop()
