"""The shell's entry points: `python -m cli` is the `lmqueue` command, with every sub-command."""

from __future__ import annotations

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
