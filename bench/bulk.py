"""Requests/s through the bulk batch path, against a raw Redis list loop in the same run.

Bulk path: a real API and one Celery worker serving the benchmark-only echo engine
(bench/echo_engine.py: no weights, no torch compute), SQLite by default (BENCH_DB=postgres
for PostgreSQL). An N-line file is uploaded, the batch created, and the clock runs from create
until `completed` (every line validated, inserted, enqueued in 32-id messages, claimed, echoed,
stored).

Baseline: the least a Redis queue can do per request, one message per request: a producer
LPUSHes N JSON requests to a list, a consumer process BRPOPs each, echoes it and HSETs the
result, and the clock stops when all N results are in.

Prints both rates and their ratio; asserts nothing about speed.

    python -m bench.bulk [N] [LMQUEUE_SETTING=VALUE ...]   (from the repository root)
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

from bench.common import bench_stack, now, upload, wait_batch, write_input


def _consume(redis_url: str, key: str, n: int) -> None:
    import redis

    r = redis.Redis.from_url(redis_url)
    for _ in range(n):
        _, raw = r.brpop([key])  # type: ignore[misc]
        req = json.loads(raw)
        text = req["body"]["prompt"][: req["body"]["max_tokens"]]
        r.hset(f"{key}:results", req["custom_id"], json.dumps({"text": text}))


def raw_redis_loop(redis_url: str, n: int) -> float:
    """Requests/s of the one-message-per-request Redis loop."""
    import redis

    key = f"lmqbench:raw:{os.getpid()}"
    r = redis.Redis.from_url(redis_url)
    r.delete(key, f"{key}:results")
    consumer = mp.get_context("spawn").Process(target=_consume, args=(redis_url, key, n))
    consumer.start()
    t0 = now()
    for i in range(n):
        body = {"model": "null", "prompt": f"request {i}: say something", "max_tokens": 1}
        r.lpush(key, json.dumps({"custom_id": f"req-{i}", "body": body}))
    while cast(int, r.hlen(f"{key}:results")) < n:  # a sync client
        time.sleep(0.01)
    elapsed = now() - t0
    consumer.join()
    r.delete(key, f"{key}:results")
    return n / elapsed


def bulk_path(n: int, env: dict[str, str]) -> tuple[float, float]:
    """(requests/s from create to completed, upload seconds) through lmqueue's batch path."""
    with bench_stack({"null": "echo"}, env, worker_module="bench.echo_worker") as st:
        st.start_api()
        st.start_worker("null", concurrency=32)
        path = Path(tempfile.mkdtemp()) / "input.jsonl"
        write_input(path, n, "null")
        with st.client() as client:
            t0 = now()
            file_id = upload(client, path)
            t1 = now()
            batch = client.post(
                "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions"}
            ).json()
            done = wait_batch(
                client, batch["id"], lambda b: b["status"] in ("completed", "failed"), every_s=0.25
            )
            t2 = now()
        counts = done["request_counts"]
        assert done["status"] == "completed" and counts["completed"] == n, done
        return n / (t2 - t1), t1 - t0


def main(n: int = 20_000, env: dict[str, str] | None = None) -> None:
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    # The baseline runs before and after the bulk path and is averaged: on a shared machine
    # the load moves during a run.
    raw_before = raw_redis_loop(redis_url, n)
    bulk, upload_s = bulk_path(n, env or {})
    raw_after = raw_redis_loop(redis_url, n)
    raw = (raw_before + raw_after) / 2
    print(f"requests={n} (echo model, max_tokens=1, one worker) settings={env or 'defaults'}")
    print(f"bulk batch path: {bulk:.0f} req/s (create -> completed; upload {upload_s:.2f}s)")
    print(
        f"raw Redis list loop: {raw:.0f} req/s (LPUSH / BRPOP / HSET per request; "
        f"{raw_before:.0f} before, {raw_after:.0f} after)"
    )
    print(f"ratio bulk/raw: {bulk / raw:.2f}")


if __name__ == "__main__":
    args = sys.argv[1:]
    count = int(args.pop(0)) if args and args[0].isdigit() else 20_000
    main(count, dict(a.split("=", 1) for a in args))  # e.g. LMQUEUE_MAX_BATCH_SIZE=256
