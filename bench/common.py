"""Shared helpers for the benchmarks: a real stack (API + workers), input files, the bench
model, mixed-length prompts and a timer."""

from __future__ import annotations

import json
import os
import random
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from cli.procs import scratch_postgres_database, wait_until
from cli.stack import Stack

TERMINAL = {"completed", "failed", "expired", "cancelled"}
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CACHE = Path.home() / ".cache" / "lmqueue-bench"


def write_input(path: Path, n: int, model: str, max_tokens: int = 1) -> int:
    """An OpenAI Batch input file of n /v1/completions lines; returns its size in bytes."""
    with path.open("w") as f:
        for i in range(n):
            body = {
                "model": model,
                "prompt": f"request {i}: say something",
                "max_tokens": max_tokens,
            }
            f.write(
                json.dumps(
                    {
                        "custom_id": f"req-{i}",
                        "method": "POST",
                        "url": "/v1/completions",
                        "body": body,
                    }
                )
                + "\n"
            )
    return path.stat().st_size


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB, from /proc."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


@contextmanager
def bench_stack(
    models: dict[str, str],
    extra_env: dict[str, str] | None = None,
    worker_module: str = "celery",
) -> Iterator[Stack]:
    """A migrated, not yet started stack; SQLite in a temp dir, or a fresh PostgreSQL database
    with BENCH_DB=postgres (on TEST_POSTGRES_URL's server). Stops everything (and drops the
    database) at the end. `worker_module`: see cli.stack.Stack.worker_module."""
    tmp = Path(tempfile.mkdtemp(prefix="lmqbench-"))
    (tmp / "logs").mkdir()
    env = {
        "LMQUEUE_DATA_DIR": str(tmp / "data"),
        "LMQUEUE_MODELS": ",".join(f"{k}={v}" for k, v in models.items()),
        **(extra_env or {}),
    }
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    with ExitStack() as cleanup:
        if os.environ.get("BENCH_DB") == "postgres":
            admin = os.environ.get("TEST_POSTGRES_URL", DEFAULT_PG)
            db = cleanup.enter_context(scratch_postgres_database(admin))
        else:
            db = f"sqlite:///{tmp / 'bench.db'}"
        paths = {k: Path(v) for k, v in models.items()}
        st = Stack(db, redis_url, paths, tmp / "logs", extra_env=env, worker_module=worker_module)
        st.migrate()
        try:
            yield st
        finally:
            st.stop()


def wait_batch(
    client: Any,
    batch_id: str,
    until: Callable[[dict[str, Any]], bool],
    timeout_s: float = 600,
    every_s: float = 0.05,
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        b: dict[str, Any] = client.get(f"/v1/batches/{batch_id}").json()
        return b if until(b) else None

    return wait_until(check, timeout_s, f"batch {batch_id}", every_s=every_s)  # type: ignore[no-any-return]


def upload(client: Any, path: Path) -> str:
    with path.open("rb") as fh:
        resp = client.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": (path.name, fh, "application/jsonl")},
        )
    resp.raise_for_status()
    return str(resp.json()["id"])


def now() -> float:
    return time.perf_counter()


def bench_model_dir(size: str = "bench") -> Path:
    from worker.demo_model import build_demo_model

    return build_demo_model(CACHE / size, size=size)  # type: ignore[arg-type]


def mixed_prompts(tokenizer: Any, n: int, lo: int = 10, hi: int = 200, seed: int = 0) -> list[str]:
    """n prompts of lo..hi tokens cut from CPython's own sources (always on disk)."""
    rng = random.Random(seed)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    ids = tokenizer(text).input_ids
    prompts = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        start = rng.randrange(0, len(ids) - length)
        prompts.append(tokenizer.decode(ids[start : start + length]))
    return prompts


@contextmanager
def timed() -> Iterator[list[float]]:
    box: list[float] = []
    t0 = time.perf_counter()
    yield box
    box.append(time.perf_counter() - t0)
