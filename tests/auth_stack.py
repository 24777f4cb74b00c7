"""Helpers for the operations tests: stacks with auth on, and API keys made by the real CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from cli.procs import python_argv
from cli.stack import Stack

ROOT = Path(__file__).resolve().parent.parent


def auth_stack(
    database_url: str,
    redis_url: str,
    model_dir: Path,
    log_dir: Path,
    idle: str = "idle",
    **env: str,
) -> Stack:
    """A stack whose API requires keys; models "tiny" and `idle` (nothing serves it). The
    database is the session's: a test that counts a model's jobs names its own idle model."""
    return Stack(
        database_url,
        redis_url,
        {"tiny": model_dir, idle: model_dir},
        log_dir,
        extra_env={"LMQUEUE_AUTH_ENABLED": "true", **env},
    )


def lmqueue_cli(
    stack: Stack, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `lmqueue` CLI against the stack's database (env overrides the stack's)."""
    return subprocess.run(
        python_argv("-m", "cli", *args),
        env={**stack.env, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def create_key(stack: Stack, name: str, admin: bool = False) -> str:
    """`lmqueue keys create`: the key is the only line on stdout."""
    proc = lmqueue_cli(stack, "keys", "create", "--name", name, *(["--admin"] if admin else []))
    assert proc.returncode == 0, proc.stderr
    key = proc.stdout.strip()
    assert key.startswith("lmq_") and "\n" not in key, proc.stdout
    return key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def as_key(stack: Stack, key: str) -> httpx.Client:
    return stack.client(headers=bearer(key))
