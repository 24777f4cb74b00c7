"""Fair share between API keys: a small batch's completion time alone, and behind another key's
large batch, with the dispatcher's metering (the default) and without it (a window so large
that every line is sent at once, as before the dispatcher).

A real API (keys on) and one Celery worker serving the benchmark-only echo engine
(bench/echo_engine.py), so the figures measure the queue, not a model. Key B's 100-line batch
is timed from POST /v1/batches to `completed`: first alone, then created right after key A's
N-line batch went `in_progress` and started to run. Key A's rate (lines/s, create ->
completed) shows the large batch still drains at full speed.

    python -m bench.fairshare [N] [LMQUEUE_SETTING=VALUE ...]   (BENCH_DB=postgres for PG)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench.common import bench_stack, now, upload, wait_batch, write_input
from cli.procs import python_argv
from cli.stack import Stack

SMALL = 100
UNMETERED = {"LMQUEUE_BATCH_DISPATCH_WINDOW": "10000000"}


def _key(st: Stack, name: str) -> str:
    argv = python_argv("-m", "cli", "keys", "create", "--name", name)
    out = subprocess.run(argv, env=st.env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _create(client: httpx.Client, path: Path) -> str:
    file_id = upload(client, path)
    resp = client.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions"}
    )
    resp.raise_for_status()
    return str(resp.json()["id"])


def _done(b: dict[str, Any]) -> bool:
    return b["status"] in ("completed", "failed")


def run(n: int, env: dict[str, str]) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp())
    small, big = tmp / "small.jsonl", tmp / "big.jsonl"
    write_input(small, SMALL, "null")
    write_input(big, n, "null")
    env = {"LMQUEUE_AUTH_ENABLED": "true", **env}
    with bench_stack({"null": "echo"}, env, worker_module="bench.echo_worker") as st:
        st.start_api()
        st.start_worker("null", concurrency=32)
        key_a, key_b = _key(st, "a"), _key(st, "b")
        with (
            st.client(headers={"Authorization": f"Bearer {key_a}"}) as a,
            st.client(headers={"Authorization": f"Bearer {key_b}"}) as b,
        ):
            t0 = now()
            wait_batch(b, _create(b, small), _done)
            alone = now() - t0
            t_big = now()
            big_id = _create(a, big)
            wait_batch(a, big_id, lambda x: x["request_counts"]["completed"] > 0, every_s=0.02)
            t1 = now()
            small_id = _create(b, small)
            wait_batch(b, small_id, _done, every_s=0.02)
            behind = now() - t1
            big_done = wait_batch(a, big_id, _done, every_s=0.1)
            big_s = now() - t_big
    assert big_done["request_counts"]["completed"] == n, big_done
    return {"alone": alone, "behind": behind, "big_rate": n / big_s, "big_s": big_s}


def main(n: int = 20_000, extra: dict[str, str] | None = None) -> None:
    extra = extra or {}
    print(f"load average: {os.getloadavg()[0]:.2f} (1 min)")
    for label, env in (("fair share", extra), ("no metering", {**UNMETERED, **extra})):
        r = run(n, env)
        print(
            f"{label}: {SMALL}-line batch of key B alone {r['alone']:.2f} s; behind key A's "
            f"{n}-line batch {r['behind']:.2f} s ({r['behind'] / r['alone']:.1f}x alone); "
            f"key A {r['big_rate']:.0f} lines/s ({r['big_s']:.1f} s)"
        )
    print(f"load average: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    args = sys.argv[1:]
    count = int(args.pop(0)) if args and args[0].isdigit() else 20_000
    main(count, dict(a.split("=", 1) for a in args))
