"""The shell's entry points: `python -m cli` is the `lmqueue` command, with every sub-command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def test_cli_registers_the_scheduler_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cli", "scheduler", "--help"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "usage: lmqueue scheduler" in out


@pytest.mark.parametrize(
    ("argv", "env_url"),
    [
        (["submit", "hello", "--model", "tiny"], "http://127.0.0.1:{port}"),
        (["--url", "http://127.0.0.1:{port}", "get", "job_x"], ""),
        (["batch", "status", "batch_x", "--url", "http://127.0.0.1:{port}"], ""),
    ],
)
def test_no_api_is_one_line_naming_the_url_and_the_setting(argv: list[str], env_url: str) -> None:
    from cli.procs import free_port

    port = free_port()  # nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMQUEUE_")}
    if env_url:
        env["LMQUEUE_API_URL"] = env_url.format(port=port)
    argv = [a.format(port=port) for a in argv]
    run = subprocess.run(
        [sys.executable, "-m", "cli", *argv], env=env, capture_output=True, text=True
    )
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert f"http://127.0.0.1:{port}" in lines[0] and "LMQUEUE_API_URL" in lines[0]
    assert "--url" in lines[0]
