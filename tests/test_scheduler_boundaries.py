"""The scheduler stays light: neither torch nor FastAPI (nor the worker package) is imported by
its entry point or by any module its loop runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

CHECK = (
    "import sys, importlib; [importlib.import_module(m) for m in {mods!r}]; "
    "heavy = [m for m in ('torch', 'transformers', 'worker', 'fastapi', 'starlette') "
    "if m in sys.modules]; assert not heavy, heavy"
)

MODULES = [
    "scheduler.main",
    "scheduler.loop",
    "scheduler.recovery",
    "scheduler.backends.local",
    "scheduler.backends.compose",
    "scheduler.backends.kubernetes",
    "scheduler.metrics",
]


def test_scheduler_imports_neither_torch_nor_fastapi() -> None:
    subprocess.run([sys.executable, "-c", CHECK.format(mods=MODULES)], check=True)


def test_cli_registers_the_scheduler_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cli", "scheduler", "--help"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "usage: lmqueue scheduler" in out
