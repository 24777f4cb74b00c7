"""End-to-end throughput: the whole service vs the engine alone vs one request at a time.

    python -m bench.e2e [--requests 256] [--new-tokens 32] [--serial 16]

(a) 256 mixed-length prompts (10-200 tokens) through the whole service: HTTP submit, Redis,
    Celery worker, micro-batcher, engine, result store, poll;
(b) the same requests through the engine in this process, with the same batch settings;
(c) requests one at a time through the service (a subset: --serial of them).
Prints tokens/s for each and the ratios a/b and a/c. Asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from worker.batcher import WorkItem
from worker.runner import Prepared, plan_chunks, to_gen_request

from bench.common import bench_model_dir, mixed_prompts, timed
from cli.embedded import EmbeddedRedis
from cli.stack import Stack
from lmqueue.broker import redis_reachable
from lmqueue.registry import ModelSpec
from lmqueue.settings import Settings
from lmqueue.tables import Job
from worker.engine import Engine, GenResult
from worker.loading import load_engine


def engine_alone(
    engine: Engine, prompts: list[str], new_tokens: int, batch: int, budget: int
) -> int:
    """The worker's policy: groups of `batch` in arrival order, each cut into length buckets
    by the token budget and the padding-waste bound. Returns completion tokens."""
    settings = Settings()
    tokens = 0
    for start in range(0, len(prompts), batch):
        items = [
            WorkItem(
                f"b{i}",
                "/v1/completions",
                {"model": "bench", "prompt": p, "max_tokens": new_tokens, "temperature": 0},
            )
            for i, p in enumerate(prompts[start : start + batch])
        ]
        rows = [Prepared(it, to_gen_request(engine, it)) for it in items]
        for chunk in plan_chunks(rows, batch, budget, settings.bucket_max_waste):
            for res in engine.generate([r.request for r in chunk]):
                assert isinstance(res, GenResult), res
                tokens += res.completion_tokens
    return tokens


def through_service(stack: Stack, prompts: list[str], new_tokens: int, parallel: int) -> int:
    with stack.client() as client, ThreadPoolExecutor(parallel) as pool:
        ids = list(
            pool.map(lambda p: stack.submit(client, "bench", p, max_tokens=new_tokens), prompts)
        )
    jobs = stack.wait_jobs_done(ids, timeout_s=1800)
    bad = [j.error for j in jobs if j.status != "succeeded"]
    assert not bad, bad[:3]
    describe(jobs)
    return sum(j.completion_tokens or 0 for j in jobs)


def describe(jobs: list[Job]) -> None:
    """Where the time went, from the stored timestamps, and how full the micro-batches were."""
    n = len(jobs)
    sizes = {j.microbatch_id: j.microbatch_size or 0 for j in jobs}
    wait = sum((j.started_at or 0) - j.created_at for j in jobs) / n
    run = sum((j.finished_at or 0) - (j.started_at or 0) for j in jobs) / n
    print(
        f"    {len(sizes)} generate calls, mean rows {sum(sizes.values()) / len(sizes):.1f}, "
        f"mean queue wait {wait:.2f} s, mean claim-to-stored {run:.2f} s"
    )


def one_at_a_time(stack: Stack, prompts: list[str], new_tokens: int) -> int:
    tokens, ids = 0, []
    with stack.client() as client:
        for p in prompts:
            ids.append(stack.submit(client, "bench", p, max_tokens=new_tokens))
            job = stack.wait_job(client, ids[-1])
            tokens += job["response"]["usage"]["completion_tokens"]
    describe(stack.jobs(ids))
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--serial", type=int, default=16)
    args = ap.parse_args()

    model_dir = bench_model_dir()
    settings = Settings()
    batch, budget = settings.max_batch_size, settings.max_batch_tokens
    engine = load_engine(ModelSpec(name="bench", path=str(model_dir)))
    prompts = mixed_prompts(engine.tokenizer, args.requests)
    # Force eos-free, full-length outputs so every path does the same work.
    engine_alone(engine, prompts[:4], 2, batch, budget)  # warm-up

    with timed() as t_b:
        tokens_b = engine_alone(engine, prompts, args.new_tokens, batch, budget)
    del engine

    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    embedded = None
    if not redis_reachable(redis_url):
        embedded = EmbeddedRedis()
        redis_url = embedded.start()
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(f"sqlite:///{tmp}/bench.db", redis_url, {"bench": model_dir}, Path(tmp))
        stack.migrate()
        try:
            stack.start_api()
            stack.start_worker("bench", concurrency=settings.effective_concurrency())
            one_at_a_time(stack, prompts[:2], 2)  # warm-up
            with timed() as t_a:
                tokens_a = through_service(stack, prompts, args.new_tokens, parallel=16)
            serial = prompts[: args.serial]
            with timed() as t_c:
                tokens_c = one_at_a_time(stack, serial, args.new_tokens)
        finally:
            stack.stop()
            if embedded:
                embedded.stop()

    a, b, c = tokens_a / t_a[0], tokens_b / t_b[0], tokens_c / t_c[0]
    print(
        f"requests={args.requests} new_tokens={args.new_tokens} batch={batch} "
        f"max_wait_ms={settings.max_wait_ms} concurrency={settings.effective_concurrency()}"
    )
    print(
        f"(a) service, concurrent : {tokens_a} tokens in {t_a[0]:.1f} s = {a:.0f} tok/s "
        f"({args.requests / t_a[0]:.1f} req/s)"
    )
    print(f"(b) engine in-process   : {tokens_b} tokens in {t_b[0]:.1f} s = {b:.0f} tok/s")
    print(
        f"(c) service, one by one : {tokens_c} tokens in {t_c[0]:.1f} s = {c:.0f} tok/s "
        f"({len(serial)} requests)"
    )
    print(f"a/b = {a / b:.2f}   (goal >= 0.9)")
    print(f"a/c = {a / c:.2f}   (goal >= 4)")


if __name__ == "__main__":
    main()
